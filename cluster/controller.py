"""The controller: a detached, named Ray actor that owns the placement plan and the fleet.

It builds the initial plan, starts expert workers (each asking Ray for the
resources it means: a GPU where the cluster has them, a fraction of a CPU
otherwise) and routers, answers ClusterAdmin through the routers, and changes
the plan live:

    rebalance (versioned, never stalls decode):
      1. plan v+1 from routing load (cluster.planner), new workers started first
      2. workers load their added replicas in the background and report ready
      3. every router switches to v+1 at a step boundary and acknowledges
      4. only then workers unload removed replicas; drained workers stop
    autoscale: every `interval_seconds` the policy (cluster.autoscaler) turns
      routed load per worker into a worker count; a change is a rebalance.

Concurrency: a Ray async actor; every method runs on the actor's event loop,
except the planner call, which runs on a worker thread (`_compute_plan`) so
that admin calls answer while a plan is computed. `_plan_lock` serialises plan
changes (rebalances and worker replacements), so `plan` is only replaced under
it. A Rebalance call waits for a change under way and then plans from fresh
load; an automatic evaluation that finds the lock held skips its turn instead
of queueing behind it, and a dead worker the control loop finds is replaced in
a task of its own. A plan whose computation outlives `plan_deadline_seconds`
(default: the load window) is dropped, not rolled out. Everything else (plan,
workers, states, events) is read and written on the event loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import re
import threading
import time

import ray
from pydantic import ValidationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.autoscaler import AutoscalingPolicy, PlanChangeReason, ScalingState, desired_workers, routed_tokens
from cluster.planner import (PlannerInput, balancedness, expert_groups, initial_plan, plan_change, worker_load,
                             worker_name)
from cluster.planner import plan as make_plan
from cluster.process_env import actor_runtime_env
from cluster.settings import CONTROLLER_NAME, NAMESPACE, ClusterSettings
from expert_workers.spec import load_spec
from expert_workers.worker import ExpertWorker
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.errors import InvalidRequest
from router_service.metrics import ControllerMetrics
from router_service.placement import PlacementPlan, WorkerPlacement, by_layer
from router_service.router import Router

log = logging.getLogger(__name__)

# AutoscalingPolicy fields whose name in the proto message says the unit.
_POLICY_WIRE_NAMES = {"high_watermark": "high_watermark_tokens_per_worker_per_second",
                      "low_watermark": "low_watermark_tokens_per_worker_per_second"}


def _policy_error(err: ValidationError) -> InvalidRequest:
    """A SetAutoscalingPolicy request's first problem, naming fields as the proto message does."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "policy"  # no loc: a rule across fields (its message names them)
    message = first["msg"].removeprefix("Value error, ")
    for ours, wire in _POLICY_WIRE_NAMES.items():
        message = re.sub(rf"\b{ours}\b", wire, message)
    return InvalidRequest(_POLICY_WIRE_NAMES.get(field, field), message)


class PausePoint:
    """A place in a plan change where the controller parks while a test holds it, so that what the controller
    does meanwhile (answer admin calls, skip an evaluation, report STARTING/DRAINING/DEAD workers, drop a late
    plan) is observed without timing. Nothing holds one outside tests; passing it then costs one flag check.

    Thread-safe (threading.Event): held and released by actor methods on the event loop, passed on the
    planner's thread (`wait`) or on the event loop (`wait_async`, which parks on a thread so the loop runs on)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._parked = threading.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def parked(self) -> bool:
        """Whether the controller is waiting here now."""
        return self._parked.is_set()

    def wait(self) -> None:
        """Pass the point, blocking this thread while it is held."""
        if self._open.is_set():
            return
        self._parked.set()
        try:
            self._open.wait()
        finally:
            self._parked.clear()

    async def wait_async(self) -> None:
        if not self._open.is_set():
            await asyncio.to_thread(self.wait)


class Controller:
    def __init__(self, settings: dict, router_node_id: str | None = None):
        self.settings = ClusterSettings(**settings)
        # Routers run where `moe-serve serve` runs (the head pod on KubeRay), which is where clients reach them.
        self.router_node_id = router_node_id
        self.model_dir = self.settings.model
        self.policy = self.settings.autoscaling
        self.plan: PlacementPlan | None = None
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self.worker_info: dict[int, dict] = {}
        self.routers: list[ray.actor.ActorHandle] = []
        self.ports: list[int] = []  # routers' gRPC ports, by router index
        self.http_ports: list[int | None] = []  # and their HTTP ports (None: HTTP off)
        self.events: list[dict] = []  # every plan change with its reason, for status and tests
        self._plan_lock = asyncio.Lock()
        # Worker states other than READY, by worker id: DRAINING while a rollout removes the worker, DEAD
        # from a failure report until its replacement is in the plan. `starting`: workers a rollout is
        # starting, not yet in the plan (STARTING). Both are changed on the event loop only.
        self.worker_states: dict[int, int] = {}
        self.starting: dict[int, WorkerPlacement] = {}
        self.plan_deadline_seconds = self.settings.plan_deadline_seconds or self.settings.load_window_seconds
        # Test instrumentation (see hold): "plan" is passed on the planner's thread just before it plans,
        # "switch" on the event loop once a plan change's workers hold their replicas, before routers switch.
        self.pauses = {"plan": PausePoint(), "switch": PausePoint()}
        # Control-loop turns, and those skipped because a plan change held _plan_lock (control_stats).
        self.evaluations = 0
        self.evaluations_skipped = 0
        self._scaling = ScalingState()
        self._last_rebalance = 0.0
        # The id of the next worker to start. Ids (and so Ray actor names) are never reused: a killed
        # actor's name can stay taken for a while, and routers know workers by id.
        self._next_worker_id = 0
        self._loop_task: asyncio.Task | None = None
        # Replacements of dead workers that the control loop found, by worker id (see _check_fleet).
        self._replacing: dict[int, asyncio.Task] = {}

    # --- start-up ----------------------------------------------------------------------------

    def _worker_gpus(self) -> float:
        if self.settings.worker_num_gpus is not None:
            return self.settings.worker_num_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    async def _start_workers(self, workers: list[WorkerPlacement]) -> None:
        """Start worker actors hosting `workers`' replicas and wait until each has loaded them."""
        s = self.settings
        cls = ray.remote(ExpertWorker)
        handles = {}
        for w in workers:
            # max_concurrency: reference-transport `run` calls keep flowing while `load_replicas` reads weights.
            handles[w.worker_id] = cls.options(
                name=w.name, namespace=NAMESPACE, num_cpus=s.worker_num_cpus, num_gpus=self._worker_gpus(),
                max_concurrency=4, runtime_env=actor_runtime_env(),
            ).remote(w.worker_id, self.model_dir, w.hosted(), self.dtype, s.torch_threads, s.data_plane_host,
                     s.replica_load_duty)
        infos = await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in handles.values()]),
                                       s.start_timeout_seconds)
        self.workers.update(handles)
        self.worker_info.update({i["worker_id"]: i for i in infos})

    def router_engine_settings(self) -> dict:
        """The routers' engine settings, with the dtype the workers were given."""
        return self.settings.engine.model_copy(update={"dtype": self.dtype}).model_dump()

    async def start(self) -> list[int]:
        """Start workers then routers; returns the routers' gRPC ports."""
        s = self.settings
        spec = load_spec(self.model_dir)
        self.spec = spec
        # Resolved once, here, for workers and routers alike: "auto" looks at this node's CPU and GPU, and a
        # router deciding on different hardware than its workers would cast every dispatch both ways.
        self.dtype = str(s.engine.torch_dtype(spec.dtype, s.engine.torch_device())).removeprefix("torch.")
        self.expert_bytes = spec.expert_bytes(4 if self.dtype == "float32" else 2)
        logical = len(spec.logical_experts)
        self.slots_per_worker = s.replica_slots_per_worker or math.ceil(logical * 1.25 / s.num_workers)
        self.plan = initial_plan(spec, s.num_workers)
        self._next_worker_id = max(w.worker_id for w in self.plan.workers) + 1
        self.metrics = ControllerMetrics()
        await self._start_workers(list(self.plan.workers))
        router_cls = ray.remote(Router)
        for r in range(s.num_routers):
            port = s.port + r if s.port else 0
            http_port = None if s.http_port is None else (s.http_port + r if s.http_port else 0)
            # Ray restarts a killed router; the control loop then starts it again (see _check_routers).
            placement = {}
            if self.router_node_id:
                placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.router_node_id, soft=False)
            self.routers.append(router_cls.options(name=f"router-{r}", namespace=NAMESPACE, **placement,
                                                   num_cpus=s.router_num_cpus, max_restarts=-1,
                                                   runtime_env=actor_runtime_env()).remote(
                r, self.model_dir, self.router_engine_settings(), self.plan, s.host, port, NAMESPACE,
                CONTROLLER_NAME, s.load_window_seconds, s.router_torch_threads, s.transport, http_port))
        bound = await asyncio.wait_for(asyncio.gather(*[r.start.remote() for r in self.routers]),
                                       s.start_timeout_seconds)
        self.ports, self.http_ports = [b["grpc"] for b in bound], [b["http"] for b in bound]
        self.metrics.plan(self.plan)
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop())
        log.info("cluster up: %d workers, routers on ports %s", len(self.workers), self.ports)
        return self.ports

    # --- load --------------------------------------------------------------------------------

    async def load(self, seconds: float | None = None) -> dict[tuple[int, int], int]:
        """Tokens per logical expert over the window (or its last `seconds`), summed over routers."""
        totals = await asyncio.gather(*[r.expert_load.remote(seconds) for r in self.routers])
        out: dict[tuple[int, int], int] = {}
        for per_router in totals:
            for li, layer in enumerate(self.plan.moe_layers):
                for e, n in enumerate(per_router[li]):
                    out[(layer, e)] = out.get((layer, e), 0) + n
        return out

    # --- plan changes ------------------------------------------------------------------------

    async def rebalance(self, reason: PlanChangeReason | str, detail: str = "",
                        num_workers: int | None = None) -> dict:
        """Plan v+1 from the current load (and worker count) and roll it out; returns the change record,
        which is also appended to `events`.

        Waits for a plan change under way, then plans from the load at that time (the control loop, which
        must not wait, checks `_plan_lock` first). A plan whose computation outlives `plan_deadline_seconds`
        is dropped: the load it was planned from is stale by then, so rolling it out would place replicas
        for traffic that has moved on. The record then says `dropped` and the plan in force stays."""
        try:
            reason = PlanChangeReason(reason)  # the enum, or its value (the metric label)
        except ValueError:
            raise ValueError(f"reason: {reason!r} is not a PlanChangeReason, expected one of "
                             f"{[r.value for r in PlanChangeReason]} (free text goes in detail)") from None
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        async with self._plan_lock:
            try:
                return await self._change_plan(reason, detail, num_workers)
            finally:
                # Every attempt (rolled out, nothing better found, dropped, failed) starts the cooldown of
                # automatic rebalancing, so a plan that cannot help, or a planner slower than its deadline,
                # is not recomputed on every control-loop turn.
                self._last_rebalance = time.monotonic()

    async def _change_plan(self, reason: PlanChangeReason, detail: str, num_workers: int | None) -> dict:
        """rebalance's work, under `_plan_lock`."""
        old = self.plan
        load = await self.load()
        target = num_workers or len(old.workers)
        drain = frozenset(w.worker_id for w in old.workers[target:]) if target < len(old.workers) else frozenset()
        # Planning runs in a worker thread, so admin calls keep answering on the event loop meanwhile.
        began = time.monotonic()
        new = await asyncio.to_thread(self._compute_plan, PlannerInput(
            load=load, num_workers=target, slots_per_worker=max(self.slots_per_worker, math.ceil(
                len(self.spec.logical_experts) / target)),
            expert_bytes=self.expert_bytes, current=old, migration_weight=self.settings.migration_weight,
            drain=drain, groups=expert_groups(self.spec)))
        planning = time.monotonic() - began
        new = self._with_fresh_ids(old, new)
        record = {"reason": reason.value, "detail": detail, "old_version": old.version,
                  "new_version": new.version, "balancedness_before": balancedness(old, load),
                  "balancedness_after": balancedness(new, load), "bytes_moved": 0,
                  "workers_before": len(old.workers), "workers_after": len(new.workers),
                  "planning_seconds": planning, "seconds": 0.0, "dropped": False}
        if planning > self.plan_deadline_seconds:
            record.update(new_version=old.version, balancedness_after=record["balancedness_before"],
                          workers_after=len(old.workers), dropped=True)
            self.events.append(record)
            self.metrics.plan_dropped(reason.value)
            log.warning("plan for %s (%s) took %.1f s, over its %.1f s deadline: dropped, plan v%d stays",
                        reason.value, detail, planning, self.plan_deadline_seconds, old.version)
            return record
        if new is old:
            return record
        started = time.perf_counter()
        change = plan_change(old, new, self.expert_bytes)
        record["bytes_moved"] = change.bytes_moved
        leaving = [w.worker_id for w in old.workers if w.worker_id not in {n.worker_id for n in new.workers}]
        self.worker_states.update({wid: admin_pb2.WORKER_STATE_DRAINING for wid in leaving})
        # 1-2. new workers start with their replicas; existing ones load additions; serving continues.
        fresh = [w for w in new.workers if w.worker_id not in self.workers]
        record.update(started=[w.worker_id for w in fresh], drained=leaving)
        self.starting.update({w.worker_id: w for w in fresh})
        # Seconds per step of the rollout (planning, new workers, loads, routers' switch, unloads): where a
        # plan change spends its time, for `moe-serve bench rebalance` and the events.
        phases = record["phases"] = {"planning": planning}
        mark = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[phase], mark = now - mark, now

        try:
            await self._start_workers(fresh)
            lap("start_workers")
            await asyncio.gather(*[self.workers[wid].load_replicas.remote(by_layer(added))
                                   for wid, added in change.added.items()
                                   if wid not in {w.worker_id for w in fresh}])
            lap("load")
            await self.pauses["switch"].wait_async()
            mark = time.perf_counter()  # a held pause is a test's, not the rollout's
            # 3. every router switches at a step boundary and acknowledges.
            await asyncio.gather(*[r.set_plan.remote(new) for r in self.routers])
            lap("switch")
        except BaseException:  # the rollout failed: the old plan stays, and so do its workers
            for wid in leaving:
                self.worker_states.pop(wid, None)
            raise
        finally:
            for w in fresh:
                self.starting.pop(w.worker_id, None)
        self.plan = new
        # 4. no router sends tokens to removed replicas any more: unload them, stop drained workers.
        await asyncio.gather(*[self.workers[wid].unload_replicas.remote(by_layer(removed))
                               for wid, removed in change.removed.items() if wid not in leaving])
        lap("unload")
        for wid in leaving:
            if (handle := self.workers.pop(wid, None)) is not None:
                ray.kill(handle)
            self.worker_info.pop(wid, None)
            self.worker_states.pop(wid, None)
        record["seconds"] = time.perf_counter() - started
        self.events.append(record)
        self.metrics.plan(new)
        self.metrics.rebalanced(reason.value)
        log.info("plan v%d -> v%d (%s: %s): workers %d -> %d, balancedness %.3f -> %.3f, %d bytes moved in "
                 "%.2f s (planned in %.2f s)", old.version, new.version, reason.value, detail, len(old.workers),
                 len(new.workers), record["balancedness_before"], record["balancedness_after"],
                 record["bytes_moved"], record["seconds"], planning)
        return record

    def _with_fresh_ids(self, old: PlacementPlan, new: PlacementPlan) -> PlacementPlan:
        """`new` with every worker that `old` lacks under an id never used before. The planner numbers new
        workers after the current plan's, which would give the next scale-out the id of a worker a scale-in
        just stopped."""
        current = {w.worker_id for w in old.workers}
        if all(w.worker_id in current for w in new.workers):
            return new
        workers = []
        for w in new.workers:
            if w.worker_id not in current:
                w = WorkerPlacement(self._next_worker_id, worker_name(self._next_worker_id), w.replicas)
                self._next_worker_id += 1
            workers.append(w)
        return dataclasses.replace(new, workers=tuple(workers))

    def _compute_plan(self, inp: PlannerInput) -> PlacementPlan:
        """The planner call, on a worker thread (see rebalance); it reads only `inp` and settings."""
        self.pauses["plan"].wait()
        return make_plan(self.settings.placement_policy, inp)

    # Instrumentation for tests: hold a pause point ("plan" or "switch", see __init__), see the controller
    # parked there, release it. They only touch threading.Events, so any thread may run them.
    def hold(self, point: str) -> None:
        self._pause(point).hold()

    def release(self, point: str) -> None:
        self._pause(point).release()

    def parked(self, point: str) -> bool:
        return self._pause(point).parked()

    def _pause(self, point: str) -> PausePoint:
        if point not in self.pauses:
            raise ValueError(f"point: unknown pause point {point!r}, expected one of {sorted(self.pauses)}")
        return self.pauses[point]

    def control_stats(self) -> dict:
        """Control-loop turns so far, and how many skipped because a plan change was under way."""
        return {"evaluations": self.evaluations, "evaluations_skipped": self.evaluations_skipped}

    async def worker_failed(self, worker_id: int) -> None:
        """A router saw `worker_id` fail: replace it with a new worker hosting the same replicas.

        Routers re-run the failed pairs on other replicas meanwhile, and wait for this plan
        where the dead worker held the only replica. The dead worker is reported DEAD until then."""
        if any(w.worker_id == worker_id for w in self.plan.workers):
            self.worker_states[worker_id] = admin_pb2.WORKER_STATE_DEAD
        async with self._plan_lock:
            old = self.plan
            lost = next((w for w in old.workers if w.worker_id == worker_id), None)
            if lost is None:  # already replaced (several routers report the same death)
                return
            started = time.perf_counter()
            self.workers.pop(worker_id, None)
            self.worker_info.pop(worker_id, None)
            new_id, self._next_worker_id = self._next_worker_id, self._next_worker_id + 1
            replacement = WorkerPlacement(new_id, worker_name(new_id), lost.replicas)
            workers = tuple(replacement if w.worker_id == worker_id else w for w in old.workers)
            new = PlacementPlan(old.version + 1, old.num_experts, old.moe_layers, workers)
            self.starting[new_id] = replacement  # STARTING until routers use the plan that has it
            try:
                await self._start_workers([replacement])
                await self.pauses["switch"].wait_async()
                await asyncio.gather(*[r.set_plan.remote(new) for r in self.routers], return_exceptions=True)
            finally:
                self.starting.pop(new_id, None)
            self.plan = new
            self.worker_states.pop(worker_id, None)
            reason = PlanChangeReason.WORKER_FAILURE
            record = {"reason": reason.value, "detail": f"worker {worker_id} failed", "old_version": old.version,
                      "new_version": new.version, "bytes_moved": len(lost.replicas) * self.expert_bytes,
                      "workers_before": len(old.workers), "workers_after": len(new.workers),
                      "seconds": time.perf_counter() - started, "dropped": False}
            self.events.append(record)
            self.metrics.plan(new)
            self.metrics.rebalanced(reason.value)
            log.warning("expert worker %d failed: replaced by %d with its %d replicas in %.2f s (plan v%d)",
                        worker_id, new_id, len(lost.replicas), record["seconds"], new.version)

    async def _check_fleet(self) -> None:
        """Liveness: replace workers that died while idle; start routers that Ray restarted."""
        for wid, handle in list(self.workers.items()):
            if wid in self._replacing:
                continue
            try:
                await asyncio.wait_for(handle.stats.remote(), 10)
            except Exception:
                # Replaced in a task of its own: the replacement waits for any plan change under way, and
                # the rest of this loop's work (routers, the next evaluation) must not wait with it.
                task = asyncio.get_running_loop().create_task(self.worker_failed(wid))
                self._replacing[wid] = task
                task.add_done_callback(functools.partial(self._replaced, wid))
        for i, router in enumerate(self.routers):
            try:
                stats = await asyncio.wait_for(router.stats.remote(), 10)
            except Exception:  # restarting: try again next round
                continue
            if not stats["started"]:
                log.warning("router-%d was restarted by Ray; starting it on port %d", i, self.ports[i])
                await router.start.remote(self.plan, self.ports[i], self.http_ports[i])

    def _replaced(self, worker_id: int, task: asyncio.Task) -> None:
        """Done callback of a replacement task started by _check_fleet."""
        self._replacing.pop(worker_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("replacing expert worker %d failed", worker_id, exc_info=task.exception())

    async def _control_loop(self) -> None:
        """Fleet liveness, autoscaling and automatic rebalancing, evaluated every policy interval."""
        while True:
            await asyncio.sleep(self.policy.interval_seconds)
            try:
                await self._check_fleet()
                await self._evaluate()
            except Exception:  # a failed evaluation must not stop the next one
                log.exception("control loop evaluation failed")

    def _routed_tokens(self, load: dict[tuple[int, int], int]) -> float:
        """Tokens through the model in `load` (which counts (token, expert) pairs): the unit of the
        watermarks and of rebalance_min_tokens."""
        return routed_tokens(sum(load.values()), self.spec.moe.top_k, len(self.spec.moe_layers))

    async def _evaluate(self) -> None:
        """One control-loop turn: refresh the load gauges, then change the plan if the policy asks for it.

        A turn that finds a plan change under way (a Rebalance call, a worker replacement) skips the decision
        rather than queue behind it: it would act on load measured before that change, and the next turn
        sees fresh load. A decided change starts the cooldown however it ends (see rebalance), so a planner
        slower than its deadline is not restarted on every turn."""
        s, policy = self.settings, self.policy
        self.evaluations += 1
        rate_window = max(policy.interval_seconds, policy.sustain_seconds, 1.0)
        recent, window = await asyncio.gather(self.load(rate_window), self.load())
        self.metrics.plan(self.plan)  # gauges set only on change would expire in Ray's exporter: refresh them
        self.metrics.load(balancedness(self.plan, window),
                          {str(w): t / s.load_window_seconds for w, t in worker_load(self.plan, window).items()})
        # No await from this check to rebalance() taking the lock, so no change can start in between.
        if self._plan_lock.locked():
            self.evaluations_skipped += 1
            log.debug("control loop: a plan change is under way, this turn skips its decision")
            return
        rate = self._routed_tokens(recent) / rate_window
        min_workers = max(policy.min_workers, math.ceil(len(self.spec.logical_experts) / self.slots_per_worker))
        bounded = policy.model_copy(update={"min_workers": min(min_workers, policy.max_workers)})
        decision = desired_workers(bounded, len(self.plan.workers), rate, self._scaling, time.monotonic())
        self._scaling = decision.state
        if decision.workers != len(self.plan.workers):
            await self.rebalance(decision.reason or PlanChangeReason.BOUNDS, decision.detail, decision.workers)
            return
        threshold = s.rebalance_below_balancedness
        if (threshold and self._routed_tokens(window) >= s.rebalance_min_tokens
                and time.monotonic() - self._last_rebalance >= policy.cooldown_seconds
                and balancedness(self.plan, window) < threshold):
            await self.rebalance(PlanChangeReason.AUTO_BALANCEDNESS, f"balancedness below {threshold}")

    # --- ClusterAdmin --------------------------------------------------------------------------

    def placement(self) -> admin_pb2.Placement:
        """The plan in force, each worker with its state (READY, DRAINING while a rollout removes it, DEAD from
        a failure until its replacement is in the plan), then the workers a plan change is starting (STARTING,
        with the replicas they will host, until routers use the plan that has them)."""
        msg = admin_pb2.Placement(plan_version=self.plan.version)
        in_plan = {p.worker_id for p in self.plan.workers}
        starting = [w for wid, w in sorted(self.starting.items()) if wid not in in_plan]
        for w in [*self.plan.workers, *starting]:
            info = self.worker_info.get(w.worker_id, {})
            state = (admin_pb2.WORKER_STATE_STARTING if w.worker_id in self.starting
                     else self.worker_states.get(w.worker_id, admin_pb2.WORKER_STATE_READY))
            msg.workers.add(worker_id=str(w.worker_id), actor_name=w.name, node_id=info.get("node_id", ""),
                            device=info.get("device", ""), state=state,
                            replicas=[admin_pb2.ExpertRef(layer=l, expert=e) for l, e in w.replicas])
        return msg

    async def expert_load(self) -> admin_pb2.ExpertLoad:
        load = await self.load()
        counts = self.plan.replica_count()
        msg = admin_pb2.ExpertLoad(window_seconds=self.settings.load_window_seconds, plan_version=self.plan.version,
                                   balancedness=balancedness(self.plan, load))
        for (layer, expert), tokens in sorted(load.items()):
            msg.experts.add(layer=layer, expert=expert, tokens=tokens, replicas=counts.get((layer, expert), 0))
        for wid, tokens in worker_load(self.plan, load).items():
            msg.workers.add(worker_id=str(wid), tokens=round(tokens))
        return msg

    def _policy_message(self) -> admin_pb2.AutoscalingPolicy:
        p = self.policy
        return admin_pb2.AutoscalingPolicy(
            min_workers=p.min_workers, max_workers=p.max_workers,
            high_watermark_tokens_per_worker_per_second=p.high_watermark,
            low_watermark_tokens_per_worker_per_second=p.low_watermark, cooldown_seconds=p.cooldown_seconds,
            enabled=p.enabled)

    async def admin(self, method: str, payload: bytes) -> bytes:
        """ClusterAdmin as (method, serialized request) -> serialized response."""
        if method == "GetPlacement":
            return self.placement().SerializeToString()
        if method == "GetExpertLoad":
            return (await self.expert_load()).SerializeToString()
        if method == "Rebalance":
            request = admin_pb2.RebalanceRequest.FromString(payload)
            r = await self.rebalance(PlanChangeReason.MANUAL, request.reason)
            return admin_pb2.RebalanceResponse(
                old_plan_version=r["old_version"], new_plan_version=r["new_version"],
                balancedness_before=r["balancedness_before"], balancedness_after=r["balancedness_after"],
                bytes_moved=r["bytes_moved"], dropped=r["dropped"]).SerializeToString()
        if method == "GetAutoscalingPolicy":
            return self._policy_message().SerializeToString()
        if method == "SetAutoscalingPolicy":
            m = admin_pb2.AutoscalingPolicy.FromString(payload)
            try:
                self.policy = self.policy.model_copy(update=AutoscalingPolicy(
                    **{**self.policy.model_dump(), "enabled": m.enabled, "min_workers": m.min_workers,
                       "max_workers": m.max_workers, "high_watermark": m.high_watermark_tokens_per_worker_per_second,
                       "low_watermark": m.low_watermark_tokens_per_worker_per_second,
                       "cooldown_seconds": m.cooldown_seconds}).model_dump())
            except ValidationError as err:
                raise _policy_error(err) from None
            log.info("autoscaling policy set: %s", self.policy)
            return self._policy_message().SerializeToString()
        raise InvalidRequest("method", f"unknown ClusterAdmin method {method!r}")

    async def plan_events(self) -> list[dict]:
        return list(self.events)

    def endpoints(self) -> list[dict]:
        """Each router's ports: [{"router": index, "grpc": port, "http": port or None}]."""
        return [{"router": i, "grpc": g, "http": h} for i, (g, h) in enumerate(zip(self.ports, self.http_ports))]

    async def router_stats(self) -> list[dict]:
        return await asyncio.gather(*[r.stats.remote() for r in self.routers])

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._replacing.values()):
            task.cancel()
        await asyncio.gather(*[r.stop.remote() for r in self.routers], return_exceptions=True)
        for handle in [*self.routers, *self.workers.values()]:
            ray.kill(handle)
        self.routers, self.workers = [], {}


def start_cluster(settings: ClusterSettings) -> tuple[ray.actor.ActorHandle, list[int]]:
    """Create the detached controller (Ray must be initialised) and bring the cluster up."""
    if settings.model is None:
        from cluster.make_model import default_model_dir

        settings = settings.model_copy(update={"model": str(default_model_dir())})
    controller = ray.remote(Controller).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=64,
    ).remote(settings.model_dump(), ray.get_runtime_context().get_node_id())
    ports = ray.get(controller.start.remote())
    return controller, ports


def stop_cluster(controller: ray.actor.ActorHandle) -> None:
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
