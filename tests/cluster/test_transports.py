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
    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=3, port=0, engine=ENGINE,
                                                      transport=transport, rebalance_below_balancedness=None))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            futures = [stub.Generate.future(request(p, 10), timeout=120) for p in PROMPTS]
            assert [list(f.result().token_ids) for f in futures] == expected[10]
    finally:
        stop_cluster(controller)


def open_links(ray, controller) -> dict[str, int]:
    """Collective links each expert worker of the current plan serves, by actor name."""
    names = ray.get(controller.__ray_call__.remote(lambda c: [w.name for w in c.plan.workers]))
    return {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).open_links.remote()) for n in names}


def test_collective_links_follow_scale_out_and_scale_in(ray_session, tiny_model, expected):
    """Streams decode through plan v1 -> v2 (a third worker: a new link) -> v3 (back to two: its link closed);
    no request fails or changes, nothing is re-run as a failure, and every remaining worker serves one link."""
    import ray

    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=2, port=0, engine=ENGINE,
                                                      transport="collective", rebalance_below_balancedness=None))
    try:
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
        assert ray.get(controller.rebalance.remote("test scale-out", 3))["workers_after"] == 3
        assert open_links(ray, controller) == {"expert-worker-0": 1, "expert-worker-1": 1, "expert-worker-2": 1}
        back = ray.get(controller.rebalance.remote("test scale-in", 2))
        assert back["workers_after"] == 2
        for t in threads:
            t.join(timeout=180)
        assert errors == []
        assert results == expected[60]
        stats = ray.get(controller.router_stats.remote())[0]
        assert stats["plan_version"] == back["new_version"] and stats["recoveries"] == []
        assert open_links(ray, controller) == {"expert-worker-0": 1, "expert-worker-1": 1}  # worker 2 drained
    finally:
        stop_cluster(controller)
