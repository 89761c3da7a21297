"""The cluster over several Ray nodes on one machine: each node its own raylet with its own resources, added to the
session's Ray cluster (conftest's ray_cluster) and removed again.

Routers run on the nodes that carry `router_resource`, expert workers on those that carry `worker_resource`, so
every dispatch crosses nodes (TCP data plane). Checked: the engine's greedy tokens; a router node that joins gets a
router and one that leaves disturbs no other; an expert node killed under load (its raylet and its workers with
it) loses no request, and the controller replaces its workers on the nodes left; a re-plan spreads every replicated
expert over both expert nodes, so that losing one leaves a copy.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.autoscaler import AutoscalingPolicy
from cluster.controller import start_cluster, stop_cluster
from cluster.settings import NAMESPACE, ClusterSettings, router_name
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=256, max_num_seqs=8)
PROMPTS = [[5, 17, 300, 42], [7], [1000, 2000, 3000], [9, 9, 9, 9, 9], [11, 12], [400]]
TOKENS = 60
ROUTER, EXPERT = "test_router_node", "test_expert_node"  # the custom resources that mark the two kinds of node


@pytest.fixture(scope="module")
def nodes(ray_cluster):
    """One router node and two expert nodes, beside the head (which carries neither resource)."""
    # The router node declares a GPU (Ray takes the count on trust; torch finds no CUDA and computes on the CPU):
    # routers ask for one (router_num_gpus), as on GPU router pods.
    added = {"router": ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={ROUTER: 1}),
             "expert_a": ray_cluster.add_node(num_cpus=1, resources={EXPERT: 1}),
             "expert_b": ray_cluster.add_node(num_cpus=1, resources={EXPERT: 1})}
    ray_cluster.wait_for_nodes()
    yield added
    for node in added.values():
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)


@pytest.fixture(scope="module")
def cluster(nodes, tiny_model):
    settings = ClusterSettings(model=tiny_model, num_workers=4, port=0, engine=ENGINE, router_resource=ROUTER,
                               worker_resource=EXPERT, router_num_gpus=1, worker_num_gpus=0,
                               rebalance_below_balancedness=None,
                               migration_weight=0.0,  # moves are free: a re-plan replicates the hot experts
                               autoscaling=AutoscalingPolicy(interval_seconds=0.5))
    controller, _ = start_cluster(settings)
    try:
        yield controller
    finally:
        stop_cluster(controller)


@pytest.fixture(scope="module")
def expected(tiny_model):
    engine = load_engine(tiny_model, ENGINE)
    return [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True))]


def placement(target: str) -> admin_pb2.Placement:
    with grpc.insecure_channel(target) as channel:
        return admin_grpc.ClusterAdminStub(channel).GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)


def stream_all(target, results, errors, started):
    def one(i, ids):
        request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                                      sampling=pb2.SamplingParams(max_tokens=TOKENS, ignore_eos=True))
        with grpc.insecure_channel(target) as channel:
            tokens = []
            try:
                for msg in pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=300):
                    tokens += msg.token_ids
                    started.set()
                results[i] = tokens
            except grpc.RpcError as err:
                errors[i] = f"{err.code().name}: {err.details()}"

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    return threads


def generate(target):
    results, errors, started = [None] * len(PROMPTS), [None] * len(PROMPTS), threading.Event()
    for t in stream_all(target, results, errors, started):
        t.join(300)
    assert errors == [None] * len(PROMPTS)
    return results


def wait_for(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.5)
    return got


def first_router(controller) -> str:
    import ray

    e = ray.get(controller.endpoints.remote(), timeout=30)[0]
    return f"{e['address']}:{e['grpc']}"


def test_routers_and_workers_run_on_their_nodes_and_give_the_engines_tokens(cluster, nodes, expected):
    target = first_router(cluster)
    p = placement(target)
    assert [r.node_id for r in p.routers] == [nodes["router"].node_id]
    expert_nodes = {nodes["expert_a"].node_id, nodes["expert_b"].node_id}
    assert {w.node_id for w in p.workers} == expert_nodes, "workers must spread over both expert nodes"
    import ray

    router = ray.get_actor(router_name(int(p.routers[0].router_id)), namespace=NAMESPACE)
    assert ray.get(router.__ray_call__.remote(lambda self: __import__("ray").get_gpu_ids()), timeout=30) == [0]
    assert generate(target) == expected


def test_a_replan_spreads_every_replicated_expert_over_both_expert_nodes(cluster, expected):
    target = first_router(cluster)
    assert generate(target) == expected  # routing load for the planner
    with grpc.insecure_channel(target) as channel:
        admin_grpc.ClusterAdminStub(channel).Rebalance(admin_pb2.RebalanceRequest(reason="test spread"), timeout=120)
    p = placement(target)
    nodes_of: dict[tuple[int, int], list[str]] = {}  # logical expert -> the node of each of its replicas
    for w in p.workers:
        for r in w.replicas:
            nodes_of.setdefault((r.layer, r.expert), []).append(w.node_id)
    replicated = {x: set(n) for x, n in nodes_of.items() if len(n) > 1}
    assert replicated, "the re-plan replicated nothing: nothing to check"
    assert all(len(n) == 2 for n in replicated.values()), {x: n for x, n in replicated.items() if len(n) < 2}
    assert generate(target) == expected


def test_a_router_node_that_joins_gets_a_router_and_one_that_leaves_disturbs_no_other(
        ray_cluster, cluster, nodes, expected):
    target = first_router(cluster)
    joined = ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={ROUTER: 1})
    ray_cluster.wait_for_nodes()
    new = wait_for("a router on the node that joined", lambda: [
        r for r in placement(target).routers if r.node_id == joined.node_id])
    assert generate(new[0].grpc_address) == expected

    results, errors, started = [None] * len(PROMPTS), [None] * len(PROMPTS), threading.Event()
    threads = stream_all(target, results, errors, started)
    assert started.wait(60)
    ray_cluster.remove_node(joined, allow_graceful=False)
    for t in threads:
        t.join(300)
    assert errors == [None] * len(PROMPTS) and results == expected
    wait_for("the lost node's router dropped", lambda: [r.node_id for r in placement(target).routers]
             == [nodes["router"].node_id])


def test_an_expert_node_killed_under_load_loses_no_request_and_its_workers_are_replaced(
        ray_cluster, cluster, nodes, expected):
    target = first_router(cluster)
    before = placement(target)
    lost = {w.worker_id for w in before.workers if w.node_id == nodes["expert_b"].node_id}
    assert lost
    results, errors, started = [None] * len(PROMPTS), [None] * len(PROMPTS), threading.Event()
    threads = stream_all(target, results, errors, started)
    assert started.wait(60)
    killed_at = time.monotonic()
    ray_cluster.remove_node(nodes["expert_b"], allow_graceful=False)  # its raylet and its workers, at once
    for t in threads:
        t.join(300)
    assert errors == [None] * len(PROMPTS)
    assert results == expected, "a request in flight lost tokens with the node"

    def replaced():
        p = placement(target)
        ids = {w.worker_id for w in p.workers}
        return p if (not ids & lost and len(ids) == len(before.workers)
                     and all(w.state == admin_pb2.WORKER_STATE_READY for w in p.workers)) else None

    after = wait_for("the lost node's workers replaced", replaced)
    print(f"workers of the lost node replaced {time.monotonic() - killed_at:.1f} s after it was killed")
    assert {w.node_id for w in after.workers} == {nodes["expert_a"].node_id}
    assert sorted((r.layer, r.expert) for w in after.workers for r in w.replicas) == \
        sorted((r.layer, r.expert) for w in before.workers for r in w.replicas)
    assert generate(target) == expected
