"""The whole cluster on the shared local Ray instance: controller, two expert workers, one router.

Everything a client sees goes through the router's real gRPC server on
127.0.0.1; answers are checked against the single-process engine on the same
checkpoint (greedy decoding, so the tokens must be identical).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.make_model import PRESETS
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

TINY = PRESETS["tiny"]
MOE_LAYERS = list(range(TINY.first_dense, TINY.num_layers))
NUM_WORKERS = 2
ENGINE = EngineSettings(max_model_len=128, max_num_seqs=8)
RPC_TIMEOUT = 60
PROMPTS = [[0, 19923, 2058, 14, 566, 344], [9, 8], [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100],
           [5], [42, 43, 44, 45], list(range(1000, 1030))]


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model):
    from cluster.controller import start_cluster, stop_cluster
    from cluster.settings import ClusterSettings

    # A window longer than the module runs, so that no routed token ages out between two readings.
    settings = ClusterSettings(model=tiny_model, num_workers=NUM_WORKERS, port=0, engine=ENGINE,
                               load_window_seconds=600, rebalance_below_balancedness=None)
    controller, ports = start_cluster(settings)
    try:
        assert len(ports) == 1 and ports[0] > 0
        yield controller, f"127.0.0.1:{ports[0]}"
    finally:
        stop_cluster(controller)


@pytest.fixture(scope="module")
def controller(cluster):
    return cluster[0]


@pytest.fixture(scope="module")
def target(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def openai_client(controller):
    """The official client on router 0's OpenAI HTTP API."""
    import openai
    import ray

    (endpoint,) = ray.get(controller.endpoints.remote())
    assert endpoint["http"] > 0
    return openai.OpenAI(base_url=f"http://127.0.0.1:{endpoint['http']}/v1", api_key="unused", max_retries=0,
                         timeout=RPC_TIMEOUT)


@pytest.fixture(scope="module")
def channel(target):
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def admin(channel):
    return admin_grpc.ClusterAdminStub(channel)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The single-process engine on the same checkpoint: every routed expert local."""
    return load_engine(tiny_model, ENGINE)


def greedy(ids, max_tokens, **kw) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                               sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw))


def routed_total(admin) -> int:
    return sum(e.tokens for e in admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=RPC_TIMEOUT).experts)


def wait_router_idle(controller, timeout: float = 10.0) -> list[dict]:
    import ray

    start = time.monotonic()
    while True:
        stats = ray.get(controller.router_stats.remote(), timeout=RPC_TIMEOUT)
        if all(s["running"] == 0 and s["waiting"] == 0 and s["kv_slots_used"] == 0 for s in stats):
            return stats
        if time.monotonic() - start > timeout:
            pytest.fail(f"router not idle after {timeout} s: {stats}")
        time.sleep(0.05)


# Load first: it checks exact token counts, so it wants a quiet router (the delta is exact regardless).
def test_expert_load_counts_every_token_through_every_moe_layer(stub, admin, controller):
    wait_router_idle(controller)
    before = routed_total(admin)
    requests = [(PROMPTS[0], 5), (PROMPTS[2], 3), (PROMPTS[3], 1)]
    for ids, n in requests:
        response = stub.Generate(greedy(ids, n), timeout=RPC_TIMEOUT)
        assert response.usage.completion_tokens == n
    load = admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=RPC_TIMEOUT)
    # Every token the model runs passes each MoE layer once and picks top_k experts there. The model runs
    # the whole prompt (prefill) and every generated token but the last, which is sampled and never fed back.
    forwarded = sum(len(ids) + n - 1 for ids, n in requests)
    expected = forwarded * TINY.top_k * len(MOE_LAYERS)
    total = sum(e.tokens for e in load.experts)
    assert total - before == expected, (total, before, forwarded)
    assert total > 0
    # One entry per logical expert (zero loads included), each with its single replica.
    assert sorted((e.layer, e.expert) for e in load.experts) == [
        (layer, e) for layer in MOE_LAYERS for e in range(TINY.num_experts)]
    assert all(e.replicas == 1 for e in load.experts)
    assert load.plan_version == 1 and load.window_seconds == 600
    # Per worker: the tokens of the experts it hosts; together all routed tokens.
    placement = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=RPC_TIMEOUT)
    per_expert = {(e.layer, e.expert): e.tokens for e in load.experts}
    per_worker = {w.worker_id: w.tokens for w in load.workers}
    assert sorted(per_worker) == sorted(w.worker_id for w in placement.workers)
    for w in placement.workers:
        assert per_worker[w.worker_id] == sum(per_expert[(r.layer, r.expert)] for r in w.replicas)
    assert sum(per_worker.values()) == total
    assert 0 < load.balancedness <= 1
    # Balancedness (vLLM's definition): every MoE layer waits for its busiest worker, so
    # sum over layers of mean tokens per worker / sum over layers of max tokens per worker.
    mean_sum = max_sum = 0.0
    for layer in MOE_LAYERS:
        layer_tokens = [sum(per_expert[(r.layer, r.expert)] for r in w.replicas if r.layer == layer)
                        for w in placement.workers]
        mean_sum += sum(layer_tokens) / len(layer_tokens)
        max_sum += max(layer_tokens)
    assert load.balancedness == pytest.approx(mean_sum / max_sum)


def test_concurrent_greedy_requests_equal_the_single_process_engine(stub, reference, controller):
    import ray

    max_tokens = 8
    [stats] = wait_router_idle(controller)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stub.Generate, greedy(ids, max_tokens), timeout=RPC_TIMEOUT) for ids in PROMPTS]
        responses = [f.result() for f in futures]
    [after] = ray.get(controller.router_stats.remote(), timeout=RPC_TIMEOUT)
    # They ran batched: one at a time would take max_tokens steps each.
    assert after["steps"] - stats["steps"] < len(PROMPTS) * max_tokens
    expected = reference.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for ids, got, want in zip(PROMPTS, responses, expected):
        assert list(got.token_ids) == want.token_ids, ids
        assert got.text == want.text
        assert got.finish_reason == pb2.FINISH_REASON_LENGTH
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), max_tokens)
    # Without ignore_eos, default sampling: the same as offline too (text prompts included).
    text = stub.Generate(pb2.GenerateRequest(text="Hello world, this is", sampling=pb2.SamplingParams(max_tokens=6)),
                         timeout=RPC_TIMEOUT)
    offline = reference.generate([reference.tokenizer.encode("Hello world, this is")], SamplingParams(max_tokens=6))[0]
    assert list(text.token_ids) == offline.token_ids and text.text == offline.text
    wait_router_idle(controller)


def test_stream_equals_unary(stub):
    request = greedy(PROMPTS[2], 10)
    request.return_logprobs = True
    unary = stub.Generate(request, timeout=RPC_TIMEOUT)
    messages = list(stub.GenerateStream(request, timeout=RPC_TIMEOUT))
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert [lp for m in messages for lp in m.logprobs] == pytest.approx(list(unary.logprobs), abs=1e-5)
    assert len(unary.logprobs) == 10
    assert messages[-1].finish_reason == unary.finish_reason == pb2.FINISH_REASON_LENGTH
    assert messages[-1].usage == unary.usage


def test_placement_hosts_every_expert_once(admin):
    placement = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=RPC_TIMEOUT)
    assert placement.plan_version == 1
    assert len(placement.workers) == NUM_WORKERS
    assert sorted(w.actor_name for w in placement.workers) == [f"expert-worker-{i}" for i in range(NUM_WORKERS)]
    assert len({w.worker_id for w in placement.workers}) == NUM_WORKERS
    hosted = [(r.layer, r.expert) for w in placement.workers for r in w.replicas]
    assert sorted(hosted) == [(layer, e) for layer in MOE_LAYERS for e in range(TINY.num_experts)]  # each once
    for w in placement.workers:
        assert w.state == admin_pb2.WORKER_STATE_READY
        assert w.device == "cpu" or w.device.startswith("cuda"), w.device
        assert w.replicas, f"{w.actor_name} hosts nothing"


def test_cancelled_stream_frees_its_sequence(stub, controller):
    import ray

    [before] = wait_router_idle(controller)
    call = stub.GenerateStream(greedy(PROMPTS[0], 100), timeout=RPC_TIMEOUT)
    next(call), next(call)
    [stats] = ray.get(controller.router_stats.remote(), timeout=RPC_TIMEOUT)
    assert stats["running"] == 1 and stats["kv_slots_used"] == 1
    call.cancel()
    [stats] = wait_router_idle(controller, timeout=10.0)
    assert stats["running"] == 0 and stats["kv_slots_used"] == 0
    assert stats["steps"] - before["steps"] < 100, "the request ran to the end instead of being cancelled"
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_bad_request_is_invalid_argument(stub):
    bad = greedy(PROMPTS[0], 4)
    bad.sampling.top_p = 0.0
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(bad, timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("sampling.top_p: ")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(greedy([TINY.vocab_size], 4), timeout=RPC_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt.token_ids: ")


def test_health_and_reflection(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "moeserve.v1.Generation", "moeserve.v1.ClusterAdmin"]:
        assert health.Check(health_pb2.HealthCheckRequest(service=service),
                            timeout=RPC_TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    assert {"moeserve.v1.Generation", "moeserve.v1.ClusterAdmin", "grpc.health.v1.Health"} <= set(db.get_services())
    admin_service = DescriptorPool(db).FindServiceByName("moeserve.v1.ClusterAdmin")
    assert {"GetPlacement", "GetExpertLoad"} <= {m.name for m in admin_service.methods}
    info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=RPC_TIMEOUT)
    assert list(info.moe_layers) == MOE_LAYERS and info.max_model_len == ENGINE.max_model_len


def test_cli_status_and_generate(target, reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The installed console script when it is on PATH (it is what operators run), else the same entry point.
    script = shutil.which("moe-serve")
    cli = [script] if script else [sys.executable, "-m", "cluster.cli"]
    ids = PROMPTS[2]
    # A router that is down comes first: both commands must fail over to the live one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
    targets = f"{down},{target}"
    # Both at once: each spends most of its time importing.
    status = subprocess.Popen([*cli, "status", "--target", targets], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    generate = subprocess.Popen([*cli, "generate", "--target", targets, "--json", "--prompt-ids",
                                 ",".join(map(str, ids)), "--max-tokens", "6", "--ignore-eos"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    status_out, status_err = status.communicate(timeout=120)
    generate_out, generate_err = generate.communicate(timeout=120)
    assert status.returncode == 0, status_err
    assert "plan version 1" in status_out and f"workers {NUM_WORKERS}" in status_out
    for i in range(NUM_WORKERS):
        assert f"expert-worker-{i}" in status_out
    assert "READY" in status_out
    assert "router-0  " in status_out and target.split(":")[1] in status_out  # the routers and their addresses
    assert f"{down}: UNAVAILABLE" in status_err and f"trying {target}" in status_err
    assert generate.returncode == 0, generate_err
    assert f"trying {target}" in generate_err
    [line] = generate_out.strip().splitlines()
    record = json.loads(line)
    expected = reference.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert record["token_ids"] == expected.token_ids
    assert record["text"] == expected.text
    assert record["finish_reason"] == "length"
    assert record["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6}


def test_greedy_chat_streamed_over_http_equals_the_engine_and_grpc(openai_client, stub, reference):
    """The OpenAI API on the cluster: a streamed chat completion through the expert workers gives the engine's
    greedy tokens on the chat template's prompt, and the same text as gRPC on those ids."""
    messages = [{"role": "user", "content": "Which expert computes this?"}]
    ids = reference.tokenizer.apply_chat_template(messages)
    expected = reference.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    chunks = list(openai_client.chat.completions.create(
        model=openai_client.models.list().data[0].id, messages=messages, max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == len(ids)
    g = stub.Generate(greedy(ids, 8), timeout=RPC_TIMEOUT)
    assert list(g.token_ids) == expected.token_ids and g.text == expected.text


def test_metrics_reach_the_ray_prometheus_endpoint(stub, controller, ray_metrics_port, openai_client):
    """After traffic, our ray.util.metrics appear (ray_ prefix) on the node's metrics endpoint with sane values;
    requests count by protocol, gRPC and HTTP."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    for ids in ([1, 2, 3], [4, 5]):
        stub.Generate(greedy(ids, 4), timeout=RPC_TIMEOUT)
    openai_client.completions.create(model=openai_client.models.list().data[0].id, prompt=[1, 2, 3], max_tokens=2)
    wanted = {"ray_moe_serve_requests", "ray_moe_serve_expert_tokens", "ray_moe_serve_workers",
              "ray_moe_serve_plan_version", "ray_moe_serve_time_to_first_token_seconds", "ray_moe_serve_kv_slots",
              "ray_moe_serve_generated_tokens", "ray_moe_serve_expert_replicas"}
    # Other test modules' clusters ran in the same Ray session and their last values may still be exported:
    # read this cluster's by the reporting process (Ray labels samples with its WorkerId), and wait for them.
    import ray

    from cluster.settings import NAMESPACE

    def worker_id(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_worker_id()))

    controller_id = worker_id(controller)
    router_id = worker_id(ray.get_actor("router-0", namespace=NAMESPACE))

    def value(sample_name, **labels):
        return sum(s.value for s in flat if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    deadline = time.monotonic() + 90  # routers export every 5 s; the agent scrapes on its own period
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).read().decode()
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(body):
            if family.name.startswith("ray_moe_serve"):
                samples.setdefault(family.name, []).extend(family.samples)
        flat = [s for family in samples.values() for s in family]
        ours = (value("ray_moe_serve_requests_total", code="OK", WorkerId=router_id) >= 2
                and value("ray_moe_serve_requests_total", code="200", protocol="http", WorkerId=router_id) >= 1
                and any(s.labels.get("WorkerId") == controller_id for s in samples.get("ray_moe_serve_workers", [])))
        if (wanted <= set(samples) and ours) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= set(samples), sorted(wanted - set(samples))

    assert value("ray_moe_serve_requests_total", code="OK", protocol="grpc", WorkerId=router_id) >= 2
    assert value("ray_moe_serve_requests_total", code="200", protocol="http", WorkerId=router_id) >= 1
    assert value("ray_moe_serve_workers", WorkerId=controller_id) == NUM_WORKERS
    assert value("ray_moe_serve_plan_version", WorkerId=controller_id) == 1
    assert value("ray_moe_serve_kv_slots", router="router-0", WorkerId=router_id) == ENGINE.max_num_seqs
    routed = [s for s in samples["ray_moe_serve_expert_tokens"] if s.name == "ray_moe_serve_expert_tokens_total"]
    assert routed and all(s.labels["layer"] in {str(l) for l in MOE_LAYERS} for s in routed)
    assert sum(s.value for s in routed) > 0
    ttft_count = value("ray_moe_serve_time_to_first_token_seconds_count")
    assert ttft_count >= 2
