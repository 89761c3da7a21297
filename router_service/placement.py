"""The versioned placement plan: which worker hosts which replicas of which logical experts.

The controller (cluster/) decides plans; routers dispatch by them. A plan is
immutable; a change is a new plan with version + 1.

Worked example: 2 MoE layers x 4 experts on 3 workers, expert (1, 2) hot:
    worker 0: (0,0) (0,3) (1,2)        replicas of (1, 2): workers 0 and 2
    worker 1: (0,1) (1,0) (1,3)        every other logical expert: 1 replica
    worker 2: (0,2) (1,1) (1,2)
Tokens routed to (1, 2) are split between workers 0 and 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def by_layer(replicas) -> dict[int, list[int]]:
    """(layer, expert) pairs -> {layer: [expert ids]}, the shape ExpertGroup loads and unloads."""
    out: dict[int, list[int]] = {}
    for layer, expert in replicas:
        out.setdefault(layer, []).append(expert)
    return out


@dataclass(frozen=True)
class WorkerPlacement:
    worker_id: int
    name: str  # Ray actor name, e.g. "expert-worker-3"
    replicas: tuple[tuple[int, int], ...]  # (layer, expert) pairs hosted

    def hosted(self) -> dict[int, list[int]]:
        return by_layer(self.replicas)


@dataclass(frozen=True)
class PlacementPlan:
    version: int
    num_experts: int
    moe_layers: tuple[int, ...]
    workers: tuple[WorkerPlacement, ...]

    def replicas_of(self, layer: int, expert: int) -> list[int]:
        return [w.worker_id for w in self.workers if (layer, expert) in w.replicas]

    def validate(self) -> None:
        """Every logical expert needs at least one replica."""
        hosted = {r for w in self.workers for r in w.replicas}
        missing = [(l, e) for l in self.moe_layers for e in range(self.num_experts) if (l, e) not in hosted]
        if missing:
            raise ValueError(f"plan v{self.version}: logical experts without a replica: {missing[:8]}")

    def replica_count(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for w in self.workers:
            for r in w.replicas:
                counts[r] = counts.get(r, 0) + 1
        return counts


@dataclass
class ReplicaTable:
    """Per-layer lookup arrays for dispatch: logical expert -> its replicas' workers.

    Workers are named by their index in `worker_ids` (the plan's order), so a dispatch can count pairs
    per worker with one bincount. replicas[layer] [E, R]: index of the r-th replica's worker (padded by
    repeating; -1 for an expert with no live replica); count[layer] [E] live replicas. numpy, as the
    dispatch plan that reads them (router_service.cluster_dispatch) is.
    """

    worker_ids: list[int] = field(default_factory=list)  # index -> worker id
    replicas: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [E, R] int64
    count: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [E] int64
    single: dict[int, bool] = field(default_factory=dict)  # layer -> every expert has exactly one live replica

    @classmethod
    def from_plan(cls, plan: PlacementPlan, exclude: set[int] = frozenset()) -> "ReplicaTable":
        """Tables of the plan's replicas, leaving out workers in `exclude` (known dead)."""
        table = cls([w.worker_id for w in plan.workers if w.worker_id not in exclude])
        index = {w: i for i, w in enumerate(table.worker_ids)}
        # One pass over the replicas, in plan order (the order replicas_of gives): at DeepSeek-V3's shape
        # (58 layers x 256 experts, 64 workers) asking replicas_of per expert took seconds, on every switch.
        lists: dict[int, list[list[int]]] = {layer: [[] for _ in range(plan.num_experts)] for layer in plan.moe_layers}
        for w in plan.workers:
            if (i := index.get(w.worker_id)) is not None:
                for layer, e in w.replicas:
                    lists[layer][e].append(i)
        for layer, per_expert in lists.items():
            R = max(1, max(len(ws) for ws in per_expert))
            table.replicas[layer] = np.array([(ws * R)[:R] if ws else [-1] * R for ws in per_expert], dtype=np.int64)
            table.count[layer] = np.array([len(ws) for ws in per_expert], dtype=np.int64)
            table.single[layer] = all(len(ws) == 1 for ws in per_expert)
        return table

    def assign(self, layer: int, expert: np.ndarray) -> np.ndarray:
        """Worker index (into `worker_ids`) per (token, expert) pair [P]: an expert's pairs spread
        round-robin over its replicas, in pair order. -1 for an expert with no live replica."""
        if self.single[layer]:
            return self.replicas[layer][expert, 0]
        counts = np.maximum(self.count[layer][expert], 1)  # [P]; experts with none map to their row of -1
        # rank of each pair among the pairs of the same expert, then rank mod replicas
        order = np.argsort(expert, kind="stable")
        sorted_e = expert[order]
        rank = np.empty_like(order)
        rank[order] = np.arange(len(expert)) - np.searchsorted(sorted_e, sorted_e, side="left")
        return self.replicas[layer][expert, rank % counts]
