"""Elastic experts on a real local Ray cluster: skewed load, live rebalancing, scale-out and scale-in, admin
calls while a plan is computed, a plan dropped past its deadline, and the worker states GetPlacement reports.

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
                               rebalance_below_balancedness=None, migration_weight=0.05, plan_deadline_seconds=8,
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
    phases = events[-1]["phases"]  # where the rollout's time went, step by step
    assert list(phases) == ["planning", "start_workers", "load", "switch", "unload"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) - phases["planning"] <= events[-1]["seconds"]


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


def in_plan(admin) -> int:
    """Workers of the plan in force (GetPlacement also lists those a plan change is STARTING)."""
    placement = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)
    return sum(w.state != admin_pb2.WORKER_STATE_STARTING for w in placement.workers)


def test_autoscaling_policy_scales_out_under_load(cluster):
    controller, stub, admin = cluster
    policy = admin.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest())
    workers_before = in_plan(admin)
    # any traffic is "hot": 1 routed token/s per worker is above the high watermark
    policy.enabled, policy.min_workers, policy.max_workers = True, 2, workers_before + 1
    policy.high_watermark_tokens_per_worker_per_second, policy.low_watermark_tokens_per_worker_per_second = 1.0, 0.5
    policy.cooldown_seconds = 0
    assert admin.SetAutoscalingPolicy(policy).enabled
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            generate_all(stub, max_tokens=4)
            if in_plan(admin) > workers_before:
                break
        assert in_plan(admin) == workers_before + 1
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
    assert err.value.details() == "policy: min_workers (4) exceeds max_workers (2)"  # the message, no traceback
    # a field is named as the proto message names it, unit included
    bad.min_workers, bad.high_watermark_tokens_per_worker_per_second = 1, 0
    with pytest.raises(grpc.RpcError) as err:
        admin.SetAutoscalingPolicy(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "high_watermark_tokens_per_worker_per_second: Input should be greater than 0"


def wait_until(condition, what, timeout=60):
    """Poll `condition()` until true (a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def parked(controller, point):
    return __import__("ray").get(controller.parked.remote(point))


def states(placement) -> dict[str, str]:
    return {w.actor_name: admin_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_") for w in placement.workers}


def scraped(port: int, name: str, **labels) -> float:
    """Sum of the samples of metric `name` with `labels` on the session's Ray metrics endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(body) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_admin_answers_while_a_plan_is_computed_and_a_late_plan_is_dropped(cluster, ray_metrics_port):
    """The planner runs beside the controller's event loop. With a Rebalance's plan computation parked at
    the controller's "plan" pause point (instrumentation, not a timing), every admin call answers, and the
    control loop skips its turns instead of queueing behind the plan. Parked past this cluster's 8 s plan
    deadline, the plan is dropped when it completes: nothing changes, and the Rebalance answer says so."""
    controller, stub, admin = cluster
    ray = __import__("ray")
    before = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)
    workers = len(before.workers)
    policy = admin.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest(), timeout=30)
    ray.get(controller.hold.remote("plan"))
    try:
        future = admin.Rebalance.future(admin_pb2.RebalanceRequest(reason="late"), timeout=120)
        wait_until(lambda: parked(controller, "plan"), "the plan computation starting")
        placement = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)
        assert placement.plan_version == before.plan_version
        assert admin.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=30).plan_version == before.plan_version
        # A policy whose bounds ask for one more worker: the control loop would rebalance at its next turn.
        wanted = admin_pb2.AutoscalingPolicy()
        wanted.CopyFrom(policy)
        wanted.min_workers = wanted.max_workers = workers + 1
        assert admin.SetAutoscalingPolicy(wanted, timeout=30).min_workers == workers + 1
        assert admin.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest(), timeout=30) == wanted
        # It skips instead: two more skipped turns show the loop running on, not waiting on the plan lock.
        skipped = ray.get(controller.control_stats.remote())["evaluations_skipped"]
        wait_until(lambda: ray.get(controller.control_stats.remote())["evaluations_skipped"] >= skipped + 2,
                   "two control-loop turns skipping")
        assert parked(controller, "plan")  # every answer above came while the plan was being computed
        assert not future.done()
        time.sleep(8.5)  # keep it parked past the plan deadline
    finally:
        ray.get(controller.release.remote("plan"))
    late = future.result()
    assert late.dropped and late.new_plan_version == late.old_plan_version == before.plan_version
    assert late.balancedness_after == late.balancedness_before and late.bytes_moved == 0
    event = ray.get(controller.plan_events.remote())[-1]
    assert (event["reason"], event["detail"], event["dropped"]) == ("manual", "late", True)
    assert event["planning_seconds"] > 3

    # The skipped decision is taken at a later turn, from fresh load: the bounds add a worker.
    try:
        wait_until(lambda: in_plan(admin) == workers + 1, "the bounds' scale-out")
        event = ray.get(controller.plan_events.remote())[-1]
        assert (event["reason"], event["dropped"], event["workers_after"]) == ("bounds", False, workers + 1)
    finally:  # the policy as it was, with room for the worker it added (else a bounds scale-in would follow)
        policy.max_workers = max(policy.max_workers, workers + 1)
        admin.SetAutoscalingPolicy(policy, timeout=30)

    # Counted by reason in moe_serve_plans_dropped_total (exported every few seconds).
    wait_until(lambda: scraped(ray_metrics_port, "ray_moe_serve_plans_dropped_total", reason="manual") >= 1,
               "the dropped plan reaching the metrics endpoint", timeout=90)


def test_workers_are_reported_starting_draining_and_dead(cluster, expected):
    """GetPlacement's worker states over a scale-out, a scale-in and a worker's death, each seen with the
    plan change parked at the controller's "switch" pause point (workers ready, routers not yet switched)."""
    controller, stub, admin = cluster
    ray = __import__("ray")

    def held(start_change):
        """Start a plan change with "switch" held; return (placement while parked, ObjectRef or None)."""
        ray.get(controller.hold.remote("switch"))
        try:
            ref = start_change()
            wait_until(lambda: parked(controller, "switch"), "the plan change reaching the switch")
            return admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30), ref
        finally:
            ray.get(controller.release.remote("switch"))

    before = admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)
    names = [w.actor_name for w in before.workers]
    assert set(states(before).values()) == {"READY"}

    during, ref = held(lambda: controller.rebalance.remote(PlanChangeReason.SCALE_OUT, "test", len(names) + 1))
    out = ray.get(ref)
    assert len(out.get("started", [])) == 1, out
    [fresh] = out["started"]
    new_name = f"expert-worker-{fresh}"
    assert during.plan_version == before.plan_version  # not in force yet
    assert states(during) == {**{n: "READY" for n in names}, new_name: "STARTING"}
    assert during.workers[-1].replicas  # listed with the replicas it will host
    assert states(admin.GetPlacement(admin_pb2.GetPlacementRequest())) == {n: "READY" for n in [*names, new_name]}

    during, ref = held(lambda: controller.rebalance.remote(PlanChangeReason.SCALE_IN, "test", len(names)))
    back = ray.get(ref)
    assert back.get("drained") == [fresh], back  # the record says why otherwise (dropped: planned past the deadline)
    assert states(during) == {**{n: "READY" for n in names}, new_name: "DRAINING"}
    assert states(admin.GetPlacement(admin_pb2.GetPlacementRequest())) == {n: "READY" for n in names}

    victim = names[0]
    during, _ = held(lambda: ray.kill(ray.get_actor(victim)))  # the control loop's liveness check finds it
    [replacement] = [n for n in states(during) if n not in names]
    assert replacement != new_name  # a fresh id, not the one the scale-in just stopped
    assert states(during) == {**{n: "READY" for n in names[1:]}, victim: "DEAD", replacement: "STARTING"}
    wait_until(lambda: states(admin.GetPlacement(admin_pb2.GetPlacementRequest()))
               == {**{n: "READY" for n in names[1:]}, replacement: "READY"}, "the replacement in force")
    event = ray.get(controller.plan_events.remote())[-1]
    assert event["reason"] == "worker-failure"
    assert generate_all(stub) == expected  # the replacement serves the dead worker's replicas
