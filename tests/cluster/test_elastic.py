"""Elastic experts on a real local Ray cluster: skewed load, live rebalancing, scale-out and scale-in.

The tiny model has 3 MoE layers x 8 experts, top-2. A routing bias on expert 3
sends every token there (plus one other expert), so with one replica each the
worker hosting expert 3 runs over half of every layer's pairs.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.autoscaler import AutoscalingPolicy, PlanChangeReason
from cluster.controller import start_cluster, stop_cluster
from cluster.settings import ClusterSettings
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

HOT = 3
ENGINE = EngineSettings(max_model_len=128, max_num_seqs=16, routing_bias={HOT: 6.0})
PROMPTS = [[5, 17, 300, 42], [7], [1000, 2000, 3000, 4000, 5000, 6000], [9, 9, 9], [123, 456], [77, 78, 79, 80, 81]]


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model):
    settings = ClusterSettings(model=tiny_model, num_workers=2, port=0, engine=ENGINE, load_window_seconds=600,
                               rebalance_below_balancedness=None, migration_weight=0.05, plan_deadline_seconds=3,
                               autoscaling=AutoscalingPolicy(interval_seconds=0.5))
    controller, ports = start_cluster(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}")
    try:
        yield controller, pb2_grpc.GenerationStub(channel), admin_grpc.ClusterAdminStub(channel)
    finally:
        channel.close()
        stop_cluster(controller)


@pytest.fixture(scope="module")
def expected(tiny_model):
    """Greedy tokens of the single-process engine with the same routing bias."""
    engine = load_engine(tiny_model, ENGINE)
    return [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))]


def request(ids, max_tokens=12):
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                               sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def generate_all(stub, prompts=PROMPTS, max_tokens=12):
    futures = [stub.Generate.future(request(p, max_tokens), timeout=120) for p in prompts]
    return [list(f.result().token_ids) for f in futures]


def hot_replicas(placement) -> dict[int, int]:
    """Replicas of the hot expert per MoE layer."""
    counts: dict[int, int] = {}
    for w in placement.workers:
        for r in w.replicas:
            if r.expert == HOT:
                counts[r.layer] = counts.get(r.layer, 0) + 1
    return counts


def test_skewed_load_rebalances_and_outputs_stay_identical(cluster, expected):
    controller, stub, admin = cluster
    assert generate_all(stub) == expected
    load = admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest())
    before = admin.GetPlacement(admin_pb2.GetPlacementRequest())
    assert set(hot_replicas(before).values()) == {1}
    # expert 3 takes one of the two slots of every token: the worker hosting it runs > half of each layer
    assert load.balancedness < 0.8, load.balancedness

    response = admin.Rebalance(admin_pb2.RebalanceRequest(reason="test skew"))
    assert response.new_plan_version == response.old_plan_version + 1
    assert response.balancedness_before == pytest.approx(load.balancedness)
    assert response.balancedness_after >= 0.8
    assert response.bytes_moved > 0

    after = admin.GetPlacement(admin_pb2.GetPlacementRequest())
    assert after.plan_version == response.new_plan_version
    assert sum(hot_replicas(after).values()) > len(hot_replicas(before)), hot_replicas(after)  # the hot expert gained
    hosted = {(r.layer, r.expert) for w in after.workers for r in w.replicas}
    assert hosted == {(l, e) for l in (1, 2, 3) for e in range(8)}  # no logical expert lost
    assert generate_all(stub) == expected  # replicas are exact copies
    # the recorded balancedness is what the load now gives on the new plan
    assert admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest()).balancedness >= 0.8
    events = __import__("ray").get(controller.plan_events.remote())
    assert (events[-1]["reason"], events[-1]["detail"]) == ("manual", "test skew")
    assert events[-1]["bytes_moved"] == response.bytes_moved and not events[-1]["dropped"]


def _stream_all(stub, prompts, max_tokens, results, errors):
    def one(i, ids):
        try:
            tokens = []
            for msg in stub.GenerateStream(request(ids, max_tokens), timeout=180):
                tokens += msg.token_ids
            results[i] = tokens
        except grpc.RpcError as err:  # recorded, asserted empty by the test
            errors.append(f"{err.code().name}: {err.details()}")

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads


def test_streams_run_through_scale_out_and_scale_in(cluster, tiny_model):
    controller, stub, admin = cluster
    ray = __import__("ray")
    engine = load_engine(tiny_model, ENGINE)
    long = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=60, ignore_eos=True))]
    results, errors = [None] * len(PROMPTS), []
    threads = _stream_all(stub, PROMPTS, 60, results, errors)
    time.sleep(0.5)  # streams are decoding
    out = ray.get(controller.rebalance.remote(PlanChangeReason.SCALE_OUT, "test", 3))
    assert out["workers_after"] == 3 and out["started"] == [2] and out["drained"] == []
    placement = admin.GetPlacement(admin_pb2.GetPlacementRequest())
    assert [w.actor_name for w in placement.workers][-1] == "expert-worker-2"
    assert len(placement.workers) == 3 and all(w.replicas for w in placement.workers)
    back = ray.get(controller.rebalance.remote(PlanChangeReason.SCALE_IN, "test", 2))
    assert back["workers_after"] == 2 and back["started"] == [] and back["drained"] == [2]
    for t in threads:
        t.join(timeout=180)
    assert errors == []
    assert results == long  # no request failed or changed through two plan changes
    placement = admin.GetPlacement(admin_pb2.GetPlacementRequest())
    assert len(placement.workers) == 2 and placement.plan_version == back["new_version"]
    names = {w.actor_name for w in placement.workers}
    assert "expert-worker-2" not in names or len(names) == 2


def test_autoscaling_policy_scales_out_under_load(cluster):
    controller, stub, admin = cluster
    policy = admin.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest())
    workers_before = len(admin.GetPlacement(admin_pb2.GetPlacementRequest()).workers)
    # any traffic is "hot": 1 routed token/s per worker is above the high watermark
    policy.enabled, policy.min_workers, policy.max_workers = True, 2, workers_before + 1
    policy.high_watermark_tokens_per_worker_per_second, policy.low_watermark_tokens_per_worker_per_second = 1.0, 0.5
    policy.cooldown_seconds = 0
    assert admin.SetAutoscalingPolicy(policy).enabled
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            generate_all(stub, max_tokens=4)
            if len(admin.GetPlacement(admin_pb2.GetPlacementRequest()).workers) > workers_before:
                break
        assert len(admin.GetPlacement(admin_pb2.GetPlacementRequest()).workers) == workers_before + 1
    finally:
        policy.enabled = False
        admin.SetAutoscalingPolicy(policy)


def test_invalid_autoscaling_policy_is_rejected(cluster):
    _, _, admin = cluster
    bad = admin_pb2.AutoscalingPolicy(min_workers=4, max_workers=2, high_watermark_tokens_per_worker_per_second=10,
                                      low_watermark_tokens_per_worker_per_second=1)
    with pytest.raises(grpc.RpcError) as err:
        admin.SetAutoscalingPolicy(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_workers" in err.value.details()


def test_admin_answers_while_a_plan_is_computed_and_a_late_plan_is_dropped(cluster):
    """The planner runs beside the controller's event loop: with the plan computation parked (an
    instrumented hold, not a timing), admin calls still answer; a plan that outlives the deadline
    (3 s in this cluster's settings) is dropped and nothing changes."""
    controller, stub, admin = cluster
    ray = __import__("ray")

    def held_rebalance(reason):
        ray.get(controller.hold_planning.remote())
        future = admin.Rebalance.future(admin_pb2.RebalanceRequest(reason=reason), timeout=120)
        deadline = time.monotonic() + 60
        while not ray.get(controller.planning.remote()):
            assert time.monotonic() < deadline, "the plan computation never started"
            time.sleep(0.05)
        return future

    future = held_rebalance("held")
    try:
        version = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30).plan_version
        assert admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=30).plan_version == version
        assert admin.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest(), timeout=30).max_workers >= 1
        assert ray.get(controller.planning.remote())  # still parked: the answers came while it planned
    finally:
        ray.get(controller.release_planning.remote())
    assert not future.result().dropped

    future = held_rebalance("late")
    time.sleep(3.5)  # past the plan deadline
    ray.get(controller.release_planning.remote())
    late = future.result()
    assert late.dropped and late.new_plan_version == late.old_plan_version
    assert admin.GetPlacement(admin_pb2.GetPlacementRequest()).plan_version == late.old_plan_version
    assert late.old_plan_version >= version
    event = ray.get(controller.plan_events.remote())[-1]
    assert (event["reason"], event["detail"], event["dropped"]) == ("manual", "late", True)
