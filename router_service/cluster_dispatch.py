"""Dispatch to expert workers: per MoE layer, one message per worker that has tokens.

Each layer's routing becomes one `DispatchPlan` (`plan_pairs`): the (token, expert) pairs sorted by
the worker that runs them (by the current placement plan), each worker's share a slice of the same
few tensors, sizes from one bincount and one host sync. Every worker is sent only the hidden rows
it needs, gathered in one index; the replies land in one buffer, each worker's in its slice, and
are added into the layer's output with one index_add once all are in. How bytes travel is a
`Transport` (router_service.transports).

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
router, reports it to the controller, and re-runs its pairs on other replicas (`_recover`); so do pairs
whose expert has no live replica left, once a replacement arrives.

Threads: `dispatch` and `PendingExperts.wait` run on the engine thread;
`set_plan` runs on another thread: it connects to new workers there, then
queues the plan, which the engine thread adopts at the next step boundary
(`begin_step`). A step never waits for a connection or a weight load.

Shape legend: T tokens, K routed experts per token, H hidden, P pairs, R rows sent (over all
workers), W workers in the replica table, T_w / P_w those sent to worker w.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from expert_workers.wire import WorkerError
from router_service.dispatch import ExpertDispatcher, PendingExperts
from router_service.placement import PlacementPlan, ReplicaTable
from router_service.transports import Transport

log = logging.getLogger(__name__)

NO_REPLICA = -1  # DispatchPlan.workers: the pairs whose logical expert has no live replica


class RecoveryTimeout(RuntimeError):
    """A logical expert lost its last replica and no replacement arrived in time."""


class NoLiveReplica(LookupError):
    """Pairs routed to a logical expert whose every replica is on a worker known dead."""


@dataclass(frozen=True)
class DispatchPlan:
    """One layer's (token, expert) pairs grouped into one message per worker.

    Message i goes to workers[i]: the hidden rows of tokens rows[i] (ascending), and per pair the index
    of its token within those rows, its logical expert and its weight; a token's pairs keep their order.
    Worked example: 3 tokens, top-2, experts {0, 1} on worker 7 and {2, 3} on worker 9, routing
    [[0, 2], [3, 1], [1, 0]]:
        worker 7: rows [0, 1, 2], token [0, 1, 2, 2], expert [0, 1, 1, 0]
        worker 9: rows [0, 1],    token [0, 1],       expert [2, 3]
    """

    workers: list[int]  # worker id per message, ascending by the table's order; NO_REPLICA first if any
    all_rows: torch.Tensor  # [R] every message's rows, message after message
    rows: tuple[torch.Tensor, ...]  # per message [T_w] long: token (row of the layer's hidden) of each row sent
    token: tuple[torch.Tensor, ...]  # per message [P_w] int32: index into its rows
    expert: tuple[torch.Tensor, ...]  # per message [P_w] int32: logical expert
    weight: tuple[torch.Tensor, ...]  # per message [P_w], in the routing weights' dtype
    row_counts: list[int]  # T_w per message


def plan_pairs(table: ReplicaTable, layer: int, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
               num_tokens: int) -> DispatchPlan:
    """Group pairs (token, expert, weight) [P] (host tensors) of one layer of num_tokens tokens by worker.

    In numpy: a layer's plan is some twenty operations on a few hundred values, where a numpy call costs
    about a microsecond and a torch call several (measured: 240 us per plan in torch); the results are
    torch views of the same memory."""
    T = max(num_tokens, 1)
    group = table.assign(layer, expert.numpy()) + 1  # [P] 0: no live replica, g: worker_ids[g - 1]
    key = group * T + token.numpy()  # [P] (group, token)
    order = np.argsort(key, kind="stable")  # [P] pairs by (group, token), a token's in order
    key = key[order]
    new_row = np.empty(len(key), dtype=bool)  # [P] the pair starts a new (group, token) row
    new_row[:1] = True
    np.not_equal(key[1:], key[:-1], out=new_row[1:])
    row_key = key[new_row]  # [R]
    row_group, pair_group = row_key // T, key // T  # [R], [P]
    G = len(table.worker_ids) + 1
    row_counts = np.bincount(row_group, minlength=G)  # [G]
    pair_counts = np.bincount(pair_group, minlength=G)  # [G]
    first_row = np.cumsum(row_counts) - row_counts  # [G] index in row_key of each group's first row
    local = (np.cumsum(new_row) - 1 - first_row[pair_group]).astype(np.int32)  # [P] index within its group's rows
    all_rows = row_key - row_group * T  # [R]
    expert = expert.numpy()[order].astype(np.int32)  # [P]
    dtype = weight.dtype
    sixteen = dtype in (torch.bfloat16, torch.float16)  # numpy has no bf16: moved as int16, viewed back
    weight = (weight.view(torch.int16) if sixteen else weight).numpy()[order]  # [P]
    groups = np.flatnonzero(pair_counts)  # [M] the groups that get a message
    row_counts, pair_counts = row_counts[groups].tolist(), pair_counts[groups].tolist()
    weight = torch.from_numpy(weight)
    # Each message's slices: one split per array (a group without pairs has no rows either), so the cost per
    # message is a tensor view made in C++, not Python slicing: at DeepSeek-V3's 64 workers that was most of it.
    return DispatchPlan(workers=[NO_REPLICA if g == 0 else table.worker_ids[g - 1] for g in groups.tolist()],
                        all_rows=torch.from_numpy(all_rows), rows=torch.from_numpy(all_rows).split(row_counts),
                        token=torch.from_numpy(local).split(pair_counts),
                        expert=torch.from_numpy(expert).split(pair_counts),
                        weight=(weight.view(dtype) if sixteen else weight).split(pair_counts), row_counts=row_counts)


def plan_dispatch(table: ReplicaTable, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchPlan:
    """The plan of one layer's routing: topk_ids, topk_weights [T, K] on the host."""
    T, K = topk_ids.shape
    token = torch.from_numpy(np.arange(T * K) // K)  # [P] pair p = (token p // K, its (p mod K)-th choice)
    return plan_pairs(table, layer, token, topk_ids.reshape(-1), topk_weights.reshape(-1), T)


@dataclass
class _Message:
    """One worker's share of one layer's pairs, and what became of it."""

    worker: int
    rows: torch.Tensor  # [T_w] rows of the layer's hidden states sent
    token: torch.Tensor  # [P_w] int32 index into rows of each pair's token
    expert: torch.Tensor  # [P_w] int32
    weight: torch.Tensor  # [P_w]
    reply: torch.Tensor  # [T_w, H] this message's slice of the dispatch's reply buffer
    handle: Any = None  # transport handle
    done: bool = False  # the reply was collected into `reply`, or the call failed
    error: BaseException | None = None  # the call's exception, once done

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token as a row of the layer's hidden, expert, weight) [P_w], as `plan_pairs` takes them."""
        return self.rows[self.token.long()], self.expert.long(), self.weight


class _PendingCluster(PendingExperts):
    def __init__(self, dispatcher: "ClusterDispatcher", layer: int, hidden: torch.Tensor, experts: torch.Tensor,
                 sent: "_Sent"):
        self.dispatcher, self.layer, self.hidden, self.experts, self.sent = dispatcher, layer, hidden, experts, sent

    def wait(self) -> torch.Tensor:
        out = self.dispatcher._gather(self.sent, self.hidden)  # [T, H], accumulating
        if self.sent.failed:
            self.dispatcher._recover(self.layer, self.hidden, self.sent.failed, out)
        return out


@dataclass
class _Sent:
    """One plan's messages on their way, and the buffer their replies land in."""

    plan: DispatchPlan
    replies: torch.Tensor  # [R, H] message after message, as plan.all_rows
    messages: list[_Message]
    failed: list[_Message] = field(default_factory=list)  # set by _gather


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
        # The plan is made on the host, where the replica table lives and where the wire needs the split
        # sizes: one host copy of the routing, which load telemetry counts too (`experts`). Only the hidden
        # rows go from the engine's device to the transport.
        topk_ids, topk_weights = topk_ids.cpu(), topk_weights.cpu()  # [T, K]
        plan = plan_dispatch(self._table, layer, topk_ids, topk_weights)
        return _PendingCluster(self, layer, hidden, topk_ids.reshape(-1), self._send(layer, hidden, plan))

    def _send(self, layer: int, hidden: torch.Tensor, plan: DispatchPlan) -> _Sent:
        sent = torch.index_select(hidden, 0, plan.all_rows.to(hidden.device)).split(plan.row_counts)  # [T_w, H] each
        replies = self.transport.reply_buffer(len(plan.all_rows), hidden)  # [R, H]
        messages, out, requests = [], [], []
        for w, rows, h, token, expert, weight, reply in zip(plan.workers, plan.rows, sent, plan.token, plan.expert,
                                                            plan.weight, replies.split(plan.row_counts)):
            m = _Message(w, rows, token, expert, weight, reply)
            messages.append(m)
            if w == NO_REPLICA:
                m.done, m.error = True, NoLiveReplica(f"layer {layer}: experts {sorted(set(expert.tolist()))}")
                continue
            self._drain(w)  # one request in flight per connection (module docstring)
            out.append(m)
            requests.append((w, h, token, expert, weight, reply))
        for m, handle in zip(out, self.transport.submit_all(layer, requests)):  # every request at once
            if isinstance(handle, BaseException):
                m.done, m.error = True, handle
            else:
                m.handle = handle
                self._in_flight[m.worker] = m
        return _Sent(plan, replies, messages)

    def _drain(self, worker: int) -> None:
        """Collect the reply of the request in flight to this worker, if any, into its message."""
        m = self._in_flight.get(worker)
        if m is not None:
            self._collect(m)

    def _drain_all(self) -> None:
        for w in list(self._in_flight):
            self._drain(w)

    def _collect(self, m: _Message) -> None:
        self._collect_all([m])

    def _collect_all(self, messages: list[_Message]) -> None:
        """Collect these messages' replies (one transport call: they may arrive in any order)."""
        if not messages:
            return
        # Out of `_in_flight` before collecting: once collect has read (or failed to read) a reply, nothing may
        # try to read it again (a later drain would wait on the connection for a reply that never comes).
        for m in messages:
            if self._in_flight.get(m.worker) is m:
                del self._in_flight[m.worker]
        for m, result in zip(messages, self.transport.collect([m.handle for m in messages])):
            m.done = True
            if isinstance(result, BaseException):
                m.error = result
            elif result is not m.reply:  # a transport that could not write in place
                m.reply.copy_(result)

    def _gather(self, sent: _Sent, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Collect every message's reply and add them into out [T, H] (new if None), returned.

        Messages whose call failed are left in `sent.failed`; a worker's error (`WorkerError`) fails the
        step: raised here, after every reply was collected."""
        self._collect_all([m for m in sent.messages if not m.done])  # the rest: collected by _drain, or failed
        sent.failed = [m for m in sent.messages if m.error is not None]
        refused = [m for m in sent.failed if isinstance(m.error, WorkerError)]
        if refused:
            # The step is lost: workers whose calls failed beside it are still marked dead (the controller
            # replaces them), but nothing is re-run.
            self._mark_dead([m for m in sent.failed if m not in refused], "the step fails")
            m = refused[0]
            raise WorkerError(f"expert worker {m.worker}: {m.error}") from m.error
        for m in sent.failed:
            m.reply.zero_()  # not (fully) written: adds nothing; its pairs are re-run
        if out is None:
            out = torch.zeros_like(hidden)  # [T, H]
        # One index_add in plan order (worker by worker): the sum's bits do not depend on when replies came.
        return out.index_add_(0, sent.plan.all_rows.to(out.device), sent.replies.to(out.device))

    def _mark_dead(self, failed: list[_Message], then: str) -> None:
        """Take the workers of these failed calls for dead (once each) and tell the controller."""
        for m in failed:
            if m.worker == NO_REPLICA or m.worker in self._dead:
                continue
            self._dead.add(m.worker)
            log.warning("expert worker %d failed (%s: %s); %s", m.worker, type(m.error).__name__, m.error, then)
            if self.on_worker_failure is not None:
                self.on_worker_failure(m.worker)

    def _recover(self, layer: int, hidden: torch.Tensor, failed: list[_Message], out: torch.Tensor) -> None:
        """Re-run failed workers' pairs on other replicas, waiting for a replacement where none is left."""
        started = time.monotonic()
        deadline = started + self.recovery_timeout
        token, expert, weight = (torch.cat(t) for t in zip(*(m.pairs() for m in failed)))  # [P_f]
        waited = False
        while True:
            self._mark_dead(failed, f"re-running {len(token)} pairs of layer {layer} elsewhere")
            self.begin_step()  # collects replies still out; adopts a plan with a replacement if one came
            self._table = ReplicaTable.from_plan(self._plan, exclude=self._dead)
            plan = plan_pairs(self._table, layer, token, expert, weight, len(hidden))
            if NO_REPLICA not in plan.workers:
                sent = self._send(layer, hidden, plan)
                self._gather(sent, hidden, out)
                failed = sent.failed
                if not failed:
                    break
                token, expert, weight = (torch.cat(t) for t in zip(*(m.pairs() for m in failed)))
                continue
            if time.monotonic() > deadline:
                lost = sorted(set(plan.expert[0].tolist()))
                raise RecoveryTimeout(f"layer {layer}: experts {lost} have no live replica after "
                                      f"{self.recovery_timeout:.0f} s")
            waited = True
            time.sleep(0.02)  # a replacement is loading; the controller pushes its plan
        self.recoveries.append({"layer": layer, "pairs": len(expert), "waited_for_replacement": waited,
                                "seconds": time.monotonic() - started})
