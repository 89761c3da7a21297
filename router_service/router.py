"""The router: a Ray actor that hosts the engine, its own grpc.aio server and the OpenAI HTTP API.

Its routed-expert compute goes through `ClusterDispatcher` to the expert
workers named in the placement plan. Both servers run on the actor's event
loop (Ray async actor); the engine runs on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

import torch

from expert_workers.worker import host_cpus
from router_service.async_engine import AsyncEngine
from router_service.cluster_dispatch import ClusterDispatcher
from router_service.engine import EngineSettings, load_engine
from router_service.errors import ControllerUnavailable, InvalidRequest
from router_service.http_server import start_http_server
from router_service.metrics import RouterMetrics
from router_service.placement import PlacementPlan
from router_service.security import controller_security
from router_service.server import drain, start_server
from router_service.telemetry import LoadWindow
from router_service.transports import make_transport

log = logging.getLogger(__name__)


class Router:
    """Actor body; `cluster` wraps it with `ray.remote(...)`."""

    def __init__(self, router_id: int, model_dir: str, engine_settings: dict, plan: PlacementPlan, host: str,
                 port: int, namespace: str, controller_name: str, load_window_seconds: float = 60.0,
                 torch_threads: int | None = None, transport: str = "socket", http_port: int | None = None):
        # Default: every CPU of the node. A router and its workers take turns (it runs attention while they
        # wait for its tokens, and waits while they compute), so it may use the cores they leave idle; measured
        # with 2 workers on 2 cores, batch 32: 2 router threads 251-280 tok/s against 219-247 with one.
        torch.set_num_threads(torch_threads or host_cpus())
        self.router_id = router_id
        self.model_dir = model_dir
        self.engine_settings = EngineSettings(**engine_settings)
        self.plan = plan
        self.host, self.port = host, port
        self.http_port = http_port  # None: no HTTP front
        self.http = None
        self.namespace, self.controller_name = namespace, controller_name
        self.load_window_seconds = load_window_seconds
        self.transport_name = transport
        self.server = None

    def _transport(self):
        # The engine's device: a GPU router's collective links carry its CUDA tensors (NCCL where possible).
        return make_transport(self.transport_name, self.engine_settings.torch_device())

    def _actor(self, name: str):
        import ray

        return ray.get_actor(name, namespace=self.namespace)

    def _worker_handles(self, plan: PlacementPlan) -> dict:
        return {w.worker_id: self._actor(w.name) for w in plan.workers}

    async def start(self, plan: PlacementPlan | None = None, port: int | None = None,
                    http_port: int | None = None) -> dict:
        """Load the non-expert weights, start the engine, the gRPC server and the HTTP server (when it has a
        port); returns the bound ports, {"grpc": port, "http": port or None}.

        After Ray restarted this actor, the controller calls it again with the current plan and the
        ports clients know, since the constructor's arguments are those of the first start."""
        if plan is not None:
            self.plan = plan
        if port is not None:
            self.port = port
        if http_port is not None:
            self.http_port = http_port
        controller = self._actor(self.controller_name)
        self.dispatcher = await asyncio.to_thread(
            ClusterDispatcher, self.plan, self._transport(), self._worker_handles(self.plan),
            lambda worker_id: controller.worker_failed.remote(worker_id))
        engine = await asyncio.to_thread(load_engine, self.model_dir, self.engine_settings, self.dispatcher)
        spec = engine.spec
        engine.model.load = LoadWindow(spec.moe_layers, spec.moe.num_experts, self.load_window_seconds)
        self.engine = AsyncEngine(engine, asyncio.get_running_loop())

        async def admin(method: str, payload: bytes) -> bytes:
            import ray

            try:
                return await controller.admin.remote(method, payload)
            except InvalidRequest as err:  # Ray's wrapper of the controller's error: its str is a traceback
                raise InvalidRequest(err.field, err.message) from None
            except ray.exceptions.RayActorError:  # died or restarting (Ray restarts it; it recovers its state)
                raise ControllerUnavailable(f"ClusterAdmin.{method}: the controller is restarting, retry in a few "
                                            "seconds (serving is not affected)") from None
        self.metrics = RouterMetrics(f"router-{self.router_id}")
        security = await controller.__ray_call__.remote(controller_security)
        model_name = os.path.basename(self.model_dir.rstrip("/"))
        self.server, self.port, self.health = await start_server(
            self.engine, admin, self.host, self.port, model_name, self.model_dir, self.metrics, security=security)
        if self.http_port is not None:
            try:
                self.http = await start_http_server(self.engine, self.host, self.http_port, model_name,
                                                    self.metrics, security)
            except BaseException:  # a router is both servers or neither: clients must not find half of one
                await self.server.stop(0)
                self.server = None
                self.engine.stop()
                raise
            self.http_port = self.http.port
        self._exporter = asyncio.create_task(self._export_metrics())
        log.info("router %d serving gRPC on %s:%d, HTTP on %s", self.router_id, self.host, self.port,
                 self.http_port)
        return {"grpc": self.port, "http": self.http_port}

    async def _export_metrics(self, every_seconds: float = 5.0) -> None:
        while True:
            try:
                self.metrics.export(self.engine.engine)
            except Exception:  # metrics must never take the router down
                log.exception("metrics export failed")
            await asyncio.sleep(every_seconds)

    def expert_load(self, seconds: float | None = None) -> list[list[int]]:
        """Tokens per (MoE layer index, expert) in the window (or its last `seconds`), [L][E]."""
        return self.engine.engine.model.load.totals(seconds).tolist()

    async def set_plan(self, plan: PlacementPlan, timeout: float = 60.0) -> int:
        """Switch to a new plan at a step boundary; returns its version once switched (the acknowledgement)."""
        applied = await asyncio.to_thread(self.dispatcher.set_plan, plan, self._worker_handles(plan))
        self.engine.wake()
        if not await asyncio.to_thread(applied.wait, timeout):
            raise TimeoutError(f"router {self.router_id} did not switch to plan v{plan.version} in {timeout} s")
        self.plan = plan
        return plan.version

    def stats(self) -> dict:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak; ru_maxrss is KiB on Linux
        if self.server is None:  # not started yet, restarted by Ray, or drained (stop)
            return {"router_id": self.router_id, "started": False, "drained": hasattr(self, "_drain"),
                    "max_rss_bytes": rss}
        e = self.engine.engine
        return {"router_id": self.router_id, "started": True, "port": self.port, "http_port": self.http_port,
                "running": e.num_running,
                "waiting": e.num_waiting, "kv_slots_used": e.kv.used_slots, "kv_slots": e.kv.num_slots,
                "steps": e.steps, "plan_version": self.dispatcher.plan.version,
                "recoveries": list(self.dispatcher.recoveries), "max_rss_bytes": rss}

    def profile(self, enable: bool | None = None) -> dict:
        """The engine's step profile so far: {"seconds": {section: s}, "steps": n}; then, when `enable` is
        given, reset it, enabled or not. Profiling times every section of every step (`moe-serve bench
        serving` turns it on around its rounds); off, it costs one flag test per section."""
        prof = self.engine.engine.model.profile
        out = {"seconds": dict(prof.seconds), "steps": prof.steps}
        if enable is not None:
            prof.reset(enable)
        return out

    async def stop(self, grace_seconds: float = 5.0) -> dict | None:
        """Drain (server.drain): refuse new requests, health NOT_SERVING, in-flight ones get `grace_seconds`
        to finish, the rest are cancelled; then the server and engine stop. A second call waits for the first."""
        if self.server is not None:
            server, self.server = self.server, None
            self._drain = asyncio.ensure_future(drain(server, self.engine, self.health, grace_seconds,
                                                      http=self.http))
        drained = getattr(self, "_drain", None)
        return await asyncio.shield(drained) if drained is not None else None
