"""The fast data plane's wire format: a real ExpertServer on a Unix socket and on TCP loopback, no Ray.

Every test runs twice: with the C++ wire ops (csrc/wire.cpp) and with the Python functions that stand in
for them where they cannot be built; the interoperability tests put one at each end of a socket."""

from __future__ import annotations

import socket

import pytest
import torch

from expert_workers import native, wire
from expert_workers.checkpoint import Checkpoint
from expert_workers.experts import ExpertGroup
from expert_workers.wire import (ExpertServer, ProtocolError, ReceiveBuffer, WireError, WorkerError, recv_request,
                                 recv_response, send_request)


_BUILT_OPS = wire.native_ops  # the real loader, kept before any test patches it


def _python_wire(monkeypatch):
    monkeypatch.setattr(wire, "native_ops", lambda: None)


def _native_ops():
    if native.missing_toolchain():
        pytest.skip(f"no {' or '.join(native.missing_toolchain())} to build the C++ wire ops")
    ops = _BUILT_OPS()
    assert ops is not None, "the C++ wire ops failed to build (see the log)"
    return ops


@pytest.fixture(params=["native", "python"], autouse=True)
def wire_path(request, monkeypatch):
    """Which implementation carries the bytes at both ends, server threads included."""
    if request.param == "python":
        _python_wire(monkeypatch)
    else:
        _native_ops()
    return request.param


@pytest.fixture(scope="module")
def group(tiny_model):
    checkpoint = Checkpoint(tiny_model)
    return ExpertGroup.load(checkpoint, {1: [0, 2, 5], 2: [1, 3]}, torch.float32)


@pytest.fixture(scope="module")
def server(group):
    server = ExpertServer(group.run, "127.0.0.1")
    yield server
    server.close()


def _connect(server, kind):
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.unix_path)
        return sock
    return socket.create_connection(server.tcp_address)


def _pairs(T, experts, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    token = torch.arange(T).repeat_interleave(K)  # [P]
    expert = torch.tensor(experts)[torch.randint(0, len(experts), (T * K,), generator=g)]
    weight = torch.rand(T * K, generator=g)
    return token, expert, weight


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_equals_local_compute(group, server, kind, dtype):
    H = 64
    hidden = torch.randn(7, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    token, expert, weight = _pairs(7, [0, 2, 5])
    with _connect(server, kind) as sock:
        for _ in range(3):  # several requests on one connection, answered in order
            send_request(sock, 1, hidden, token, expert, weight)
            out = recv_response(sock)
    assert out.dtype == dtype and out.shape == (7, H)
    expected = group.run(1, hidden.float(), token, expert, weight).to(dtype)
    # the server computes in the request's dtype; fp32 is exact, bf16 within its rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=0 if dtype == torch.float32 else 2e-2,
                               atol=0 if dtype == torch.float32 else 2e-2)


def test_empty_and_large_batches(group, server):
    H = 64
    with _connect(server, "unix") as sock:
        send_request(sock, 2, torch.zeros(0, H), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                     torch.zeros(0))
        assert recv_response(sock).shape == (0, H)
        hidden = torch.randn(2048, H)  # 512 KiB each way: several partial sends and receives
        token, expert, weight = _pairs(2048, [1, 3], seed=3)
        send_request(sock, 2, hidden, token, expert, weight)
        torch.testing.assert_close(recv_response(sock), group.run(2, hidden, token, expert, weight), rtol=0, atol=0)


def test_worker_error_is_reported_and_the_connection_keeps_serving(server):
    H = 64
    with _connect(server, "tcp") as sock:
        token, expert, weight = torch.tensor([0]), torch.tensor([7]), torch.tensor([1.0])  # expert 7 not hosted
        send_request(sock, 1, torch.randn(1, H), token, expert, weight)
        with pytest.raises(WorkerError, match=r"experts \[7\] are not hosted"):
            recv_response(sock)
        send_request(sock, 1, torch.randn(1, H), token, torch.tensor([2]), weight)
        assert recv_response(sock).shape == (1, H)


def test_request_tensors_arrive_in_place_in_their_dtypes_and_the_buffer_is_reused():
    """Weights travel in the compute dtype; the worker's views share one buffer per connection."""
    a, b = socket.socketpair(socket.AF_UNIX)
    buffer = ReceiveBuffer()
    with a, b:
        hidden = torch.randn(5, 16).to(torch.bfloat16)
        token = torch.tensor([0, 1, 1, 4], dtype=torch.int32)
        expert = torch.tensor([3, 0, 2, 3])  # int64: sent as int32
        weight = torch.tensor([0.5, 0.25, 0.125, 1.0])  # fp32: sent in hidden's dtype
        send_request(a, 7, hidden, token, expert, weight)
        layer, h, t, e, w = recv_request(b, buffer)
        assert layer == 7 and torch.equal(h, hidden) and torch.equal(t, token)
        assert e.dtype == torch.int32 and e.tolist() == expert.tolist()
        assert w.dtype == torch.bfloat16 and torch.equal(w, weight.to(torch.bfloat16))
        send_request(a, 7, hidden[:2], token[:1], expert[:1], weight[:1])
        _, h2, t2, _, _ = recv_request(b, buffer)
        assert h2.shape == (2, 16) and t2.tolist() == [0]
        assert h2.data_ptr() - t2.data_ptr() == 8  # token, expert, then hidden, in one buffer
        assert t2.data_ptr() == t.data_ptr()  # the same memory, not a new allocation


def test_reply_is_received_into_the_callers_buffer(group, server):
    H = 64
    hidden = torch.randn(3, H)
    token, expert, weight = _pairs(3, [0, 2, 5], seed=4)
    with _connect(server, "unix") as sock:
        out = torch.empty(3, H)
        send_request(sock, 1, hidden, token, expert, weight)
        assert recv_response(sock, out) is out
        torch.testing.assert_close(out, group.run(1, hidden, token, expert, weight), rtol=0, atol=0)
        send_request(sock, 1, hidden, token, expert, weight)
        with pytest.raises(ProtocolError, match=r"reply of \[3, 64\].*for a request of \[2, 64\]"):
            recv_response(sock, torch.empty(2, H))


def _request():
    hidden = torch.randn(5, 16).to(torch.bfloat16)
    token = torch.tensor([0, 1, 1, 4], dtype=torch.int32)
    expert = torch.tensor([3, 0, 2, 3], dtype=torch.int32)
    weight = torch.tensor([0.5, 0.25, 0.125, 1.0]).to(torch.bfloat16)
    return hidden, token, expert, weight


@pytest.mark.parametrize("sender", ["native", "python"])
def test_each_implementation_reads_the_others_bytes(monkeypatch, wire_path, sender):
    """A C++ end and a Python end of one connection understand each other, both ways, errors included."""
    ops = _native_ops()
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        hidden, token, expert, weight = _request()

        def as_sender(fn, *args):
            with monkeypatch.context() as m:
                if sender == "python":
                    _python_wire(m)
                else:
                    m.setattr(wire, "native_ops", lambda: ops)
                return fn(*args)

        # the receiving end is wire_path's; the sending end is `sender`
        as_sender(send_request, a, 3, hidden, token, expert, weight)
        layer, h, t, e, w = recv_request(b, ReceiveBuffer())
        assert (layer, h.tolist(), t.tolist(), e.tolist(), w.tolist()) == (3, hidden.tolist(), token.tolist(),
                                                                           expert.tolist(), weight.tolist())
        as_sender(wire.send_response, b, h * 2)
        out = torch.empty(5, 16, dtype=torch.bfloat16)
        assert recv_response(a, out) is out and torch.equal(out, hidden * 2)
        as_sender(wire.send_error, b, "KeyError: layer 3: experts [9] are not hosted here")
        with pytest.raises(WorkerError, match=r"experts \[9\] are not hosted"):
            recv_response(a, out)
        assert wire.request_bytes(5, 4, 16, torch.bfloat16) == wire.REQ.size + 8 * 4 + (5 * 16 + 4) * 2


def test_a_silent_or_closed_peer_fails_the_call_as_the_transports_expect():
    """Timeouts raise TimeoutError, a closed peer WireError, bad bytes ProtocolError: both implementations."""
    a, b = socket.socketpair(socket.AF_UNIX)
    a.settimeout(0.2)
    out = torch.empty(1, 4)
    with a:
        with pytest.raises(TimeoutError):
            recv_response(a, out)
        b.sendall(b"XXXX" + bytes(13))
        with pytest.raises(ProtocolError, match="magic"):
            recv_response(a, out)
        b.close()
        with pytest.raises(WireError, match="closed"):
            recv_response(a, out)


def test_one_layers_requests_go_and_come_back_together_each_failing_on_its_own(group, server):
    """send_requests / recv_responses: three connections; one request names an expert not hosted (a worker
    error: its connection keeps serving), one peer has closed; the others' replies land in their buffers."""
    H = 64
    hidden = [torch.randn(T, H, generator=torch.Generator().manual_seed(T)) for T in (3, 5)]
    pairs = [_pairs(3, [0, 2, 5], seed=5), _pairs(5, [0, 2, 5], seed=6)]
    dead, gone = socket.socketpair(socket.AF_UNIX)
    gone.close()
    with _connect(server, "unix") as a, _connect(server, "tcp") as b, dead:
        bad = (torch.tensor([0]), torch.tensor([7]), torch.tensor([1.0]))  # expert 7 is not hosted
        socks = [a, b, dead]
        errors = wire.send_requests(socks, 1, [hidden[0], hidden[1][:1], hidden[1]],
                                    [pairs[0][0], bad[0], pairs[1][0]], [pairs[0][1], bad[1], pairs[1][1]],
                                    [pairs[0][2], bad[2], pairs[1][2]])
        assert errors[:2] == [None, None] and isinstance(errors[2], OSError)
        outs = [torch.empty(3, H), torch.empty(1, H)]
        got = wire.recv_responses([a, b], outs)
        assert got[0] is outs[0]
        torch.testing.assert_close(outs[0], group.run(1, hidden[0], *pairs[0]), rtol=0, atol=0)
        assert isinstance(got[1], WorkerError) and "experts [7] are not hosted" in str(got[1])
        # the worker's error left b serving
        assert wire.send_requests([b], 1, [hidden[1]], *([p] for p in pairs[1])) == [None]
        out = torch.empty(5, H)
        assert wire.recv_responses([b], [out]) == [out]
        torch.testing.assert_close(out, group.run(1, hidden[1], *pairs[1]), rtol=0, atol=0)
        assert isinstance(wire.recv_responses([dead], [torch.empty(1, H)])[0], WireError)
