"""Placement policies: pure functions from a model (and later, load) to a PlacementPlan."""

from __future__ import annotations

from expert_workers.spec import ModelSpec
from router_service.placement import PlacementPlan, WorkerPlacement


def worker_name(worker_id: int) -> str:
    return f"expert-worker-{worker_id}"


def initial_plan(spec: ModelSpec, num_workers: int, version: int = 1) -> PlacementPlan:
    """Load-agnostic start: logical experts dealt round-robin, one replica each.

    Dealing in layer-major order spreads every layer over all workers, so any
    counts of experts and workers work (no divisibility rule): with 8 experts
    on 3 workers, worker 0 gets experts 0, 3, 6 of the first layer.
    """
    if spec.moe is None:
        raise ValueError(f"model_type {spec.model_type!r} has no MoE layers: nothing to place on expert workers")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    replicas: list[list[tuple[int, int]]] = [[] for _ in range(num_workers)]
    for i, logical in enumerate(spec.logical_experts):
        replicas[i % num_workers].append(logical)
    workers = tuple(WorkerPlacement(w, worker_name(w), tuple(r)) for w, r in enumerate(replicas))
    return PlacementPlan(version, spec.moe.num_experts, spec.moe_layers, workers)
