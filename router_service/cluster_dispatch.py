"""Dispatch to expert workers: per MoE layer, one message per worker that has tokens.

The dispatcher groups (token, expert) pairs by the worker that will run them
(by the current placement plan), sends each worker only the hidden rows it
needs, and adds the weighted partial sums that come back. How bytes travel is
a `Transport` (router_service.transports).

Threads: `dispatch` and `PendingExperts.wait` run on the engine thread;
`set_plan` runs on another thread: it connects to new workers there, then
queues the plan, which the engine thread adopts at the next step boundary
(`begin_step`). A step never waits for a connection or a weight load.

Shape legend: T tokens, H hidden, P pairs, T_w / P_w those sent to worker w.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from router_service.dispatch import ExpertDispatcher, PendingExperts, to_pairs
from router_service.placement import PlacementPlan, ReplicaTable
from router_service.transports import Transport


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
        self._next: tuple[PlacementPlan, threading.Event] | None = None  # guarded by _lock
        plan.validate()
        transport.connect(workers)
        self._apply(plan)

    @property
    def plan(self) -> PlacementPlan:
        return self._plan

    def _apply(self, plan: PlacementPlan) -> None:
        self.transport.retain({w.worker_id for w in plan.workers})
        self._plan, self._table = plan, ReplicaTable.from_plan(plan)

    def set_plan(self, plan: PlacementPlan, workers: dict[int, Any]) -> threading.Event:
        """Connect to the plan's workers now; the plan takes effect at the next step boundary.

        Returns an event set once the engine thread has switched: from then on no
        token goes to a replica that only the old plan had.
        """
        plan.validate()
        self.transport.connect(workers)
        applied = threading.Event()
        with self._lock:
            superseded, self._next = self._next, (plan, applied)
        if superseded is not None:
            superseded[1].set()  # never adopted, but nothing will use it either
        return applied

    def begin_step(self) -> None:
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None:
            self._apply(pending[0])
            pending[1].set()

    def close(self) -> None:
        self.transport.close()

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        token, expert, weight = to_pairs(topk_ids, topk_weights)  # [P]
        worker = self._table.assign(layer, expert)  # [P]
        handles, rows = [], []
        for w in torch.unique(worker).tolist():  # one message per worker that has tokens
            sel = worker == w
            w_token = token[sel]
            uniq, local = torch.unique(w_token, return_inverse=True)  # rows this worker needs
            handles.append(self.transport.submit(w, layer, hidden[uniq], local, expert[sel], weight[sel]))
            rows.append(uniq)
        return _PendingCluster(self.transport, torch.zeros_like(hidden), handles, rows)
