"""Every transport gives the same tokens, and the collective transport's links follow plan changes.

Each transport's cluster is compared with the single-process engine, so the three
(Ray calls, sockets, torch.distributed links over gloo) give tokens identical to one
another. On this CPU-only machine the collective transport runs its gloo backend.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.autoscaler import PlanChangeReason
from cluster.controller import start_cluster, stop_cluster
from cluster.settings import NAMESPACE, ClusterSettings
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=128, max_num_seqs=8)
PROMPTS = [[5, 17, 300, 42], [7], [1000, 2000, 3000, 4000, 5000], [9, 9]]


@pytest.fixture(scope="module")
def expected(tiny_model):
    engine = load_engine(tiny_model, ENGINE)
    return {n: [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True))]
            for n in (10, 60)}


def request(ids, max_tokens):
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                               sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


@pytest.mark.parametrize("transport", ["ray", "socket", "collective"])
def test_transport_matches_the_single_process_engine(ray_session, tiny_model, expected, transport):
    """Then a worker answers with an error (a replica the plan gives it is gone): that step's request fails,
    retryably, but the worker is alive, so it is neither taken for dead nor replaced, and serves the next step
    at once (nothing left waiting on its connection)."""
    import ray

    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=3, port=0, engine=ENGINE,
                                                      transport=transport, rebalance_below_balancedness=None))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            futures = [stub.Generate.future(request(p, 10), timeout=120) for p in PROMPTS]
            assert [list(f.result().token_ids) for f in futures] == expected[10]

            worker = ray.get_actor("expert-worker-0", namespace=NAMESPACE)
            hosted = ray.get(worker.info.remote())["hosted"]
            ray.get(worker.unload_replicas.remote(hosted))
            with pytest.raises(grpc.RpcError) as failed:
                stub.Generate(request(PROMPTS[2], 4), timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "not hosted" in failed.value.details()
            ray.get(worker.load_replicas.remote(hosted))
            started = time.monotonic()
            futures = [stub.Generate.future(request(p, 10), timeout=30) for p in PROMPTS]
            assert [list(f.result().token_ids) for f in futures] == expected[10]
            assert time.monotonic() - started < 20  # a stale reply would hold the next step for the 60 s timeout
        assert ray.get(controller.router_stats.remote())[0]["recoveries"] == []
        assert not [e for e in ray.get(controller.plan_events.remote()) if e["reason"] == "worker-failure"]
    finally:
        stop_cluster(controller)


@pytest.fixture(scope="module")
def live_and_dead_worker(ray_session, tiny_model):
    """Two bare expert workers hosting a few experts of the first MoE layer; the second one killed."""
    import ray

    from expert_workers.checkpoint import Checkpoint
    from expert_workers.worker import ExpertWorker

    layer = Checkpoint(tiny_model).spec.moe_layers[0]
    cls = ray.remote(ExpertWorker)
    workers = [cls.options(num_cpus=0).remote(w, tiny_model, {layer: [0, 1]}, "float32") for w in (0, 1)]
    ray.get([w.info.remote() for w in workers], timeout=120)
    ray.kill(workers[1])
    # ray.kill only asks: until the actor is gone it may still answer (and hand out an endpoint), even a call
    # made after the kill, so ask until its death is visible to callers before the test connects.
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(workers[1].info.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed worker still answers after 60 s"
        time.sleep(0.2)
    yield layer, *workers
    ray.kill(workers[0])


@pytest.mark.parametrize("transport", ["socket", "collective"])
def test_connect_leaves_out_a_dead_worker(live_and_dead_worker, transport):
    """A plan can name a worker that died meanwhile: connecting still reaches the others (the dead one's calls
    then fail, and the dispatcher re-runs them elsewhere) instead of failing the plan switch."""
    import torch

    from router_service.transports import make_transport

    layer, live, dead = live_and_dead_worker
    t = make_transport(transport)
    try:
        t.connect({0: live, 1: dead})
        args = (layer, torch.randn(2, 64), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
        (out,) = t.collect([t.submit(0, *args)])
        assert out.shape == (2, 64)
        with pytest.raises(KeyError):
            t.submit(1, *args)
        if transport == "collective":
            assert t._failed == {1}  # not asked again at the next plan
    finally:
        t.close()


def open_links(ray, controller) -> dict[str, int]:
    """Collective links each expert worker of the current plan serves, by actor name."""
    names = ray.get(controller.__ray_call__.remote(lambda c: [w.name for w in c.plan.workers]))
    return {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).open_links.remote()) for n in names}


@pytest.mark.parametrize("transport", ["ray", "socket", "collective"])
def test_endpoints_follow_scale_out_and_scale_in_under_load(ray_session, tiny_model, expected, transport):
    """Streams decode through plan v1 -> v2 (a third worker: a new endpoint) -> v3 (back to two: its endpoint
    dropped); no request fails or changes tokens, nothing is re-run as a failure, and with the collective
    transport every remaining worker serves one link."""
    import ray

    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=2, port=0, engine=ENGINE,
                                                      transport=transport, rebalance_below_balancedness=None))
    collective = transport == "collective"
    try:
        if collective:
            assert open_links(ray, controller) == {"expert-worker-0": 1, "expert-worker-1": 1}
        results, errors = [None] * len(PROMPTS), []

        def one(i, ids):
            with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                try:
                    results[i] = [t for m in pb2_grpc.GenerationStub(channel).GenerateStream(request(ids, 60),
                                                                                             timeout=180)
                                  for t in m.token_ids]
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")

        threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # streams are decoding
        assert ray.get(controller.rebalance.remote(PlanChangeReason.SCALE_OUT, "test", 3))["workers_after"] == 3
        if collective:
            assert open_links(ray, controller) == {"expert-worker-0": 1, "expert-worker-1": 1, "expert-worker-2": 1}
        back = ray.get(controller.rebalance.remote(PlanChangeReason.SCALE_IN, "test", 2))
        assert back["workers_after"] == 2
        for t in threads:
            t.join(timeout=180)
        assert errors == []
        assert results == expected[60]
        stats = ray.get(controller.router_stats.remote())[0]
        assert stats["plan_version"] == back["new_version"] and stats["recoveries"] == []
        if collective:
            assert open_links(ray, controller) == {"expert-worker-0": 1, "expert-worker-1": 1}  # worker 2 drained
    finally:
        stop_cluster(controller)
