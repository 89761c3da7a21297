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
import os
import pickle
import re
import threading
import time

import ray
from pydantic import ValidationError
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.autoscaler import AutoscalingPolicy, PlanChangeReason, ScalingState, desired_workers, routed_tokens
from cluster.planner import (WORKER_PREFIX, PlanChange, PlannerInput, balancedness, expert_groups, initial_plan,
                             plan_change, worker_load, worker_name)
from cluster.planner import plan as make_plan
from cluster.process_env import actor_runtime_env
from cluster.settings import CONTROLLER_NAME, NAMESPACE, ROUTER_PREFIX, ClusterSettings, router_name
from expert_workers.spec import load_spec
from expert_workers.worker import ExpertWorker
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.errors import ControllerUnavailable, InvalidRequest
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


@dataclasses.dataclass(frozen=True)
class RouterEntry:
    """One router as the controller and clients know it."""

    router_id: int
    node_id: str  # the Ray node it is pinned to
    address: str  # the host clients dial: the node's IP when routers bind every interface, else the bind host
    grpc_port: int
    http_port: int | None  # None: HTTP off

    @property
    def name(self) -> str:
        return router_name(self.router_id)

    def endpoint(self) -> dict:
        return {"router": self.router_id, "name": self.name, "node_id": self.node_id, "address": self.address,
                "grpc": self.grpc_port, "http": self.http_port}


@dataclasses.dataclass(frozen=True)
class ControllerState:
    """What a restarted controller needs to carry on with nothing restarted: written to Ray's key-value store
    (in the GCS) at every change of the plan, the fleet or the policy, and read back by `Controller.recover`."""

    plan: PlacementPlan  # the plan in force, or the one routers are being switched to
    next_worker_id: int
    next_router_id: int
    routers: tuple[RouterEntry, ...]
    retired_nodes: frozenset[str]  # nodes whose routers were drained on request (a router pod going away)
    policy: dict  # AutoscalingPolicy fields
    events: tuple[dict, ...]  # the latest plan changes (status, tests)


STATE_KEY = b"controller-state"  # in Ray's internal KV store, namespace NAMESPACE
EVENTS_KEPT = 100  # plan changes a restarted controller still reports


def cluster_actor_names() -> list[str]:
    """Names of this project's live named actors (controller, routers, expert workers) in NAMESPACE."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and (a["name"] == CONTROLLER_NAME
                                                or a["name"].startswith((ROUTER_PREFIX, WORKER_PREFIX)))]


def _actor_or_none(name: str) -> ray.actor.ActorHandle | None:
    """The live actor of that name in NAMESPACE, or None (it died, or its node went)."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _actor_id(name: str, prefix: str) -> int | None:
    tail = name.removeprefix(prefix)
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


class Controller:
    def __init__(self, settings: dict, router_node_id: str | None = None):
        self.settings = ClusterSettings(**settings)
        # Without router_resource, routers run where `moe-serve serve` runs (this node's id).
        self.router_node_id = router_node_id
        self.model_dir = self.settings.model
        self.policy = self.settings.autoscaling
        self.plan: PlacementPlan | None = None
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self.worker_info: dict[int, dict] = {}
        self.routers: dict[int, RouterEntry] = {}  # by router id
        self.router_handles: dict[int, ray.actor.ActorHandle] = {}
        self.retired_nodes: set[str] = set()
        self._next_router_id = 0
        self.events: list[dict] = []  # plan changes with their reasons (the latest EVENTS_KEPT), for status and tests
        self._plan_lock = asyncio.Lock()
        # Worker states other than READY, by worker id: DRAINING while a rollout removes the worker, DEAD
        # from a failure report until its replacement is in the plan. `starting`: workers a rollout is
        # starting, not yet in the plan (STARTING). Both are changed on the event loop only.
        self.worker_states: dict[int, int] = {}
        self.starting: dict[int, WorkerPlacement] = {}
        self.plan_deadline_seconds = self.settings.plan_deadline_seconds or self.settings.load_window_seconds
        # Test instrumentation (see hold): "plan" is passed on the planner's thread just before it plans,
        # "switch" on the event loop once a plan change's workers hold their replicas, before routers switch;
        # "recorded" just after its new plan is written to the KV store (_record), before routers switch.
        self.pauses = {"plan": PausePoint(), "switch": PausePoint(), "recorded": PausePoint()}
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
        # Set once start() or recover() has the plan and the fleet; calls that need them wait for it.
        self._ready = asyncio.Event()
        self.recovered_seconds: float | None = None  # how long the last recovery took (control_stats)
        # The plan a change under way has written to the KV store ahead of the routers' switch (None between
        # changes): every _persist writes it, not the plan in force, until the change commits or rolls back.
        self._recorded: PlacementPlan | None = None
        self._unrecoverable: str | None = None  # why recover gave up; _until_ready raises it at once
        # Set by shutdown: a plan change still running then starts no actor and writes no state (its deletion
        # must stick, and actors started after the fleet was stopped would be detached orphans).
        self._shutting_down = False
        context = ray.get_runtime_context() if ray.is_initialized() else None  # None: a test of the body
        if context and context.get_actor_id() is not None and context.was_current_actor_reconstructed:
            # Ray restarted this actor after its process died: recover runs as this actor's first call, once
            # the constructor has returned. Workers and routers are detached, so they lived on meanwhile.
            self._recovery = context.current_actor.recover_or_exit.remote()

    # --- start-up ----------------------------------------------------------------------------

    def _worker_gpus(self) -> float:
        if self.settings.worker_num_gpus is not None:
            return self.settings.worker_num_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    async def _start_workers(self, workers: list[WorkerPlacement]) -> None:
        """Start worker actors hosting `workers`' replicas and wait until each has loaded them."""
        s = self.settings
        if self._shutting_down:
            raise ControllerUnavailable("the cluster is shutting down: no worker is started")
        self._persist()  # the ids handed out so far, before an actor holds one: a restart never reuses them
        cls = ray.remote(ExpertWorker)
        resources = {s.worker_resource: 0.001} if s.worker_resource else {}
        handles = {}
        for w in workers:
            # Detached: a worker outlives the controller's death (Ray restarts the controller, which finds it
            # again). SPREAD: workers go to different nodes where they can, so a lost node takes fewer.
            # max_concurrency: reference-transport `run` calls keep flowing while `load_replicas` reads weights.
            handles[w.worker_id] = cls.options(
                name=w.name, namespace=NAMESPACE, lifetime="detached", num_cpus=s.worker_num_cpus,
                num_gpus=self._worker_gpus(), resources=resources, scheduling_strategy="SPREAD",
                max_concurrency=4, runtime_env=actor_runtime_env(),
            ).remote(w.worker_id, self.model_dir, w.hosted(), self.dtype, s.torch_threads, s.data_plane_host,
                     s.replica_load_duty)
        try:
            infos = await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in handles.values()]),
                                           s.start_timeout_seconds)
        except BaseException:
            for h in handles.values():  # detached: nothing else would ever stop them
                ray.kill(h)
            raise
        self.workers.update(handles)
        self.worker_info.update({i["worker_id"]: i for i in infos})

    def router_engine_settings(self) -> dict:
        """The routers' engine settings, with the dtype the workers were given."""
        return self.settings.engine.model_copy(update={"dtype": self.dtype}).model_dump()

    def _configure(self) -> None:
        """What start and recover both derive from the settings and the checkpoint."""
        s = self.settings
        spec = load_spec(self.model_dir)
        self.spec = spec
        # Resolved once, here, for workers and routers alike: "auto" looks at this node's CPU and GPU, and a
        # router deciding on different hardware than its workers would cast every dispatch both ways.
        self.dtype = str(s.engine.torch_dtype(spec.dtype, s.engine.torch_device())).removeprefix("torch.")
        self.expert_bytes = spec.expert_bytes(4 if self.dtype == "float32" else 2)
        logical = len(spec.logical_experts)
        self.slots_per_worker = s.replica_slots_per_worker or math.ceil(logical * 1.25 / s.num_workers)
        self.metrics = ControllerMetrics()

    async def start(self) -> list[int]:
        """Start workers then routers; returns the routers' gRPC ports."""
        self._configure()
        self.plan = initial_plan(self.spec, self.settings.num_workers)
        self._next_worker_id = max(w.worker_id for w in self.plan.workers) + 1
        await self._start_workers(list(self.plan.workers))
        nodes = self._router_nodes()
        if not nodes:
            raise RuntimeError(f"no alive Ray node has the router resource {self.settings.router_resource!r}")
        await self._start_routers(nodes)
        self._persist()
        self.metrics.plan(self.plan)
        self._ready.set()
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop())
        log.info("cluster up: %d workers, routers at %s", len(self.workers),
                 ", ".join(f"{r.address}:{r.grpc_port}" for r in self.routers.values()))
        return [r.grpc_port for r in self.routers.values()]

    # --- routers -----------------------------------------------------------------------------

    def _router_nodes(self) -> dict[str, str]:
        """The alive nodes that should host routers, node id -> IP: those with router_resource, or the node
        `moe-serve serve` runs on; less the nodes whose routers were retired."""
        resource = self.settings.router_resource
        return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()
                if n["Alive"] and n["NodeID"] not in self.retired_nodes
                and (n["Resources"].get(resource, 0) > 0 if resource else n["NodeID"] == self.router_node_id)}

    def _router_ports(self, address: str, taken: list[RouterEntry]) -> tuple[int, int | None]:
        """The next router's gRPC and HTTP ports on `address`: the base ports, counted up past those of the
        routers already there (several routers on one node, or several nodes on one machine, as in tests).
        A base of 0 stays 0: each router picks a free port."""
        s = self.settings
        grpc_used = {r.grpc_port for r in taken if r.address == address}
        http_used = {r.http_port for r in taken if r.address == address}
        rank = 0
        while ((s.port and s.port + rank in grpc_used)
               or (s.http_port and s.http_port + rank in http_used)):
            rank += 1
        grpc_port = s.port + rank if s.port else 0
        http_port = None if s.http_port is None else (s.http_port + rank if s.http_port else 0)
        return grpc_port, http_port

    async def _start_routers(self, nodes: dict[str, str]) -> None:
        """Start num_routers routers on each of `nodes` (node id -> IP), pinned there, and wait until they serve.

        Called under _plan_lock or before the control loop runs, so no plan change misses a starting router."""
        s = self.settings
        if self._shutting_down:
            raise ControllerUnavailable("the cluster is shutting down: no router is started")
        cls = ray.remote(Router)
        every_interface = s.host in ("0.0.0.0", "::", "")
        starting: dict[int, tuple[RouterEntry, ray.actor.ActorHandle]] = {}
        for node_id, ip in nodes.items():
            for _ in range(s.num_routers):
                rid, self._next_router_id = self._next_router_id, self._next_router_id + 1
                address = ip if every_interface else s.host
                grpc_port, http_port = self._router_ports(
                    address, [*self.routers.values(), *(e for e, _ in starting.values())])
                # Detached, so it outlives the controller; Ray restarts it after a crash and the control loop
                # then starts it again (see _check_routers). Pinned: clients know it by its node's address.
                handle = cls.options(
                    name=router_name(rid), namespace=NAMESPACE, lifetime="detached", num_cpus=s.router_num_cpus,
                    num_gpus=s.router_num_gpus,
                    max_restarts=-1, runtime_env=actor_runtime_env(),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(rid, self.model_dir, self.router_engine_settings(), self.plan, s.host, grpc_port,
                         NAMESPACE, CONTROLLER_NAME, s.load_window_seconds, s.router_torch_threads, s.transport,
                         http_port)
                starting[rid] = (RouterEntry(rid, node_id, address, grpc_port, http_port), handle)
        self._persist()  # the router ids handed out
        bound = await asyncio.gather(*[asyncio.wait_for(h.start.remote(), s.start_timeout_seconds)
                                       for _, h in starting.values()], return_exceptions=True)
        failed = []
        for (rid, (entry, handle)), ports in zip(starting.items(), bound):
            if isinstance(ports, BaseException):
                failed.append((entry, ports))
                ray.kill(handle)
                continue
            self.routers[rid] = dataclasses.replace(entry, grpc_port=ports["grpc"], http_port=ports["http"])
            self.router_handles[rid] = handle
            log.info("router %d serving on node %s at %s:%d (HTTP %s)", rid, entry.node_id[:8], entry.address,
                     ports["grpc"], ports["http"])
        self._persist()
        if failed:
            entry, err = failed[0]
            raise RuntimeError(f"{len(failed)} router(s) failed to start, {entry.name} on node {entry.node_id}: "
                               f"{err}") from err

    async def _check_routers(self) -> None:
        """Routers follow the nodes: drop those whose node is gone, start again those Ray restarted, and start
        routers on router nodes that have none (a router pod joined)."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.retired_nodes &= alive  # node ids are never reused
        changed = False
        for rid, entry in list(self.routers.items()):
            handle = self.router_handles.get(rid)
            if handle is None:
                continue  # retired meanwhile (retire_routers ran during an await of this loop)
            if entry.node_id not in alive:
                log.warning("%s: its node %s is gone; dropped", entry.name, entry.node_id)
                self.routers.pop(rid)
                self.router_handles.pop(rid)
                ray.kill(handle, no_restart=True)
                changed = True
                continue
            try:
                stats = await asyncio.wait_for(handle.stats.remote(), 10)
            except Exception:  # restarting: try again next round
                continue
            restarted = not stats["started"] and not stats.get("drained")
            stale = stats["started"] and stats["plan_version"] != self.plan.version
            if not (restarted or stale) or self._plan_lock.locked():
                continue  # fine, or a plan change is under way: it switches the router, or the next turn fixes it
            async with self._plan_lock:  # so that no switch happens between reading self.plan and the router's use
                try:
                    if restarted:
                        log.warning("%s was restarted by Ray; starting it on port %d", entry.name, entry.grpc_port)
                        await asyncio.wait_for(handle.start.remote(self.plan, entry.grpc_port, entry.http_port),
                                               self.settings.start_timeout_seconds)
                    elif stats["plan_version"] != self.plan.version:  # it missed a switch (timed out, say)
                        log.warning("%s is on plan v%d, not v%d: switching it", entry.name, stats["plan_version"],
                                    self.plan.version)
                        await asyncio.wait_for(handle.set_plan.remote(self.plan), 60)
                except Exception as err:  # next turn tries again; the other routers are not held up
                    log.warning("%s: could not bring it to plan v%d: %s", entry.name, self.plan.version, err)
        covered = {e.node_id for e in self.routers.values()}
        joined = {n: ip for n, ip in self._router_nodes().items() if n not in covered}
        if joined and not self._plan_lock.locked():
            async with self._plan_lock:  # a starting router must get the plan in force, not miss a switch
                log.info("router nodes joined: %s", ", ".join(joined))
                await self._start_routers(joined)
        elif changed:
            self._persist()

    async def retire_routers(self, node_id: str, grace_seconds: float | None = None) -> list[dict]:
        """Drain the routers on `node_id` (stop admitting, let requests in flight finish), then stop them, and
        start none there again: `moe-serve drain-router`, a router pod's preStop hook. Returns each one's drain
        summary."""
        await self._until_ready()
        grace = self.settings.drain_grace_seconds if grace_seconds is None else grace_seconds
        self.retired_nodes.add(node_id)
        leaving = [rid for rid, e in self.routers.items() if e.node_id == node_id]
        self._persist()
        summaries = await asyncio.gather(*[self.router_handles[rid].stop.remote(grace) for rid in leaving],
                                         return_exceptions=True)
        for rid in leaving:
            self.routers.pop(rid, None)
            if (handle := self.router_handles.pop(rid, None)) is not None:
                ray.kill(handle, no_restart=True)
        self._persist()
        log.info("routers %s on node %s drained and retired", leaving, node_id)
        return [{"error": str(x)} if isinstance(x, BaseException) else x for x in summaries]

    async def drain_routers(self, grace_seconds: float | None = None) -> list[dict]:
        """Drain every router at once (Router.stop): the first step of stopping the cluster."""
        await self._until_ready()
        grace = self.settings.drain_grace_seconds if grace_seconds is None else grace_seconds
        summaries = await asyncio.gather(*[h.stop.remote(grace) for h in self.router_handles.values()],
                                         return_exceptions=True)
        return [{"error": str(x)} if isinstance(x, BaseException) else x for x in summaries]

    async def _on_routers(self, method: str, *args) -> dict[int, object]:
        """Call `method` on every router at once: router id -> result; a router that fails (its node went, it
        restarts) gives its exception instead of failing the others."""
        ids = list(self.router_handles)
        results = await asyncio.gather(*[getattr(self.router_handles[rid], method).remote(*args) for rid in ids],
                                       return_exceptions=True)
        return dict(zip(ids, results))

    # --- recovery ----------------------------------------------------------------------------

    def _persist(self) -> None:
        """Write what a restarted controller needs (ControllerState) to Ray's KV store: the plan recorded by a
        change under way (_record), else the plan in force."""
        plan = self._recorded or self.plan
        if plan is None or self._shutting_down:
            return
        state = ControllerState(plan, self._next_worker_id, self._next_router_id, tuple(self.routers.values()),
                                frozenset(self.retired_nodes), self.policy.model_dump(),
                                tuple(self.events[-EVENTS_KEPT:]))
        internal_kv._internal_kv_put(STATE_KEY, pickle.dumps(state), overwrite=True, namespace=NAMESPACE)

    def _record(self, new: PlacementPlan) -> None:
        """Write `new` as the plan to recover before any router switches to it: a controller that dies from here
        on switches every router to it when it recovers. Holds until _commit or _roll_back."""
        self._recorded = new
        self._persist()

    def _commit(self, new: PlacementPlan) -> None:
        self.plan, self._recorded = new, None
        self._persist()

    async def _until_ready(self, timeout: float = 120.0) -> None:
        if self._unrecoverable:
            raise ControllerUnavailable(self._unrecoverable)
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def recover_or_exit(self) -> dict:
        """recover, or, if it fails, end this process so that Ray restarts the controller and recovery is tried
        afresh (a controller that is up but never ready would answer nothing for ever)."""
        try:
            return await self.recover()
        except Exception:
            log.exception("recovery after a restart failed: exiting so that Ray restarts the controller")
            os._exit(1)

    async def recover(self) -> dict:
        """After Ray restarted this actor: read the state back, find the live workers and routers again (they
        are detached, nothing restarts), finish what a plan change cut short, and resume the control loop.

        A change cut short before its new plan was recorded leaves workers the plan does not name (killed here)
        and replicas it does not name (unloaded); one cut short after, routers on the old plan (switched here,
        since its workers were loaded before it was recorded). The plan version never goes backwards."""
        began = time.monotonic()
        raw = internal_kv._internal_kv_get(STATE_KEY, namespace=NAMESPACE)
        if raw is None:
            self._unrecoverable = "the controller restarted with no saved state (it died while starting the cluster)"
            log.error("%s: nothing to recover", self._unrecoverable)
            return {"recovered": False}
        state: ControllerState = pickle.loads(raw)
        self._configure()
        self.plan, self.events = state.plan, list(state.events)
        self.policy = AutoscalingPolicy(**state.policy)
        self.retired_nodes = set(state.retired_nodes)
        names = cluster_actor_names()
        worker_ids = [i for n in names if (i := _actor_id(n, WORKER_PREFIX)) is not None]
        router_ids = [i for n in names if (i := _actor_id(n, ROUTER_PREFIX)) is not None]
        self._next_worker_id = max([state.next_worker_id, *(i + 1 for i in worker_ids)])
        self._next_router_id = max([state.next_router_id, *(i + 1 for i in router_ids)])
        in_plan = {w.worker_id: w for w in self.plan.workers}
        # Workers the plan does not name stay until every router is on the plan: a router still on the plan
        # before it may be sending them tokens (a change cut short after recording its plan drains them).
        strays = []
        for wid in worker_ids:
            handle = _actor_or_none(worker_name(wid))
            if handle is None:
                continue  # died since it was listed: the control loop's first turn replaces a plan worker
            if wid in in_plan:
                self.workers[wid] = handle
            else:
                strays.append(handle)
        infos = await asyncio.gather(*[asyncio.wait_for(h.info.remote(), 30) for h in self.workers.values()],
                                     return_exceptions=True)
        loads, unloads = [], []
        for wid, info in zip(list(self.workers), infos):
            if isinstance(info, BaseException):
                continue  # dead or dying: the control loop's first turn replaces it
            self.worker_info[wid] = info
            hosted = {(int(layer), e) for layer, experts in info["hosted"].items() for e in experts}
            wanted = set(in_plan[wid].replicas)
            if missing := wanted - hosted:
                loads.append(self.workers[wid].load_replicas.remote(by_layer(sorted(missing))))
            if extra := hosted - wanted:
                unloads.append((self.workers[wid], by_layer(sorted(extra))))
        known = {entry.router_id for entry in state.routers}
        for rid in router_ids:
            if rid not in known and (handle := _actor_or_none(router_name(rid))) is not None:
                ray.kill(handle, no_restart=True)  # started by a _start_routers the state never recorded
        for entry in state.routers:
            if (handle := _actor_or_none(entry.name)) is None:
                continue  # gone with its node: _check_routers starts a new one where routers belong
            if entry.node_id in self.retired_nodes:
                ray.kill(handle, no_restart=True)  # its retirement was under way
                continue
            self.router_handles[entry.router_id] = handle
            self.routers[entry.router_id] = entry
        # 1. the plan's replicas where it puts them; 2. every router on it (a no-op for one already there);
        # 3. only then what no router uses any more: replicas it dropped, workers it drained.
        await asyncio.gather(*loads, return_exceptions=True)
        acks = await self._on_routers("set_plan", self.plan)
        for rid, ack in acks.items():
            if isinstance(ack, BaseException):
                log.warning("%s did not switch to plan v%d on recovery (%s): _check_routers retries",
                            self.routers[rid].name, self.plan.version, ack)
        await asyncio.gather(*[h.unload_replicas.remote(r) for h, r in unloads], return_exceptions=True)
        for handle in strays:
            ray.kill(handle, no_restart=True)
        self._persist()
        self.metrics.plan(self.plan)
        self.recovered_seconds = time.monotonic() - began
        self._ready.set()
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop())
        log.warning("controller restarted: recovered plan v%d, %d workers and %d routers in %.2f s",
                    self.plan.version, len(self.workers), len(self.routers), self.recovered_seconds)
        return {"recovered": True, "plan_version": self.plan.version, "seconds": self.recovered_seconds}

    # --- load --------------------------------------------------------------------------------

    async def load(self, seconds: float | None = None) -> dict[tuple[int, int], int]:
        """Tokens per logical expert over the window (or its last `seconds`), summed over routers."""
        out: dict[tuple[int, int], int] = {}
        for per_router in (await self._on_routers("expert_load", seconds)).values():
            if isinstance(per_router, BaseException):  # its node went, or it restarts: its load is lost anyway
                continue
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
        await self._until_ready()
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
            drain=drain, groups=expert_groups(self.spec),
            # Each worker's Ray node, so that a hot expert's replicas do not all die with one node.
            domains={wid: info["node_id"] for wid, info in self.worker_info.items() if info.get("node_id")}))
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
            # 3. every router switches at a step boundary and acknowledges. The new plan is recorded first: a
            # controller that dies from here on switches every router to it when it recovers.
            self._record(new)
            await self.pauses["recorded"].wait_async()
            acks = await self._on_routers("set_plan", new)
            self._raise_unless_switched(acks, new)
            lap("switch")
        except BaseException:  # the rollout failed: the old placement stays, and so do its workers
            for wid in leaving:
                self.worker_states.pop(wid, None)
            try:
                await self._roll_back(old, new, change, fresh)
            except BaseException:  # the rollout's own error is the one to raise
                log.exception("rolling back plan v%d failed", new.version)
            raise
        finally:
            for w in fresh:
                self.starting.pop(w.worker_id, None)
        self._commit(new)
        self.events.append(record)
        # 4. no router sends tokens to removed replicas any more: unload them, stop drained workers. A worker
        # that died meanwhile does not keep the drained ones alive (the control loop replaces it).
        await asyncio.gather(*[self.workers[wid].unload_replicas.remote(by_layer(removed))
                               for wid, removed in change.removed.items() if wid not in leaving],
                             return_exceptions=True)
        lap("unload")
        for wid in leaving:
            if (handle := self.workers.pop(wid, None)) is not None:
                ray.kill(handle)
            self.worker_info.pop(wid, None)
            self.worker_states.pop(wid, None)
        record["seconds"] = time.perf_counter() - started
        self._persist()
        self.metrics.plan(new)
        self.metrics.rebalanced(reason.value)
        log.info("plan v%d -> v%d (%s: %s): workers %d -> %d, balancedness %.3f -> %.3f, %d bytes moved in "
                 "%.2f s (planned in %.2f s)", old.version, new.version, reason.value, detail, len(old.workers),
                 len(new.workers), record["balancedness_before"], record["balancedness_after"],
                 record["bytes_moved"], record["seconds"], planning)
        return record

    async def _roll_back(self, old: PlacementPlan, new: PlacementPlan, change: PlanChange,
                         fresh: list[WorkerPlacement]) -> None:
        """Undo a plan change that failed part way. Once `new` was recorded, some routers may be on it: all go
        back to `old`'s placement under a version past `new`'s (versions never go backwards, and `new`'s number
        stays `new`'s), recorded as the plan in force. Then the replicas the change loaded are unloaded and the
        workers it started are stopped; a router that did not switch back is brought to the plan in force by
        _check_routers."""
        if self._recorded is not None:
            back = dataclasses.replace(old, version=new.version + 1)
            self._record(back)  # before any router switches back: a controller dying now recovers to `back`
            try:
                acks = await self._on_routers("set_plan", back)
            finally:
                self._commit(back)
            self.metrics.plan(back)
            failed = [self.routers[rid].name for rid, ack in acks.items()
                      if isinstance(ack, BaseException) and rid in self.routers]
            log.warning("plan v%d rolled back to v%d (v%d's placement)%s", new.version, back.version, old.version,
                        f"; {', '.join(failed)} did not switch back yet" if failed else "")
        started = {w.worker_id for w in fresh}
        await asyncio.gather(*[self.workers[wid].unload_replicas.remote(by_layer(added))
                               for wid, added in change.added.items() if wid not in started and wid in self.workers],
                             return_exceptions=True)
        for wid in started:
            if (handle := self.workers.pop(wid, None)) is not None:
                ray.kill(handle, no_restart=True)  # detached: nothing else would stop it
            self.worker_info.pop(wid, None)

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

    def _raise_unless_switched(self, acks: dict[int, object], new: PlacementPlan) -> None:
        """Fail the rollout if a router that is still part of the fleet did not switch to `new`: its old plan's
        replicas must stay. A router whose node has left is dropped by _check_routers, not waited for."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for rid, ack in acks.items():
            entry = self.routers.get(rid)  # None: dropped by _check_routers meanwhile (its node went)
            if isinstance(ack, BaseException) and entry is not None and entry.node_id in alive:
                raise RuntimeError(f"{entry.name} did not switch to plan v{new.version}: {ack}") from ack

    def _compute_plan(self, inp: PlannerInput) -> PlacementPlan:
        """The planner call, on a worker thread (see rebalance); it reads only `inp` and settings."""
        self.pauses["plan"].wait()
        return make_plan(self.settings.placement_policy, inp)

    # Instrumentation for tests: hold a pause point ("plan", "switch" or "recorded", see __init__), see the controller
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
        """Control-loop turns so far, how many skipped because a plan change was under way, and how long the
        last recovery after a restart took (None: never restarted)."""
        return {"evaluations": self.evaluations, "evaluations_skipped": self.evaluations_skipped,
                "recovered_seconds": self.recovered_seconds, "pid": os.getpid()}

    async def worker_failed(self, worker_id: int) -> None:
        """A router saw `worker_id` fail: replace it with a new worker hosting the same replicas.

        Routers re-run the failed pairs on other replicas meanwhile, and wait for this plan
        where the dead worker held the only replica. The dead worker is reported DEAD until then."""
        await self._until_ready()
        if any(w.worker_id == worker_id for w in self.plan.workers):
            self.worker_states[worker_id] = admin_pb2.WORKER_STATE_DEAD
        async with self._plan_lock:
            old = self.plan
            lost = next((w for w in old.workers if w.worker_id == worker_id), None)
            if lost is None:  # already replaced (several routers report the same death)
                return
            started = time.perf_counter()
            if (dead := self.workers.pop(worker_id, None)) is not None:
                ray.kill(dead, no_restart=True)  # detached: a hung worker would otherwise linger
            self.worker_info.pop(worker_id, None)
            new_id, self._next_worker_id = self._next_worker_id, self._next_worker_id + 1
            replacement = WorkerPlacement(new_id, worker_name(new_id), lost.replicas)
            workers = tuple(replacement if w.worker_id == worker_id else w for w in old.workers)
            new = PlacementPlan(old.version + 1, old.num_experts, old.moe_layers, workers)
            self.starting[new_id] = replacement  # STARTING until routers use the plan that has it
            try:
                await self._start_workers([replacement])
                await self.pauses["switch"].wait_async()
                self._record(new)
                # A router that fails to switch here is brought to the plan in force by _check_routers.
                await self._on_routers("set_plan", new)
            except BaseException:  # cancelled (shutdown): nothing was committed
                self._recorded = None
                raise
            finally:
                self.starting.pop(new_id, None)
            self._commit(new)
            self.worker_states.pop(worker_id, None)
            reason = PlanChangeReason.WORKER_FAILURE
            record = {"reason": reason.value, "detail": f"worker {worker_id} failed", "old_version": old.version,
                      "new_version": new.version, "bytes_moved": len(lost.replicas) * self.expert_bytes,
                      "workers_before": len(old.workers), "workers_after": len(new.workers),
                      "seconds": time.perf_counter() - started, "dropped": False}
            self.events.append(record)
            self._persist()
            self.metrics.plan(new)
            self.metrics.rebalanced(reason.value)
            log.warning("expert worker %d failed: replaced by %d with its %d replicas in %.2f s (plan v%d)",
                        worker_id, new_id, len(lost.replicas), record["seconds"], new.version)

    async def _check_fleet(self) -> None:
        """Liveness: replace workers that died while idle, and workers of the plan with no live actor (a
        replacement that failed to start, say because Ray placed it on a node that was dying, is tried again
        here); routers follow their nodes (_check_routers)."""
        for w in self.plan.workers:
            wid = w.worker_id
            if wid in self._replacing or self._plan_lock.locked() and wid not in self.workers:
                continue  # being replaced (by this loop, or by a router's report under the lock)
            if (handle := self.workers.get(wid)) is not None:
                try:
                    await asyncio.wait_for(handle.stats.remote(), 10)
                    continue
                except Exception:
                    pass
            # Replaced in a task of its own: the replacement waits for any plan change under way, and the
            # rest of this loop's work (routers, the next evaluation) must not wait with it.
            task = asyncio.get_running_loop().create_task(self.worker_failed(wid))
            self._replacing[wid] = task
            task.add_done_callback(functools.partial(self._replaced, wid))
        await self._check_routers()

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
        with the replicas they will host, until routers use the plan that has them); and every router."""
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
        for r in self.routers.values():
            msg.routers.add(router_id=str(r.router_id), node_id=r.node_id, grpc_address=f"{r.address}:{r.grpc_port}",
                            http_address=f"{r.address}:{r.http_port}" if r.http_port is not None else "")
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
        await self._until_ready()
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
            self._persist()
            log.info("autoscaling policy set: %s", self.policy)
            return self._policy_message().SerializeToString()
        raise InvalidRequest("method", f"unknown ClusterAdmin method {method!r}")

    async def plan_events(self) -> list[dict]:
        return list(self.events)

    async def endpoints(self) -> list[dict]:
        """Every router, by id: [{"router", "name", "node_id", "address", "grpc": port, "http": port or None}]."""
        await self._until_ready()
        return [e.endpoint() for e in self.routers.values()]

    async def router_stats(self) -> list[dict]:
        return await asyncio.gather(*[h.stats.remote() for h in self.router_handles.values()])

    async def shutdown(self) -> None:
        """Stop routers (after a short drain) and workers, and forget the saved state: nothing is recovered."""
        self._shutting_down = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._replacing.values()):
            task.cancel()
        await self._on_routers("stop")
        internal_kv._internal_kv_del(STATE_KEY, namespace=NAMESPACE)
        for handle in [*self.router_handles.values(), *self.workers.values()]:
            ray.kill(handle, no_restart=True)
        self.routers, self.router_handles, self.workers = {}, {}, {}


def start_cluster(settings: ClusterSettings) -> tuple[ray.actor.ActorHandle, list[int]]:
    """Create the detached controller (Ray must be initialised) and bring the cluster up; returns it and the
    routers' gRPC ports.

    Ray restarts the controller if its process dies (max_restarts), and it recovers (Controller.recover).
    Calls in flight when it died fail; calls made while it restarts wait for it."""
    if settings.model is None:
        from cluster.make_model import default_model_dir

        settings = settings.model_copy(update={"model": str(default_model_dir())})
    controller = ray.remote(Controller).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=64,
        max_restarts=-1,
    ).remote(settings.model_dump(), ray.get_runtime_context().get_node_id())
    try:
        ports = ray.get(controller.start.remote())
    except BaseException:
        kill_cluster()
        raise
    return controller, ports


def kill_cluster() -> None:
    """Kill every actor of the cluster by name, controller first (so it restarts nothing), and forget its state:
    the way out when the controller cannot shut the cluster down itself."""
    names = sorted(cluster_actor_names(), key=lambda n: n != CONTROLLER_NAME)
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # already gone
            pass
    internal_kv._internal_kv_del(STATE_KEY, namespace=NAMESPACE)


def stop_cluster(controller: ray.actor.ActorHandle) -> None:
    """Stop routers and workers through the controller, then the controller; by name if it cannot."""
    try:
        ray.get(controller.shutdown.remote(), timeout=120)
    except (ray.exceptions.RayError, TimeoutError) as err:
        log.warning("the controller could not stop the cluster (%s); killing its actors by name", err)
    finally:
        kill_cluster()
