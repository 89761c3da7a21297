"""The collective data plane over gloo: real 2-rank process groups between CollectiveTransport (router end)
and LinkServer (worker end), in this process on threads or in a child process; no Ray, no mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from expert_workers.checkpoint import Checkpoint
from expert_workers.collective import REQ_LEN, RSP_LEN, STATUS_PROTOCOL, LinkError, LinkServer
from expert_workers.experts import ExpertGroup
from expert_workers.wire import WorkerError
from router_service.transports import CollectiveTransport

HOSTED = {1: [0, 2, 5], 2: [1, 3]}
H = 64


@pytest.fixture(scope="module")
def group(tiny_model):
    return ExpertGroup.load(Checkpoint(tiny_model), HOSTED, torch.float32)


@pytest.fixture
def links(group):
    """A transport linked to two worker ends (ids 0 and 1) served on threads of this process."""
    servers = [LinkServer(group.run, "127.0.0.1", "gloo", timeout=20).start() for _ in range(2)]
    transport = CollectiveTransport("gloo", timeout=20)
    for worker_id, server in enumerate(servers):
        transport.add(worker_id, transport.join(server.rendezvous, f"expert worker {worker_id}"))
    yield transport, servers
    transport.close()
    for server in servers:  # every worker end has ended: no thread left behind
        server.thread.join(10)
        assert not server.thread.is_alive()


def routed(T, experts, seed):
    """Two pairs per token to random experts of `experts`: token, expert [2T] and weight [2T]."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.tensor(experts)[torch.randint(len(experts), (2 * T,), generator=g)]
    return torch.arange(T).repeat_interleave(2), expert, torch.rand(2 * T, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_equals_local_compute(group, links, dtype):
    transport, _ = links
    hidden = torch.randn(7, H, generator=torch.Generator().manual_seed(1)).to(dtype)  # [T, H]
    calls = {0: (1, *routed(7, HOSTED[1], 0)), 1: (2, *routed(7, HOSTED[2], 1))}  # worker -> layer, pairs
    for _ in range(3):  # several requests on each link, both links in flight at once
        outs = transport.collect([transport.submit(w, layer, hidden, t, e, p) for w, (layer, t, e, p) in calls.items()])
    for out, (layer, token, expert, weight) in zip(outs, calls.values()):
        assert out.dtype == dtype and out.shape == (7, H)
        expected = group.run(layer, hidden, token, expert, weight.to(dtype))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same compute on the same tensors


def test_empty_and_large_batches(group, links):
    transport, _ = links
    empty = torch.zeros(0, dtype=torch.long)
    (out,) = transport.collect([transport.submit(0, 2, torch.zeros(0, H), empty, empty, torch.zeros(0))])
    assert out.shape == (0, H)
    hidden = torch.randn(2048, H)  # 512 KiB each way
    token, expert, weight = routed(2048, HOSTED[2], 3)
    (out,) = transport.collect([transport.submit(1, 2, hidden, token, expert, weight)])
    torch.testing.assert_close(out, group.run(2, hidden, token, expert, weight), rtol=0, atol=0)


def test_worker_error_is_reported_and_the_link_keeps_serving(links):
    transport, servers = links
    token, weight = torch.tensor([0]), torch.tensor([1.0])
    (err,) = transport.collect([transport.submit(0, 1, torch.randn(1, H), token, torch.tensor([7]), weight)])
    assert isinstance(err, WorkerError)
    assert "experts [7] are not hosted" in str(err)
    (out,) = transport.collect([transport.submit(0, 1, torch.randn(1, H), token, torch.tensor([2]), weight)])
    assert out.shape == (1, H)
    assert servers[0].thread.is_alive() and servers[0].requests == 2


def test_retain_closes_the_worker_end_of_dropped_links(links):
    transport, servers = links
    transport.retain({1})
    servers[0].thread.join(10)
    assert not servers[0].thread.is_alive()  # the worker's thread ended on CLOSE
    with pytest.raises(KeyError):
        transport.submit(0, 1, torch.randn(1, H), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    (out,) = transport.collect([transport.submit(1, 2, torch.randn(1, H), torch.tensor([0]), torch.tensor([1]),
                                                 torch.tensor([1.0]))])
    assert out.shape == (1, H)


def test_a_request_the_worker_cannot_read_is_answered_before_the_link_ends(links):
    """A header of another protocol (version skew): the worker cannot receive the tensors that follow, so it
    ends the link, but says why first, rather than leaving the router to wait for a reply until its timeout."""
    transport, servers = links
    link = transport._links[0]
    link.send_and_wait([torch.tensor([7, 1, 1, 1, H, 0])], "a header of another protocol", link.ctrl)
    status = torch.empty(RSP_LEN, dtype=torch.int64)
    link.recv_and_wait([status], "reply header", link.ctrl)
    assert status[0] == STATUS_PROTOCOL
    message = torch.empty(int(status[1]), dtype=torch.uint8)
    link.recv_and_wait([message], "error reply", link.ctrl)
    assert bytes(message.tolist()).decode() == "not our protocol: header [7, 1, 1, 1, 64, 0]"
    servers[0].thread.join(10)
    assert not servers[0].thread.is_alive()


CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from expert_workers.checkpoint import Checkpoint
from expert_workers.collective import LinkServer
from expert_workers.experts import ExpertGroup
from expert_workers.wire import WorkerError
group = ExpertGroup.load(Checkpoint(sys.argv[1]), {1: [0, 2, 5]}, torch.float32)
servers = [LinkServer(group.run, "127.0.0.1", "gloo", timeout=60).start() for _ in range(2)]
print(json.dumps([s.rendezvous for s in servers]), flush=True)
time.sleep(600)
"""


def test_silent_or_killed_worker_fails_the_call_not_the_router(tiny_model):
    """A stopped worker process fails the call after the transport's timeout; a killed one at once
    (gloo sees the connection close). Either way collect returns the error and forgets the link."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, tiny_model], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        rendezvous = json.loads(child.stdout.readline())
        transport = CollectiveTransport("gloo", timeout=2)
        for worker_id, r in enumerate(rendezvous):
            transport.add(worker_id, transport.join(r, f"expert worker {worker_id}"))
        link = transport._links[1]
        args = (1, torch.randn(2, H), torch.tensor([0, 1]), torch.tensor([0, 5]), torch.tensor([0.5, 0.5]))
        assert transport.collect([transport.submit(0, *args)])[0].shape == (2, H)

        os.kill(child.pid, signal.SIGSTOP)
        started = time.monotonic()
        (err,) = transport.collect([transport.submit(0, *args)])
        assert isinstance(err, LinkError) and 1.5 < time.monotonic() - started < 10, err
        # which link, which operation (the request's send or the reply's receive, as the timing falls), then gloo's
        assert re.match(r"collective link to expert worker 0 at 127\.0\.0\.1:\d+: "
                        r"(send request header|receive reply header) failed: ", str(err)), err

        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        started = time.monotonic()
        handle = None
        try:
            handle = transport.submit(1, *args)
            (err,) = transport.collect([handle])
        except LinkError as raised:  # gloo may refuse the send at once
            err = raised
        assert isinstance(err, LinkError) and time.monotonic() - started < 1.5, err
        assert str(err).startswith("collective link to expert worker 1 at 127.0.0.1:"), err
        # Posting on the failed link (as the CLOSE of a plan change would) fails as a LinkError too, not as
        # gloo's bare RuntimeError that the transport would take for the worker's own error.
        close = torch.zeros(REQ_LEN, dtype=torch.int64)
        with pytest.raises(LinkError, match=r"^collective link to expert worker 1 at .*: send CLOSE failed: "):
            link.send_and_wait([close], "CLOSE", link.ctrl)
        with pytest.raises(KeyError):  # both links forgotten: the dispatcher re-runs their pairs elsewhere
            transport.submit(0, *args)
        with pytest.raises(KeyError):
            transport.submit(1, *args)
        transport.close()
    finally:
        child.kill()
        child.wait(10)
