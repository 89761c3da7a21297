"""Dispatch to expert workers: per MoE layer, one message per worker that has tokens.

The dispatcher groups (token, expert) pairs by the worker that will run them
(by the current placement plan), sends each worker only the hidden rows it
needs, and adds the weighted partial sums that come back. How bytes travel is
a `Transport` (router_service.transports).

Several dispatches may be pending at once (two micro-batches: `CausalLM.forward`), each waited
for in the order it was dispatched. On each worker's connection, though, at most one request is in
flight: before sending a worker a new request the dispatcher first collects that worker's previous
reply (`_drain`). A socket worker reads a request, computes, then writes its reply, and writes block
once the connection's buffers fill (a few hundred KiB: a prefill's reply is MiBs); were the router
to send a second request while the first reply sat unread, both sides could block on their writes
for good. Collecting first rules that out, and keeps replies read in the order requests were sent.
It costs little overlap: the router collects the previous reply only when the next request for that
worker is ready, i.e. after the other micro-batch's attention and gate, which is what the previous
reply's compute was to overlap.

Failures come in two kinds. A worker that answers with an error (`WorkerError`: an expert it does not
host, say) is alive and its connection keeps serving: the step fails with that error (the engine fails
the step's requests and carries on), and the worker is neither marked dead nor reported. A call that
cannot complete (the worker died, its connection failed or timed out) marks the worker dead for this
router, reports it to the controller, and re-runs its pairs on other replicas (`_recover`).

Threads: `dispatch` and `PendingExperts.wait` run on the engine thread;
`set_plan` runs on another thread: it connects to new workers there, then
queues the plan, which the engine thread adopts at the next step boundary
(`begin_step`). A step never waits for a connection or a weight load.

Shape legend: T tokens, H hidden, P pairs, T_w / P_w those sent to worker w.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from expert_workers.wire import WorkerError
from router_service.dispatch import ExpertDispatcher, PendingExperts, to_pairs
from router_service.placement import PlacementPlan, ReplicaTable
from router_service.transports import Transport

log = logging.getLogger(__name__)


class RecoveryTimeout(RuntimeError):
    """A logical expert lost its last replica and no replacement arrived in time."""


@dataclass
class _Message:
    """One worker's share of one layer's pairs."""

    worker: int
    rows: torch.Tensor  # [T_w] rows of the layer's hidden states sent
    local: torch.Tensor  # [P_w] index into rows of each pair's token
    expert: torch.Tensor  # [P_w]
    weight: torch.Tensor  # [P_w]
    handle: Any = None  # transport handle, or the exception raised while sending
    result: Any = None  # once collected: the output [T_w, H] or the call's exception


class _PendingCluster(PendingExperts):
    def __init__(self, dispatcher: "ClusterDispatcher", layer: int, hidden: torch.Tensor, messages: list[_Message]):
        self.dispatcher, self.layer, self.hidden, self.messages = dispatcher, layer, hidden, messages

    def wait(self) -> torch.Tensor:
        out = torch.zeros_like(self.hidden)  # [T, H]
        failed = self.dispatcher._gather(self.messages, out)
        if failed:
            self.dispatcher._recover(self.layer, self.hidden, failed, out)
        return out


class ClusterDispatcher(ExpertDispatcher):
    def __init__(self, plan: PlacementPlan, transport: Transport, workers: dict[int, Any],
                 on_worker_failure: Callable[[int], None] | None = None, recovery_timeout: float = 120.0):
        self.transport = transport
        self.on_worker_failure = on_worker_failure  # tells the controller (fire and forget)
        self.recovery_timeout = recovery_timeout
        self.recoveries: list[dict] = []  # engine thread: each failover with its pairs and seconds
        self._dead: set[int] = set()  # engine thread: workers seen failing; ids are never reused
        self._in_flight: dict[int, _Message] = {}  # engine thread: per worker, the request sent, not yet collected
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
        self._plan, self._table = plan, ReplicaTable.from_plan(plan, exclude=self._dead)

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
        # Collect every reply still out first. Between steps nothing is in flight, except what a failed step
        # left; recovery calls this mid-step, with the other micro-batch's requests out. A worker waits for its
        # reply to be taken (a collective link's reply send, a socket's full buffer), so replies are not left
        # waiting across an idle spell or a recovery; and a new plan may close their connections (retain).
        self._drain_all()
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None:
            self._apply(pending[0])
            pending[1].set()

    def close(self) -> None:
        self.transport.close()

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        # The routing bookkeeping runs on the host, where the replica table lives (the split per worker needs
        # the worker ids there anyway); only the hidden rows go from the engine's device to the transport.
        token, expert, weight = to_pairs(topk_ids.cpu(), topk_weights.cpu())  # [P]
        worker = self._table.assign(layer, expert)  # [P]
        return _PendingCluster(self, layer, hidden, self._send(layer, hidden, token, expert, weight, worker))

    def _send(self, layer, hidden, token, expert, weight, worker) -> list[_Message]:
        messages = []
        for w in torch.unique(worker).tolist():  # one message per worker that has tokens
            sel = worker == w
            rows, local = torch.unique(token[sel], return_inverse=True)  # rows this worker needs
            m = _Message(w, rows, local, expert[sel], weight[sel])
            self._drain(w)  # one request in flight per connection (module docstring)
            try:
                m.handle = self.transport.submit(w, layer, hidden[rows], local, m.expert, m.weight)
                self._in_flight[w] = m
            except Exception as err:  # a dead peer can fail the send already
                m.handle = err
            messages.append(m)
        return messages

    def _drain(self, worker: int) -> None:
        """Collect the reply of the request in flight to this worker, if any, into its message."""
        m = self._in_flight.get(worker)
        if m is not None:
            self._collect(m)

    def _drain_all(self) -> None:
        for w in list(self._in_flight):
            self._drain(w)

    def _collect(self, m: _Message) -> None:
        # Out of `_in_flight` before collecting: once collect has read (or failed to read) the reply, nothing may
        # try to read it again (a later drain would wait on the connection for a reply that never comes).
        if self._in_flight.get(m.worker) is m:
            del self._in_flight[m.worker]
        m.result = self.transport.collect([m.handle])[0]

    def _gather(self, messages: list[_Message], out: torch.Tensor) -> list[_Message]:
        """Add every successful partial output into out [T, H]; return the messages whose call failed.

        A worker's error (`WorkerError`) fails the step: raised here, after every reply was collected."""
        for m in messages:
            if m.result is None:  # the rest were collected by _drain
                self._collect(m)
        failed = [m for m in messages if isinstance(m.result, BaseException)]
        refused = [m for m in failed if isinstance(m.result, WorkerError)]
        if refused:
            # The step is lost: workers whose calls failed beside it are still marked dead (the controller
            # replaces them), but nothing is re-run.
            self._mark_dead([m for m in failed if m not in refused], "the step fails")
            m = refused[0]
            raise WorkerError(f"expert worker {m.worker}: {m.result}") from m.result
        for m in messages:
            if not isinstance(m.result, BaseException):
                # Outputs come back where the transport delivers them (host memory for sockets and Ray calls).
                out.index_add_(0, m.rows.to(out.device), m.result.to(out.device, out.dtype))
        return failed

    def _mark_dead(self, failed: list[_Message], then: str) -> None:
        """Take the workers of these failed calls for dead (once each) and tell the controller."""
        for m in failed:
            if m.worker in self._dead:
                continue
            self._dead.add(m.worker)
            log.warning("expert worker %d failed (%s: %s); %s", m.worker, type(m.result).__name__, m.result, then)
            if self.on_worker_failure is not None:
                self.on_worker_failure(m.worker)

    def _recover(self, layer: int, hidden: torch.Tensor, failed: list[_Message], out: torch.Tensor) -> None:
        """Re-run failed workers' pairs on other replicas, waiting for a replacement where none is left."""
        started = time.monotonic()
        deadline = started + self.recovery_timeout
        token = torch.cat([m.rows[m.local] for m in failed])  # [P_f] rows of hidden
        expert = torch.cat([m.expert for m in failed])
        weight = torch.cat([m.weight for m in failed])
        waited = False
        while True:
            self._mark_dead(failed, f"re-running {len(token)} pairs of layer {layer} elsewhere")
            self.begin_step()  # collects replies still out; adopts a plan with a replacement if one came
            self._table = ReplicaTable.from_plan(self._plan, exclude=self._dead)
            worker = self._table.assign(layer, expert)
            if bool((worker >= 0).all()):
                failed = self._gather(self._send(layer, hidden, token, expert, weight, worker), out)
                if not failed:
                    break
                token = torch.cat([m.rows[m.local] for m in failed])
                expert, weight = torch.cat([m.expert for m in failed]), torch.cat([m.weight for m in failed])
                continue
            if time.monotonic() > deadline:
                lost = sorted(set(expert[worker < 0].tolist()))
                raise RecoveryTimeout(f"layer {layer}: experts {lost} have no live replica after "
                                      f"{self.recovery_timeout:.0f} s")
            waited = True
            time.sleep(0.02)  # a replacement is loading; the controller pushes its plan
        self.recoveries.append({"layer": layer, "pairs": len(expert), "waited_for_replacement": waited,
                                "seconds": time.monotonic() - started})
