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

import torch


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
    """Per-layer lookup tensors for dispatch: logical expert -> its replicas' workers.

    workers [E, R] worker id of the r-th replica (padded by repeating), count [E] replicas.
    """

    workers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E, R]
    count: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]

    @classmethod
    def from_plan(cls, plan: PlacementPlan, exclude: set[int] = frozenset()) -> "ReplicaTable":
        """Tables of the plan's replicas, leaving out workers in `exclude` (known dead)."""
        table = cls()
        for layer in plan.moe_layers:
            lists = [[w for w in plan.replicas_of(layer, e) if w not in exclude] for e in range(plan.num_experts)]
            R = max(1, max(len(ws) for ws in lists))
            table.workers[layer] = torch.tensor([(ws * R)[:R] if ws else [-1] * R for ws in lists], dtype=torch.long)
            table.count[layer] = torch.tensor([len(ws) for ws in lists], dtype=torch.long)
        return table

    def assign(self, layer: int, expert: torch.Tensor) -> torch.Tensor:
        """Worker per (token, expert) pair [P]: an expert's pairs spread round-robin over its replicas.

        -1 for an expert with no live replica."""
        counts = self.count[layer][expert]  # [P]
        if bool((counts == 1).all()):
            return self.workers[layer][expert, 0]
        counts = counts.clamp(min=1)  # experts with none map to their row of -1
        # rank of each pair among the pairs of the same expert, then rank mod replicas
        order = torch.argsort(expert, stable=True)
        sorted_e = expert[order]
        starts = torch.searchsorted(sorted_e, sorted_e, right=False)  # first index of each expert's run
        rank = torch.empty_like(expert)
        rank[order] = torch.arange(expert.numel()) - starts
        return self.workers[layer][expert, rank % counts]
