"""The controller: a detached, named Ray actor that owns the placement plan and the fleet.

It builds the initial plan, starts expert workers (each asking Ray for the
resources it means: a GPU where the cluster has them, a fraction of a CPU
otherwise), then routers, and answers ClusterAdmin through the routers.

Concurrency: a Ray async actor; every method runs on the actor's event loop,
so plain attributes need no lock.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from cluster.planner import initial_plan
from cluster.settings import CONTROLLER_NAME, NAMESPACE, ClusterSettings
from expert_workers.spec import load_spec
from expert_workers.worker import ExpertWorker
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.placement import PlacementPlan
from router_service.router import Router

log = logging.getLogger(__name__)


def balancedness(tokens_per_worker: list[float]) -> float:
    """mean / max tokens per worker; 1.0 is perfect (and the value when there is no load)."""
    peak = max(tokens_per_worker, default=0)
    return 1.0 if peak == 0 else sum(tokens_per_worker) / len(tokens_per_worker) / peak


def worker_tokens(plan: PlacementPlan, load: dict[tuple[int, int], int]) -> dict[int, float]:
    """Tokens each worker ran, assuming an expert's tokens split evenly over its replicas (as dispatch does)."""
    counts = plan.replica_count()
    out = {w.worker_id: 0.0 for w in plan.workers}
    for w in plan.workers:
        for r in w.replicas:
            out[w.worker_id] += load.get(r, 0) / counts[r]
    return out


class Controller:
    def __init__(self, settings: dict):
        self.settings = ClusterSettings(**settings)
        self.model_dir = self.settings.model
        self.plan: PlacementPlan | None = None
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self.worker_info: dict[int, dict] = {}
        self.routers: list[ray.actor.ActorHandle] = []
        self.ports: list[int] = []

    def _worker_gpus(self) -> float:
        if self.settings.worker_num_gpus is not None:
            return self.settings.worker_num_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    async def start(self) -> list[int]:
        """Start workers then routers; returns the routers' gRPC ports."""
        s = self.settings
        spec = load_spec(self.model_dir)
        self.plan = initial_plan(spec, s.num_workers)
        worker_cls = ray.remote(ExpertWorker)
        dtype = str(s.engine.torch_dtype(spec.dtype, s.engine.torch_device())).removeprefix("torch.")
        for w in self.plan.workers:
            self.workers[w.worker_id] = worker_cls.options(
                name=w.name, namespace=NAMESPACE, num_cpus=s.worker_num_cpus, num_gpus=self._worker_gpus(),
            ).remote(w.worker_id, self.model_dir, w.hosted(), dtype, s.torch_threads)
        infos = await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in self.workers.values()]),
                                       s.start_timeout_seconds)
        self.worker_info = {i["worker_id"]: i for i in infos}
        router_cls = ray.remote(Router)
        for r in range(s.num_routers):
            port = s.port + r if s.port else 0
            self.routers.append(router_cls.options(name=f"router-{r}", namespace=NAMESPACE,
                                                   num_cpus=s.router_num_cpus).remote(
                r, self.model_dir, s.engine.model_dump(), self.plan, s.host, port, NAMESPACE, CONTROLLER_NAME,
                s.load_window_seconds, s.router_torch_threads, s.transport))
        self.ports = await asyncio.wait_for(asyncio.gather(*[r.start.remote() for r in self.routers]),
                                            s.start_timeout_seconds)
        log.info("cluster up: %d workers, routers on ports %s", len(self.workers), self.ports)
        return self.ports

    # --- ClusterAdmin --------------------------------------------------------------------------

    def placement(self) -> admin_pb2.Placement:
        msg = admin_pb2.Placement(plan_version=self.plan.version)
        for w in self.plan.workers:
            info = self.worker_info.get(w.worker_id, {})
            msg.workers.add(worker_id=str(w.worker_id), actor_name=w.name, node_id=info.get("node_id", ""),
                            device=info.get("device", ""), state=admin_pb2.WORKER_STATE_READY,
                            replicas=[admin_pb2.ExpertRef(layer=l, expert=e) for l, e in w.replicas])
        return msg

    async def load(self) -> dict[tuple[int, int], int]:
        """Tokens per logical expert over the window, summed over routers."""
        totals = await asyncio.gather(*[r.expert_load.remote() for r in self.routers])
        out: dict[tuple[int, int], int] = {}
        for per_router in totals:
            for li, layer in enumerate(self.plan.moe_layers):
                for e, n in enumerate(per_router[li]):
                    out[(layer, e)] = out.get((layer, e), 0) + n
        return out

    async def expert_load(self) -> admin_pb2.ExpertLoad:
        load = await self.load()
        counts = self.plan.replica_count()
        per_worker = worker_tokens(self.plan, load)
        msg = admin_pb2.ExpertLoad(window_seconds=self.settings.load_window_seconds, plan_version=self.plan.version,
                                   balancedness=balancedness(list(per_worker.values())))
        for (layer, expert), tokens in sorted(load.items()):
            msg.experts.add(layer=layer, expert=expert, tokens=tokens, replicas=counts.get((layer, expert), 0))
        for wid, tokens in per_worker.items():
            msg.workers.add(worker_id=str(wid), tokens=round(tokens))
        return msg

    async def placement_message(self) -> bytes:
        return self.placement().SerializeToString()

    async def expert_load_message(self) -> bytes:
        return (await self.expert_load()).SerializeToString()

    async def router_stats(self) -> list[dict]:
        return await asyncio.gather(*[r.stats.remote() for r in self.routers])

    async def shutdown(self) -> None:
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
    ).remote(settings.model_dump())
    ports = ray.get(controller.start.remote())
    return controller, ports


def stop_cluster(controller: ray.actor.ActorHandle) -> None:
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
