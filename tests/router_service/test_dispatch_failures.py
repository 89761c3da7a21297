"""ClusterDispatcher's two kinds of failure, over real sockets and real gloo links to expert servers in this
process (no Ray): a worker that answers with an error fails the step and keeps serving, unmarked; a reply
left uncollected for longer than the link's timeout (a failed step's, or the other micro-batch's while a
recovery waits for a replacement) does not cost a healthy worker its link.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from expert_workers.checkpoint import Checkpoint
from expert_workers.collective import LinkServer
from expert_workers.experts import ExpertGroup
from expert_workers.wire import ExpertServer, WorkerError
from router_service.cluster_dispatch import ClusterDispatcher
from router_service.dispatch import LocalDispatcher
from router_service.placement import PlacementPlan, WorkerPlacement
from router_service.transports import CollectiveTransport
from tests.router_service.test_micro_batches import InProcessSocketTransport

TIMEOUT = 3.0  # the transports' timeout: a call stuck on a reply that never comes fails after this


class InProcessCollectiveTransport(CollectiveTransport):
    """The real collective transport (gloo), linked to LinkServers in this process (no Ray for the rendezvous)."""

    def __init__(self, servers: dict[int, LinkServer], timeout: float):
        super().__init__("gloo", timeout=timeout)
        self.servers = servers

    def connect(self, workers):
        for w in workers:
            if w not in self._links:
                self.add(w, self.join(self.servers[w].rendezvous, f"expert worker {w}"))


@pytest.fixture(scope="module")
def model(tiny_model):
    checkpoint = Checkpoint(tiny_model)
    spec = checkpoint.spec
    layer, E = spec.moe_layers[0], spec.moe.num_experts
    local = LocalDispatcher(ExpertGroup.load(checkpoint, {layer: list(range(E))}, torch.float32))
    return checkpoint, layer, E, spec.hidden_size, local


def plan_of(version: int, layer: int, E: int, workers: dict[int, list[int]]) -> PlacementPlan:
    return PlacementPlan(version, E, (layer,), tuple(WorkerPlacement(w, f"w{w}", tuple((layer, e) for e in experts))
                                                     for w, experts in workers.items()))


def routed(T: int, H: int, experts: list[int], seed: int):
    """hidden [T, H], topk ids [T, 2] drawn from `experts` (two distinct per token), weights [T, 2]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.tensor(experts)[torch.randperm(len(experts), generator=g)[:2]] for _ in range(T)])
    return torch.randn(T, H, generator=g), ids, torch.rand(T, 2, generator=g)


def serve(kind: str, groups: dict[int, ExpertGroup]):
    """Expert servers of `kind` for these groups, and a transport connected to none of them yet."""
    if kind == "socket":
        servers = {w: ExpertServer(g.run) for w, g in groups.items()}
        return servers, InProcessSocketTransport(servers, timeout=TIMEOUT)
    servers = {w: LinkServer(g.run, "127.0.0.1", "gloo", timeout=TIMEOUT).start() for w, g in groups.items()}
    return servers, InProcessCollectiveTransport(servers, timeout=TIMEOUT)


def stop(kind: str, dispatcher: ClusterDispatcher, servers: dict) -> None:
    dispatcher.close()
    for s in servers.values():
        if kind == "socket":
            s.close()
        else:
            s.thread.join(10)


@pytest.mark.parametrize("kind", ["socket", "collective"])
def test_worker_error_fails_the_step_and_the_worker_keeps_serving(model, kind):
    """Worker 0 is planned to host expert 0 but does not: a call routed there is answered with an error. That
    step fails with it (the engine then fails the step's requests); the worker is not taken for dead, and the
    next dispatch to it, with both micro-batch-like dispatches in flight, is served at once."""
    checkpoint, layer, E, H, local = model
    evens, odds = list(range(0, E, 2)), list(range(1, E, 2))
    groups = {0: ExpertGroup.load(checkpoint, {layer: evens[1:]}, torch.float32),  # expert 0 missing
              1: ExpertGroup.load(checkpoint, {layer: odds}, torch.float32)}
    servers, transport = serve(kind, groups)
    failures = []
    dispatcher = ClusterDispatcher(plan_of(1, layer, E, {0: evens, 1: odds}), transport, {0: None, 1: None},
                                   on_worker_failure=failures.append, recovery_timeout=1.0)
    try:
        bad = routed(6, H, [0, 1, 2, 3], seed=0)
        bad[1][0] = torch.tensor([0, 1])  # token 0 goes to the missing expert
        with pytest.raises(WorkerError, match=r"experts \[0\] are not hosted") as raised:
            dispatcher.dispatch(layer, *bad).wait()

        good = [routed(5, H, list(range(1, E)), seed=s) for s in (1, 2)]
        started = time.monotonic()
        pending = [dispatcher.dispatch(layer, *w) for w in good]  # two in flight, as with two micro-batches
        got = [p.wait() for p in pending]
        assert time.monotonic() - started < TIMEOUT / 2  # not stuck on the failed call's reply
        for w, out in zip(good, got):
            torch.testing.assert_close(out, local.dispatch(layer, *w).wait(), atol=1e-5, rtol=1e-5)
        assert failures == [] and dispatcher.recoveries == [] and dispatcher._dead == set()
        assert str(raised.value).startswith("expert worker 0: ")  # which worker said so
        if kind == "collective":
            assert servers[0].thread.is_alive() and servers[0].requests == 3
    finally:
        stop(kind, dispatcher, servers)


@pytest.mark.parametrize("idle", ["engine idle", "no step boundary"])
def test_reply_left_uncollected_past_the_link_timeout_keeps_the_link(model, idle):
    """A failed step leaves a request's reply uncollected; the engine then idles longer than the link's timeout.
    The worker must still be there for the next step (it waits for its reply to be taken as long as it waits
    for a request), and the engine's idle `begin_step` collects the leftover at once."""
    checkpoint, layer, E, H, local = model
    group = ExpertGroup.load(checkpoint, {layer: list(range(E))}, torch.float32)
    servers = {0: LinkServer(group.run, "127.0.0.1", "gloo", timeout=1.0).start()}
    failures = []
    dispatcher = ClusterDispatcher(plan_of(1, layer, E, {0: list(range(E))}),
                                   InProcessCollectiveTransport(servers, timeout=1.0), {0: None},
                                   on_worker_failure=failures.append, recovery_timeout=1.0)
    try:
        work = routed(4, H, list(range(E)), seed=3)
        dispatcher.dispatch(layer, *work)  # never waited for: its step failed
        if idle == "engine idle":
            dispatcher.begin_step()
            assert dispatcher._in_flight == {}
        time.sleep(1.5)
        out = dispatcher.dispatch(layer, *work).wait()
        torch.testing.assert_close(out, local.dispatch(layer, *work).wait(), atol=1e-5, rtol=1e-5)
        assert failures == [] and dispatcher.recoveries == [] and servers[0].thread.is_alive()
    finally:
        stop("collective", dispatcher, servers)


def test_recovery_waiting_longer_than_the_link_timeout_keeps_the_other_links(model, caplog):
    """Two micro-batches in flight; worker 0's link is gone, and it held the only replica of its experts, so
    micro-batch A's recovery waits (longer than the link timeout) for the replacement, worker 2. Meanwhile B's
    request to the healthy worker 1 is out: its reply must be collected, not left to time out the link."""
    checkpoint, layer, E, H, local = model
    evens, odds = list(range(0, E, 2)), list(range(1, E, 2))
    groups = {w: ExpertGroup.load(checkpoint, {layer: e}, torch.float32) for w, e in {0: evens, 1: odds}.items()}

    def link(w: int) -> LinkServer:  # a worker opens a link when the router asks (it waits for it that long)
        return LinkServer(groups[w % 2].run, "127.0.0.1", "gloo", timeout=1.0).start()

    servers = {w: link(w) for w in (0, 1)}
    transport = InProcessCollectiveTransport(servers, timeout=1.0)
    failures = []
    dispatcher = ClusterDispatcher(plan_of(1, layer, E, {0: evens, 1: odds}), transport, {0: None, 1: None},
                                   on_worker_failure=failures.append, recovery_timeout=5.0)

    def replace():  # the controller's replacement for worker 0: worker 2, with the same experts
        servers[2] = link(2)
        dispatcher.set_plan(plan_of(2, layer, E, {1: odds, 2: evens}), {1: None, 2: None})

    replacement = threading.Timer(1.5, replace)
    try:
        transport.retain({1})  # worker 0's link ends (as if it died): calls to it fail
        work = [routed(6, H, list(range(E)), seed=s) for s in (4, 5)]
        pending = [dispatcher.dispatch(layer, *w) for w in work]  # A, then B
        replacement.start()
        with caplog.at_level(logging.WARNING, logger="router_service.cluster_dispatch"):
            got = [p.wait() for p in pending]
        for w, out in zip(work, got):
            torch.testing.assert_close(out, local.dispatch(layer, *w).wait(), atol=1e-5, rtol=1e-5)
        assert failures == [0] and dispatcher._dead == {0}
        assert len(dispatcher.recoveries) == 2 and dispatcher.recoveries[0]["waited_for_replacement"]
        assert servers[1].thread.is_alive()
        assert "expert worker 0 failed (KeyError" in caplog.text  # the log says why
    finally:
        replacement.join()
        stop("collective", dispatcher, servers)
