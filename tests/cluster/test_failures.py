"""Failures on a real local Ray cluster: an expert worker or a router killed with SIGKILL mid-generation."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from cluster.autoscaler import AutoscalingPolicy
from cluster.controller import start_cluster, stop_cluster
from cluster.settings import NAMESPACE, ClusterSettings
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=256, max_num_seqs=8)
PROMPTS = [[5, 17, 300, 42], [7], [1000, 2000, 3000], [9, 9, 9, 9, 9]]
TOKENS = 80


@pytest.fixture(scope="module", params=["socket", "collective"])
def cluster(ray_session, tiny_model, request):
    """A cluster per data plane: each must notice a dead peer at once (a closed connection), not hang."""
    settings = ClusterSettings(model=tiny_model, num_workers=2, port=0, engine=ENGINE, transport=request.param,
                               rebalance_below_balancedness=None, autoscaling=AutoscalingPolicy(interval_seconds=0.5))
    controller, ports = start_cluster(settings)
    try:
        yield controller, ports[0]
    finally:
        stop_cluster(controller)


@pytest.fixture(scope="module")
def expected(tiny_model):
    engine = load_engine(tiny_model, ENGINE)
    return [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True))]


def request(ids, n=TOKENS):
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids), sampling=pb2.SamplingParams(max_tokens=n, ignore_eos=True))


def start_streams(port, prompts, results, errors, first_tokens):
    def one(i, ids):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            tokens = []
            try:
                for msg in pb2_grpc.GenerationStub(channel).GenerateStream(request(ids), timeout=180):
                    tokens += msg.token_ids
                    first_tokens.set()
                results[i] = tokens
            except grpc.RpcError as err:
                errors[i] = err.code()

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads


def test_killed_worker_loses_no_request(cluster, expected):
    import ray

    controller, port = cluster
    worker = ray.get_actor("expert-worker-0", namespace=NAMESPACE)
    pid = ray.get(worker.info.remote())["pid"]
    results, errors, started = [None] * len(PROMPTS), [None] * len(PROMPTS), threading.Event()
    threads = start_streams(port, PROMPTS, results, errors, started)
    assert started.wait(60)
    time.sleep(0.3)  # mid-generation
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert errors == [None] * len(PROMPTS)
    assert results == expected  # every request completed, with the same tokens as without the failure
    # worker 0 held the only replica of its experts: routers waited for a replacement (recovery measured)
    stats = ray.get(controller.router_stats.remote())[0]
    assert stats["recoveries"] and all(r["seconds"] < 60 for r in stats["recoveries"])
    print(f"\nrecovery: {max(r['seconds'] for r in stats['recoveries']):.2f} s for "
          f"{sum(r['pairs'] for r in stats['recoveries'])} pairs")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        placement = admin_grpc.ClusterAdminStub(channel).GetPlacement(admin_pb2.GetPlacementRequest())
    names = [w.actor_name for w in placement.workers]
    assert "expert-worker-0" not in names and len(names) == 2 and placement.plan_version >= 2
    events = ray.get(controller.plan_events.remote())
    assert any((e["reason"], e["detail"]) == ("worker-failure", "worker 0 failed") for e in events)


def test_killed_router_restarts_and_serves_again(cluster):
    import ray

    controller, port = cluster
    pid = ray.get(ray.get_actor("router-0", namespace=NAMESPACE).__ray_call__.remote(lambda self: os.getpid()))
    results, errors, started = [None], [None], threading.Event()
    threads = start_streams(port, PROMPTS[:1], results, errors, started)
    assert started.wait(60)
    os.kill(pid, signal.SIGKILL)
    threads[0].join(timeout=60)
    assert errors[0] == grpc.StatusCode.UNAVAILABLE  # retryable
    deadline = time.monotonic() + 90
    while True:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = pb2_grpc.GenerationStub(channel).Generate(request(PROMPTS[1], 4), timeout=10)
            break
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err
            assert time.monotonic() < deadline, "router did not come back"
            time.sleep(0.5)
    assert len(response.token_ids) == 4
    if ray.get(controller.__ray_call__.remote(lambda c: c.settings.transport)) == "collective":
        # the dead router's links ended on the workers (closed connections), the new router's are served
        workers = ray.get(controller.__ray_call__.remote(lambda c: list(c.workers.values())))
        assert ray.get([w.open_links.remote() for w in workers]) == [1] * len(workers)
