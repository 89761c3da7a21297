"""The OpenAI-compatible HTTP API over a real server on 127.0.0.1 (no Ray), driven by the official `openai`
client, and by raw HTTP where a client would not send what is tested (malformed JSON, a wrong content type).

The server is conftest's LocalServer: the tiny model's engine behind the gRPC and HTTP fronts, as in a
router. Answers are checked against an offline engine on the same checkpoint; the tests read the
server's engine directly to check that disconnected requests give their KV slots back.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams
from tests.router_service.test_server import wait_idle

MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 2
MAX_QUEUE = 4  # a request of n choices (or a list of prompts) takes n places in the queue
TIMEOUT = 60  # seconds per call: a hang fails instead of blocking the suite
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
# Logits of one sequence computed alone (the reference) and in the server's batch go through kernels of
# different shapes; their log-probs agree to float32 rounding, well under this.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def served(local_server):
    srv = local_server(EngineSettings(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, max_queue=MAX_QUEUE))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(served):
    import openai

    # No retries: a 429 must reach the test, not be retried away.
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_engine(tiny_model, EngineSettings(max_model_len=MAX_MODEL_LEN))


def offline(reference, ids: list[int], **params):
    return reference.generate([ids], SamplingParams(**params))[0]


def raw(served, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
        ) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


# --- endpoints and shapes ------------------------------------------------------------------------------------


def test_models_and_health(served, client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "moe-serve"
    assert raw(served, "GET", "/health") == (200, {"status": "ok"})


def test_greedy_completion_equals_the_offline_engine_and_grpc(served, client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    expected = offline(reference, ids, max_tokens=8, ignore_eos=True)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert isinstance(r.created, int) and abs(r.created - time.time()) < 60
    (choice,) = r.choices
    assert choice.index == 0 and choice.text == expected.text and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    with grpc.insecure_channel(served.target) as channel:
        g = pb2_grpc.GenerationStub(channel).Generate(
            pb2.GenerateRequest(text=PROMPT, sampling=pb2.SamplingParams(max_tokens=8, ignore_eos=True)),
            timeout=TIMEOUT)
    assert list(g.token_ids) == expected.token_ids and g.text == choice.text


def test_prompt_as_token_ids_and_as_a_list_gives_one_choice_each(client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    other = [5, 6, 7, 8]
    r = client.completions.create(model="tiny", prompt=[ids, other], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    # The reference batches both prompts too, as the server does (the suite's rule for concurrent greedy runs).
    both = reference.generate([ids, other], SamplingParams(max_tokens=4, ignore_eos=True))
    assert texts == [c.text for c in both]
    assert r.usage.prompt_tokens == len(ids) + len(other) and r.usage.completion_tokens == 8
    one = client.completions.create(model="tiny", prompt=["a b", "c d"], max_tokens=2, temperature=0)
    assert sorted(c.index for c in one.choices) == [0, 1]


def test_greedy_chat_renders_the_template_and_equals_the_offline_engine(client, reference):
    ids = reference.tokenizer.apply_chat_template(CHAT)
    expected = offline(reference, ids, max_tokens=6, ignore_eos=True)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and r.usage.prompt_tokens == len(ids)


def test_chat_without_max_tokens_uses_the_rest_of_the_context(client, reference):
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
    prompt = len(reference.tokenizer.apply_chat_template(CHAT))
    assert r.usage.completion_tokens == MAX_MODEL_LEN - prompt and r.choices[0].finish_reason == "length"


def test_null_fields_take_their_defaults(served):
    body = {"model": None, "prompt": PROMPT, "max_tokens": 2, "temperature": None, "top_p": None, "n": None,
            "stream": None, "stop": None, "seed": None, "logprobs": None, "user": None}
    status, answer = raw(served, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    chat = {"messages": [*CHAT, {"role": "assistant", "content": None}, {"role": "user", "content": "Again."}],
            "max_tokens": 2, "logprobs": None, "frequency_penalty": None}
    status, answer = raw(served, "POST", "/v1/chat/completions", json.dumps(chat).encode())
    assert status == 200, answer


def test_streamed_chat_with_n_choices_and_logprobs(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0.8,
                                                 seed=3, n=2, stream=True, logprobs=True, top_logprobs=2,
                                                 extra_body={"ignore_eos": True}))
    by_choice: dict[int, list] = {}
    for c in chunks:
        (choice,) = c.choices
        by_choice.setdefault(choice.index, []).append(choice)
    assert sorted(by_choice) == [0, 1]
    for index, parts in by_choice.items():
        assert parts[0].delta.role == "assistant" and all(p.delta.role is None for p in parts[1:])
        assert parts[-1].finish_reason == "length"
        entries = [e for p in parts if p.logprobs for e in p.logprobs.content]
        assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)


def test_streamed_chat_with_usage(client, reference):
    ids = reference.tokenizer.apply_chat_template(CHAT)
    expected = offline(reference, ids, max_tokens=6, ignore_eos=True)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == expected.text
    assert [d.finish_reason for d in deltas][-1] == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_ends_with_done_and_without_usage_unless_asked(served, client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    expected = offline(reference, ids, max_tokens=5, ignore_eos=True)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # The wire itself: server-sent events, one `data:` line per chunk and the final [DONE].
    conn = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_stop_strings_cut_the_text(client, reference):
    full = offline(reference, reference.tokenizer.encode(PROMPT), max_tokens=12, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]  # two characters from the middle of the greedy text
    assert stop.strip(), f"pick another prompt: {full!r}"
    for form in (stop, [stop, "never-appears"]):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=form,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client):
    def sample(seed, n=1):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.95,
                                      seed=seed, n=n, extra_body={"top_k": 50, "ignore_eos": True})
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert sample(7) == sample(7)
    two = sample(7, n=2)
    assert two == sample(7, n=2)
    assert two[0] != two[1]  # choice i samples with seed + i: 8 tokens each from a near-uniform distribution


def test_logprobs_and_top_logprobs(client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    expected = offline(reference, ids, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [reference.tokenizer.token_text(t) for t in expected.token_ids]
    assert all(math.isclose(a, b, abs_tol=LOGPROB_TOLERANCE) for a, b in zip(lp.token_logprobs, expected.logprobs))
    assert [len(t) for t in lp.top_logprobs] == [3] * 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=LOGPROB_TOLERANCE)  # greedy


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "frobnicate": 1}, "frobnicate"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "n": 1000}, "n"),
    ({"prompt": PROMPT, "max_tokens": 1000}, "max_tokens"),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": PROMPT, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": PROMPT, "best_of": 2}, "best_of"),
    ({"prompt": PROMPT, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"prompt": PROMPT, "logprobs": 9}, "logprobs"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed"),  # beyond what a generator takes: refused, not a failed step
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, served, body, param):
    import openai

    fields = dict(body)
    if "prompt" not in fields:  # the client itself insists on a prompt: send this one raw
        status, answer = raw(served, "POST", "/v1/completions", json.dumps(fields).encode())
        assert status == 400 and answer["error"]["param"] == param
        return
    prompt = fields.pop("prompt")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=prompt, extra_body=fields)
    error = err.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    assert raw(served, "GET", "/health")[0] == 200  # and the server keeps serving


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format.type"),
])
def test_bad_chat_fields_are_400_naming_the_field(served, body, param):
    status, answer = raw(served, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == param, answer


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    """What LangChain and `vllm bench serve` send by default must not be refused."""
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, frequency_penalty=0, presence_penalty=0,
                                  logit_bias={}, best_of=1, echo=False, user="someone",
                                  extra_body={"repetition_penalty": 1.0})
    assert r.usage.completion_tokens >= 1


def test_unknown_model_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    assert err.value.body["param"] == "model"


@pytest.mark.parametrize("body, content_type, param", [
    (b"{not json", "application/json", "body"),
    (b"[1, 2]", "application/json", "body"),
    (json.dumps({"prompt": PROMPT}).encode(), "text/plain", "Content-Type"),
    (b"\xff\xfe", "application/json", "body"),
])
def test_malformed_json_and_wrong_content_types_are_400(served, body, content_type, param):
    status, answer = raw(served, "POST", "/v1/completions", body, content_type)
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param


def test_unknown_paths_and_methods_answer_in_the_error_format(served):
    assert raw(served, "GET", "/v1/nothing")[0] == 404
    status, answer = raw(served, "GET", "/v1/completions")
    assert status == 405 and "error" in answer


@pytest.mark.parametrize("template, why", [(None, "no chat template"), ("{% bogus %}", "does not compile")])
def test_chat_without_a_usable_template_is_400_and_completions_still_work(tiny_model, tmp_path, template, why):
    import openai

    from tests.conftest import LocalServer

    model = Path(tmp_path) / "no-template"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    srv = LocalServer(str(model), EngineSettings(max_model_len=MAX_MODEL_LEN))
    try:
        c = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        assert why in err.value.body["message"] and err.value.body["param"] == "messages"
        assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    finally:
        srv.close()


@contextlib.contextmanager
def engine_paused(engine):
    """Hold the engine loop before its next step (requests then wait, admitted but unscheduled) until exit."""
    release = threading.Event()
    step = engine.step

    def held_step():
        release.wait(TIMEOUT)
        return step()

    engine.step = held_step  # the engine loop looks the method up on the instance at every step
    try:
        yield
    finally:
        release.set()
        del engine.step


def test_a_full_queue_is_429_and_nothing_is_lost(served, client):
    import openai

    wait_idle(served.engine)
    # With the engine held, MAX_QUEUE streams wait (a stream's headers return once it is admitted): one more
    # is refused.
    with engine_paused(served.engine):
        streams = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}) for _ in range(MAX_QUEUE)]
        assert served.engine.num_waiting == MAX_QUEUE
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 429 and "max_queue" in err.value.body["message"]
    for s in streams:  # those admitted still run, in full
        chunks = list(s)
        assert len(chunks) == 20 and chunks[-1].choices[0].finish_reason == "length"
    wait_idle(served.engine)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def test_a_request_that_leaves_while_queued_never_runs(served):
    engine = served.engine
    wait_idle(engine)
    steps = engine.steps
    with engine_paused(engine):
        conn = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 50, "stream": True}),
                     {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200 and engine.num_waiting == 1
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.monotonic() + TIMEOUT  # the server sees the connection drop and aborts the request
        while not engine._aborts and time.monotonic() < deadline:
            time.sleep(0.01)
    wait_idle(engine)
    assert engine.steps - steps <= 1  # at most the step that dropped it; it never generated


def test_a_failed_step_after_the_headers_arrives_as_an_error_event(served, client):
    import openai

    engine = served.engine
    wait_idle(engine)
    step = engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:  # once the stream has begun
            raise RuntimeError("an expert worker died")
        return step()

    engine.step = failing_step
    try:
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="expert worker died"):
            list(stream)
    finally:
        del engine.step
    wait_idle(engine)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def test_a_client_that_disconnects_frees_its_kv_slot(served):
    engine = served.engine
    wait_idle(engine)
    for stream in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=TIMEOUT)
        body = {"prompt": PROMPT, "max_tokens": 120, "ignore_eos": True, "stream": stream}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        if stream:
            r = conn.getresponse()
            assert r.readline().startswith(b"data: ")  # decoding has begun
        else:
            deadline = time.monotonic() + TIMEOUT
            while engine.num_running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert engine.kv.used_slots == 1
        steps = engine.steps
        conn.sock.shutdown(2)  # the client goes away mid-generation
        conn.close()
        wait_idle(engine)
        assert engine.steps - steps < 120 - 10, "the request ran on after its client left"


def test_a_draining_server_is_503(tiny_model):
    import openai

    from tests.conftest import LocalServer

    srv = LocalServer(tiny_model, EngineSettings(max_model_len=MAX_MODEL_LEN))
    try:
        c = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        done = threading.Event()
        srv.loop.call_soon_threadsafe(lambda: (srv.async_engine.begin_drain(), done.set()))
        assert done.wait(10)
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 503 and "draining" in err.value.body["message"]
        assert raw(srv, "GET", "/health") == (503, {"status": "draining"})
    finally:
        srv.close()
