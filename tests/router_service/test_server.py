"""The gRPC front end over a real server on 127.0.0.1 (no Ray): errors, limits, streaming, cancellation.

One module-wide server runs the tiny model's single-process engine on its own
asyncio loop in a background thread, as a router does; the tests talk to it over
a real channel and read the engine object directly to check that cancelled and
timed-out requests give their KV slots back.
"""

from __future__ import annotations

import math
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.make_model import PRESETS
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import Engine, EngineSettings, load_engine
from router_service.sampling import SamplingParams

MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 4
MAX_QUEUE = 2
RPC_TIMEOUT = 60  # seconds; every call has a deadline so that a hang fails instead of blocking the suite
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def served(local_server):
    """The tiny model's engine behind a real gRPC server on loopback (conftest's LocalServer, no Ray)."""
    srv = local_server(EngineSettings(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, max_queue=MAX_QUEUE))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """A second, offline engine on the same checkpoint: what the server's answers must equal."""
    return load_engine(tiny_model, EngineSettings(max_model_len=MAX_MODEL_LEN))


def ids_request(ids, **sampling) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids), sampling=pb2.SamplingParams(**sampling))


def wait_idle(engine: Engine, timeout: float = 10.0) -> float:
    """Wait until the engine has nothing running or waiting and every KV slot is free; seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if engine.num_running == 0 and engine.num_waiting == 0 and engine.kv.used_slots == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    pytest.fail(f"engine not idle after {timeout} s: running {engine.num_running}, waiting {engine.num_waiting}, "
                f"KV slots used {engine.kv.used_slots}")


def drain(call) -> tuple[list[pb2.GenerateStreamResponse], grpc.RpcError | None]:
    messages = []
    try:
        for msg in call:
            messages.append(msg)
    except grpc.RpcError as err:
        return messages, err
    return messages, None


def joined(messages) -> tuple[list[int], str, list[float]]:
    ids, text, logprobs = [], "", []
    for m in messages:
        ids += m.token_ids
        text += m.text
        logprobs += m.logprobs
    return ids, text, logprobs


# --- bad requests ------------------------------------------------------------------------------

PROMPT = [0, 19923, 2058, 14, 566, 344]  # "Hello world, this is" with BOS


def _bad_requests():
    V = TINY.vocab_size
    no_prompt = pb2.GenerateRequest(sampling=pb2.SamplingParams(max_tokens=4))
    empty_ids = pb2.GenerateRequest()
    empty_ids.token_ids.SetInParent()  # the oneof is set, to an empty list
    cases = [
        ("no prompt", no_prompt, "prompt"),
        ("empty text", pb2.GenerateRequest(text=""), "prompt.text"),
        ("empty token_ids", empty_ids, "prompt"),
        ("prompt longer than the context", ids_request([5] * MAX_MODEL_LEN), "prompt"),
        ("unknown token id", ids_request([5, V, 6]), "prompt.token_ids"),
        ("negative temperature", ids_request(PROMPT, temperature=-0.5), "sampling.temperature"),
        ("NaN temperature", ids_request(PROMPT, temperature=math.nan), "sampling.temperature"),
        ("infinite temperature", ids_request(PROMPT, temperature=math.inf), "sampling.temperature"),
        ("top_p 0", ids_request(PROMPT, top_p=0.0), "sampling.top_p"),
        ("top_p 1.5", ids_request(PROMPT, top_p=1.5), "sampling.top_p"),
        ("max_tokens 0", ids_request(PROMPT, max_tokens=0), "sampling.max_tokens"),
        ("max_tokens beyond the context", ids_request(PROMPT, max_tokens=MAX_MODEL_LEN - len(PROMPT) + 1),
         "sampling.max_tokens"),
        ("empty stop string", ids_request(PROMPT, stop=["ok", ""]), "sampling.stop"),
        ("stop token id out of vocabulary", ids_request(PROMPT, stop_token_ids=[3, V + 7]), "sampling.stop_token_ids"),
    ]
    return pytest.mark.parametrize("request_msg, field", [c[1:] for c in cases], ids=[c[0] for c in cases])


@_bad_requests()
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_request_is_invalid_argument_naming_the_field(stub, served, request_msg, field, method):
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request_msg, timeout=RPC_TIMEOUT)
        if method == "GenerateStream":
            list(result)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}: "), err.details()
    assert served.engine.num_waiting == 0 and served.engine.kv.used_slots == 0


def test_the_context_limits_are_exact(stub):
    """The largest prompt and the largest max_tokens that fit are accepted: the bounds are not off by one."""
    longest = stub.Generate(ids_request([5] * (MAX_MODEL_LEN - 1), max_tokens=1), timeout=RPC_TIMEOUT)
    assert longest.usage.prompt_tokens == MAX_MODEL_LEN - 1 and longest.usage.completion_tokens == 1
    fill = MAX_MODEL_LEN - len(PROMPT)
    full = stub.Generate(ids_request(PROMPT, max_tokens=fill, ignore_eos=True), timeout=RPC_TIMEOUT)
    assert len(full.token_ids) == fill and full.finish_reason == pb2.FINISH_REASON_LENGTH


def test_duplicate_in_flight_request_id_is_refused_and_the_first_is_unharmed(stub, served):
    first = stub.GenerateStream(pb2.GenerateRequest(request_id="dup", token_ids=pb2.TokenIds(ids=PROMPT),
                                                    sampling=pb2.SamplingParams(max_tokens=60, ignore_eos=True)),
                                timeout=20)  # 60 tokens take well under a second; a hijacked stream hangs
    head = next(first)  # the first request is now in flight
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb2.GenerateRequest(request_id="dup", token_ids=pb2.TokenIds(ids=[7, 8]),
                                          sampling=pb2.SamplingParams(max_tokens=2)), timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request_id: ") and "'dup'" in info.value.details()
    # The refused duplicate must neither steal the first request's stream nor cancel it.
    rest, err = drain(first)
    assert err is None, err
    assert rest[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert len(joined([head, *rest])[0]) == 60
    assert {m.request_id for m in [head, *rest]} == {"dup"}
    wait_idle(served.engine)
    # Once finished, the id may be used again.
    again = stub.Generate(pb2.GenerateRequest(request_id="dup", token_ids=pb2.TokenIds(ids=[7, 8]),
                                              sampling=pb2.SamplingParams(max_tokens=2)), timeout=RPC_TIMEOUT)
    assert again.request_id == "dup" and len(again.token_ids) == 2


def test_server_still_serves_after_bad_requests(stub, served, reference):
    for bad in [pb2.GenerateRequest(), ids_request(PROMPT, top_p=0.0), ids_request([TINY.vocab_size])]:
        with pytest.raises(grpc.RpcError):
            stub.Generate(bad, timeout=RPC_TIMEOUT)
    response = stub.Generate(ids_request(PROMPT, max_tokens=8, ignore_eos=True), timeout=RPC_TIMEOUT)
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert list(response.token_ids) == expected.token_ids
    wait_idle(served.engine)


# --- limits ------------------------------------------------------------------------------------


def test_more_requests_than_the_queue_holds_are_resource_exhausted(stub, served):
    n = 3 * (MAX_NUM_SEQS + MAX_QUEUE)
    # Each call starts at once (a sync streaming call sends its request on creation); drain them afterwards.
    calls = [stub.GenerateStream(ids_request([10 + i, 11, 12], max_tokens=100, ignore_eos=True), timeout=RPC_TIMEOUT)
             for i in range(n)]
    results = [drain(c) for c in calls]
    refused = [err for _, err in results if err is not None]
    served_ok = [msgs for msgs, err in results if err is None]
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), [e.details() for e in refused]
    assert refused, "no request was refused although far more arrived than slots plus queue"
    assert "max_queue 2" in refused[0].details()
    assert served_ok, "no request was admitted"
    assert len(served_ok) >= MAX_QUEUE
    for msgs in served_ok:
        assert msgs[-1].finish_reason == pb2.FINISH_REASON_LENGTH
        assert len(joined(msgs)[0]) == 100 == msgs[-1].usage.completion_tokens
    wait_idle(served.engine)
    # The refusals were transient: the same request is served now that the queue is empty.
    response = stub.Generate(ids_request([10, 11, 12], max_tokens=3), timeout=RPC_TIMEOUT)
    assert len(response.token_ids) >= 1


# --- what a request returns ------------------------------------------------------------------


def test_generate_matches_the_offline_engine_with_usage_and_finish_reason(stub, reference):
    response = stub.Generate(pb2.GenerateRequest(request_id="r-usage", token_ids=pb2.TokenIds(ids=PROMPT),
                                                 sampling=pb2.SamplingParams(max_tokens=12, ignore_eos=True)),
                             timeout=RPC_TIMEOUT)
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert response.request_id == "r-usage"
    assert list(response.token_ids) == expected.token_ids and response.text == expected.text
    assert response.finish_reason == pb2.FINISH_REASON_LENGTH
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(PROMPT), 12)
    assert list(response.logprobs) == []  # not asked for
    t = response.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    # The server assigns an id when none is given; a text prompt gets the tokenizer's BOS.
    text = stub.Generate(pb2.GenerateRequest(text="Hello world, this is", sampling=pb2.SamplingParams(max_tokens=2)),
                         timeout=RPC_TIMEOUT)
    assert text.request_id and text.usage.prompt_tokens == len(PROMPT)
    assert list(text.token_ids) == reference.generate([PROMPT], SamplingParams(max_tokens=2))[0].token_ids


def test_default_max_tokens_is_16(stub):
    response = stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT),
                                                 sampling=pb2.SamplingParams(ignore_eos=True)), timeout=RPC_TIMEOUT)
    assert len(response.token_ids) == 16 and response.finish_reason == pb2.FINISH_REASON_LENGTH


def test_stop_token_id_ends_generation_and_is_included(stub):
    full = stub.Generate(ids_request(PROMPT, max_tokens=10, ignore_eos=True), timeout=RPC_TIMEOUT)
    stop_id = full.token_ids[2]
    first = list(full.token_ids).index(stop_id)
    stopped = stub.Generate(ids_request(PROMPT, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]),
                            timeout=RPC_TIMEOUT)
    assert list(stopped.token_ids) == list(full.token_ids[:first + 1])
    assert stopped.finish_reason == pb2.FINISH_REASON_STOP and stopped.usage.completion_tokens == first + 1


def test_stream_equals_unary(stub):
    for sampling in [dict(max_tokens=20, ignore_eos=True), dict(max_tokens=20, temperature=0.8, top_p=0.9, seed=7)]:
        request = ids_request(PROMPT, **sampling)
        request.return_logprobs = True
        unary = stub.Generate(request, timeout=RPC_TIMEOUT)
        messages = list(stub.GenerateStream(request, timeout=RPC_TIMEOUT))
        ids, text, logprobs = joined(messages)
        assert ids == list(unary.token_ids) and text == unary.text
        assert logprobs == pytest.approx(list(unary.logprobs), abs=1e-5)
        assert all(m.finish_reason == pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        last = messages[-1]
        assert last.finish_reason == unary.finish_reason == pb2.FINISH_REASON_LENGTH
        assert last.usage == unary.usage and last.usage.completion_tokens == len(ids) == 20
        assert all(not m.HasField("usage") for m in messages[:-1])
        assert len({m.request_id for m in messages}) == 1 and messages[0].request_id


def test_logprobs_one_per_token_and_equal_the_offline_engine(stub, reference):
    request = ids_request(PROMPT, max_tokens=10, ignore_eos=True)
    request.return_logprobs = True
    response = stub.Generate(request, timeout=RPC_TIMEOUT)
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True))[0]
    assert len(response.logprobs) == len(response.token_ids) == 10
    assert all(lp <= 0 for lp in response.logprobs)
    assert list(response.logprobs) == pytest.approx(expected.logprobs, abs=1e-4)


def test_top_logprobs_per_token_most_likely_first(stub, reference):
    request = ids_request(PROMPT, max_tokens=6, ignore_eos=True)
    request.return_logprobs, request.top_logprobs = True, 3
    response = stub.Generate(request, timeout=RPC_TIMEOUT)
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True,
                                                           top_logprobs=3))[0]
    assert len(response.top_logprobs) == len(response.token_ids) == 6
    for top, token, lp, want in zip(response.top_logprobs, response.token_ids, response.logprobs,
                                    expected.top_logprobs):
        assert list(top.token_ids) == [t for t, _ in want] and top.token_ids[0] == token  # greedy: the best
        assert list(top.logprobs) == pytest.approx([v for _, v in want], abs=1e-4)
        assert list(top.logprobs) == sorted(top.logprobs, reverse=True) and top.logprobs[0] == pytest.approx(lp)
    streamed = list(stub.GenerateStream(request, timeout=RPC_TIMEOUT))
    assert [list(t.token_ids) for m in streamed for t in m.top_logprobs] == [list(t.token_ids)
                                                                            for t in response.top_logprobs]
    request.return_logprobs = False
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in err.value.details()


def test_stop_string_cuts_text_and_reports_stop(stub):
    full = stub.Generate(ids_request(PROMPT, max_tokens=24, ignore_eos=True), timeout=RPC_TIMEOUT)
    text = full.text
    # A stop string taken from the middle of the greedy text, at its first occurrence.
    start = next(i for i in range(len(text) // 3, len(text) - 3)
                 if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    stop = text[start:start + 3]
    request = ids_request(PROMPT, max_tokens=24, ignore_eos=True, stop=["never-generated-zzz", stop])
    cut = stub.Generate(request, timeout=RPC_TIMEOUT)
    assert cut.finish_reason == pb2.FINISH_REASON_STOP
    assert cut.text == text[:start], (stop, text)
    assert stop not in cut.text
    n = len(cut.token_ids)
    assert 0 < n < 24 and list(cut.token_ids) == list(full.token_ids[:n]) and cut.usage.completion_tokens == n
    # Streaming holds back text that may become a stop string; it never leaks the stop string.
    messages = list(stub.GenerateStream(request, timeout=RPC_TIMEOUT))
    ids, streamed, _ = joined(messages)
    assert streamed == cut.text and ids == list(cut.token_ids)
    assert messages[-1].finish_reason == pb2.FINISH_REASON_STOP


def test_tokenize_round_trips(stub, reference):
    text = "Hello world, this is a test of the tokenizer: 1234 ünïcödé 中文"
    plain = stub.Tokenize(pb2.TokenizeRequest(text=text), timeout=RPC_TIMEOUT)
    special = stub.Tokenize(pb2.TokenizeRequest(text=text, add_special_tokens=True), timeout=RPC_TIMEOUT)
    tok = reference.tokenizer
    assert list(plain.token_ids) == tok.encode(text, add_special_tokens=False)
    assert tok.decode(list(plain.token_ids)) == text
    assert list(special.token_ids) == [tok.bos_token_id, *plain.token_ids]
    assert len(plain.tokens) == len(plain.token_ids) and all(plain.tokens)
    assert list(plain.tokens) == [tok.id_to_token(i) for i in plain.token_ids]
    assert list(special.token_ids) == tok.encode(text)  # what a text prompt is tokenized to


def test_model_info_matches_the_spec(stub, tiny_model):
    info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=RPC_TIMEOUT)
    # Expected values written from the preset, independently of the spec the server reads.
    assert info.model_name == "tiny" and info.model_path == tiny_model
    assert info.model_type == "deepseek"
    assert info.vocab_size == TINY.vocab_size == 129280
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.num_layers == TINY.num_layers
    assert list(info.moe_layers) == list(range(TINY.first_dense, TINY.num_layers))
    assert info.num_experts == TINY.num_experts and info.top_k == TINY.top_k
    assert info.num_shared_experts == TINY.num_shared_experts
    assert info.shared_expert_intermediate_size == TINY.num_shared_experts * TINY.expert_intermediate_size
    assert info.moe_intermediate_size == TINY.expert_intermediate_size
    assert info.hidden_size == TINY.hidden_size
    assert list(info.eos_token_ids) == [1]  # DeepSeek-V3's <｜end▁of▁sentence｜>
    assert info.dtype == "float32"


# --- cancellation frees the KV slot ------------------------------------------------------------


def test_cancelled_stream_frees_its_slot(stub, served):
    engine = served.engine
    wait_idle(engine)
    steps_before = engine.steps
    call = stub.GenerateStream(ids_request(PROMPT, max_tokens=100, ignore_eos=True), timeout=RPC_TIMEOUT)
    got = [next(call), next(call)]
    assert all(len(m.token_ids) >= 1 for m in got)
    assert engine.num_running == 1 and engine.kv.used_slots == 1
    call.cancel()
    wait_idle(engine, timeout=5.0)
    assert engine.steps - steps_before < 100, "the request ran to the end instead of being cancelled"
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_expired_deadline_frees_its_slot(stub, served):
    engine = served.engine
    longest = MAX_MODEL_LEN - len(PROMPT)
    # Size the deadline from this machine's speed so that it passes about a third of the way through.
    probe = stub.Generate(ids_request(PROMPT, max_tokens=longest, ignore_eos=True), timeout=RPC_TIMEOUT)
    deadline = probe.timings.total_seconds / 3
    wait_idle(engine)
    steps_before = engine.steps
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(ids_request(PROMPT, max_tokens=longest, ignore_eos=True), timeout=deadline)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(engine, timeout=5.0)
    ran = engine.steps - steps_before
    assert 1 < ran < longest, f"{ran} steps: the request should have been generating when the deadline passed"
    # Same for a stream whose deadline passes between messages.
    steps_before = engine.steps
    call = stub.GenerateStream(ids_request(PROMPT, max_tokens=longest, ignore_eos=True), timeout=deadline)
    messages, err = drain(call)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(messages) < longest
    wait_idle(engine, timeout=5.0)
    assert 1 < engine.steps - steps_before < longest


# --- health and reflection ---------------------------------------------------------------------


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "moeserve.v1.Generation"]:
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"moeserve.v1.Generation", "grpc.health.v1.Health"} <= services
    assert "moeserve.v1.ClusterAdmin" not in services  # no admin backend on this server
    generation = DescriptorPool(db).FindServiceByName("moeserve.v1.Generation")
    assert {m.name for m in generation.methods} == {"Generate", "GenerateStream", "Tokenize", "GetModelInfo"}
    assert generation.FindMethodByName("GenerateStream").output_type.full_name == "moeserve.v1.GenerateStreamResponse"
