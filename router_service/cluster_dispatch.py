"""Dispatch to expert workers: per MoE layer, one message per worker that has tokens.

The dispatcher groups (token, expert) pairs by the worker that will run them
(by the current placement plan), sends each worker only the hidden rows it
needs, and adds the weighted partial sums that come back. How bytes travel is
a `Transport`; the plain Ray actor call is the reference one.

Threads: `dispatch` and `PendingExperts.wait` run on the engine thread;
`set_plan` may be called from another thread and swaps the plan atomically;
the engine picks it up at the next step boundary (`begin_step`).

Shape legend: T tokens, H hidden, P pairs, T_w / P_w those sent to worker w.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import torch

from router_service.dispatch import ExpertDispatcher, PendingExperts, to_pairs
from router_service.placement import PlacementPlan, ReplicaTable


class Transport(ABC):
    """Moves one layer's sub-batch to a worker and its partial output back."""

    @abstractmethod
    def submit(self, worker_id: int, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
               weight: torch.Tensor) -> Any:
        """Start the call; return a handle for `collect`. hidden [T_w, H]; token, expert, weight [P_w]."""

    @abstractmethod
    def collect(self, handles: list[Any]) -> list[torch.Tensor]:
        """Wait for the calls; outputs [T_w, H] in the same order."""

    @abstractmethod
    def set_workers(self, workers: dict[int, Any]) -> None:
        """The live worker endpoints (worker id -> actor handle)."""


class RayCallTransport(Transport):
    """Reference transport: one Ray actor call per worker per layer."""

    def __init__(self):
        self._workers: dict[int, Any] = {}

    def set_workers(self, workers):
        self._workers = dict(workers)

    def submit(self, worker_id, layer, hidden, token, expert, weight):
        return self._workers[worker_id].run.remote(layer, hidden, token, expert, weight)

    def collect(self, handles):
        import ray

        return ray.get(handles)


class _PendingCluster(PendingExperts):
    def __init__(self, transport: Transport, out: torch.Tensor, handles: list, rows: list[torch.Tensor]):
        self.transport, self.out, self.handles, self.rows = transport, out, handles, rows

    def wait(self) -> torch.Tensor:
        for rows, partial in zip(self.rows, self.transport.collect(self.handles)):
            self.out.index_add_(0, rows, partial.to(self.out.dtype))
        return self.out


class ClusterDispatcher(ExpertDispatcher):
    def __init__(self, plan: PlacementPlan, transport: Transport, workers: dict[int, Any]):
        self.transport = transport
        self._lock = threading.Lock()
        self._next: tuple[PlacementPlan, dict[int, Any]] | None = None  # guarded by _lock
        self._apply(plan, workers)

    @property
    def plan(self) -> PlacementPlan:
        return self._plan

    def _apply(self, plan: PlacementPlan, workers: dict[int, Any]) -> None:
        plan.validate()
        self.transport.set_workers(workers)
        self._plan, self._table = plan, ReplicaTable.from_plan(plan)

    def set_plan(self, plan: PlacementPlan, workers: dict[int, Any]) -> None:
        """Queue a new plan; it takes effect at the next step boundary."""
        with self._lock:
            self._next = (plan, workers)

    def begin_step(self) -> None:
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None:
            self._apply(*pending)

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        token, expert, weight = to_pairs(topk_ids, topk_weights)  # [P]
        worker = self._table.assign(layer, expert)  # [P]
        handles, rows = [], []
        for w in torch.unique(worker).tolist():
            sel = worker == w
            w_token = token[sel]
            uniq, local = torch.unique(w_token, return_inverse=True)  # rows this worker needs
            handles.append(self.transport.submit(w, layer, hidden[uniq], local, expert[sel], weight[sel]))
            rows.append(uniq)
        return _PendingCluster(self.transport, torch.zeros_like(hidden), handles, rows)
