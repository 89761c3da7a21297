"""The fast data plane's wire format and the worker-side socket server.

Ray places actors and hands out endpoints; tensors then travel over a plain
stream socket (a Unix socket between processes on one node, TCP across nodes):
a fixed header plus raw tensor bytes, no pickling. One connection per router;
requests on a connection are answered in order.

Request:  header REQ (layer, T, P, H, dtype code) | token [P] i32 | expert [P] i32 | hidden [T, H] | weight [P]
Response: header RSP (status, T, H, dtype code)   | out [T, H]    (status != 0: a UTF-8 error message instead)

hidden, weight and out are in the compute dtype the code names. The 4-byte fields come first so that
every tensor of a request starts at a multiple of its element size and is read in place: each end
receives a message's body into one buffer per connection, reused (`ReceiveBuffer`).

Each message end runs as one C++ op (`csrc/wire.cpp`, built on first use) that packs or parses the header
and moves the bytes with the GIL released; the Python functions here carry the same bytes where it cannot
be built, or with MOE_SERVE_NATIVE_WIRE=0.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import struct
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

REQ = struct.Struct("<4siiiiB")  # magic, layer, T, P, H, dtype code
RSP = struct.Struct("<4siiiB")  # magic, status, T (or message bytes), H, dtype code
MAGIC_REQ, MAGIC_RSP = b"MSRQ", b"MSRP"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
NATIVE_ENV = "MOE_SERVE_NATIVE_WIRE"  # "0": Python's socket calls only


class WireError(ConnectionError):
    """The peer closed the connection or sent something that is not our protocol."""


class ProtocolError(WireError):
    """The peer sent something that is not our protocol (bad magic, unknown dtype code)."""


class WorkerError(RuntimeError):
    """The expert worker answered a request with an error (an expert it does not host, say).

    Every transport returns it for such an answer (socket, collective link, Ray call alike). The worker
    is alive and its connection keeps serving: the request failed, not the worker."""


@functools.cache
def native_ops():
    """The C++ wire ops (torch.ops.moe_serve_wire), built on first use; None where they cannot be (no
    compiler, a failed build, MOE_SERVE_NATIVE_WIRE=0): the Python functions then carry the same bytes."""
    from expert_workers import native

    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    missing = native.missing_toolchain()
    if missing:
        log.info("moe-serve native wire unavailable (no %s on PATH); Python carries the bytes", " or ".join(missing))
        return None
    try:
        native.build("moe_serve_wire", "wire.cpp", ["-O2"])
        return torch.ops.moe_serve_wire
    except Exception as err:  # a failed build must not stop serving
        log.warning("moe-serve native wire failed to build (%s); Python carries the bytes",
                    str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
        return None


def _native(op, *args):
    """Run a wire op, raising what the Python path raises for the same failure (csrc/wire.cpp's kinds)."""
    try:
        return op(*args)
    except RuntimeError as err:
        text = str(err).split("\n", 1)[0]
        kind, _, rest = text.partition(":")
        if kind in ("wire-closed", "wire-timeout", "wire-protocol", "wire-os"):
            raise _failure(text) from None
        raise


def _failure(text: str) -> BaseException:
    """The exception the Python path raises for a batch op's failure text (csrc/wire.cpp's kinds)."""
    kind, _, rest = text.partition(":")
    rest = rest.strip()
    if kind == "worker":
        return WorkerError(f"expert worker error: {rest}")
    if kind == "wire-closed":
        return WireError(rest)
    if kind == "wire-timeout":
        return TimeoutError(rest)
    if kind == "wire-os":
        code, _, message = rest.partition(":")
        return OSError(int(code), message.strip())
    return ProtocolError(rest)


def _timeout(sock: socket.socket) -> float:
    """The socket's timeout for the C++ ops: seconds, or -1 for none."""
    t = sock.gettimeout()
    return -1.0 if t is None else t


def as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (any dtype, bf16 included; copied first if not contiguous).

    Built from the data pointer: numpy has no bf16, and going through a uint8 view costs three torch calls
    per tensor, which is most of a small message's Python time."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.nbytes == 0:
        return memoryview(b"")
    raw = (ctypes.c_char * t.nbytes).from_address(t.data_ptr())
    raw.tensor = t  # the view keeps raw alive, raw keeps the memory's owner alive (t may be a temporary)
    return memoryview(raw).cast("B")


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill view from the stream."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("connection closed by peer")
        got += k


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return buf


class ReceiveBuffer:
    """One connection's receive memory, grown as needed and reused: the tensors of a message received into
    it are views, valid until the next receive on the same connection (the thread reading the connection
    owns it)."""

    def __init__(self):
        self._bytes = bytearray()
        self._view = memoryview(self._bytes)
        self.tensor = torch.empty(0, dtype=torch.uint8)  # the C++ ops' memory (they grow it, returning the new one)

    def recv(self, sock: socket.socket, layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        """The stream's next tensors, of these dtypes and shapes, back to back: views into this buffer."""
        sizes = [torch.Size(shape).numel() * dtype.itemsize for dtype, shape in layout]
        n = sum(sizes)
        if n > len(self._bytes):  # the old buffer lives on while tensors still view it
            self._bytes = bytearray(max(n, 2 * len(self._bytes)))
            self._view = memoryview(self._bytes)
        recv_into(sock, self._view[:n])
        out, offset = [], 0
        for (dtype, shape), size in zip(layout, sizes):
            out.append(torch.frombuffer(self._view, dtype=dtype, count=size // dtype.itemsize, offset=offset)
                       .view(shape) if size else torch.empty(shape, dtype=dtype))
            offset += size
        return out


def send_all(sock: socket.socket, parts: list) -> None:
    """sendmsg with scatter-gather, looping over partial sends. parts: bytes-like (as_bytes's views are
    byte-shaped already)."""
    views = [p if isinstance(p, memoryview) else memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def request_bytes(T: int, P: int, H: int, dtype: torch.dtype) -> int:
    """Bytes of a request of T rows and P pairs on the wire."""
    return REQ.size + 8 * P + (T * H + P) * dtype.itemsize


def response_bytes(T: int, H: int, dtype: torch.dtype) -> int:
    """Bytes of a reply of T rows on the wire."""
    return RSP.size + T * H * dtype.itemsize


def send_request(sock, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                 weight: torch.Tensor) -> None:
    """hidden [T, H] in the compute dtype; token (index into hidden's rows), expert, weight [P]."""
    if (ops := native_ops()) is not None:
        return _native(ops.send_request, sock.fileno(), _timeout(sock), layer, hidden, token, expert, weight)
    T, H = hidden.shape
    P = token.numel()
    header = REQ.pack(MAGIC_REQ, layer, T, P, H, DTYPE_CODES[hidden.dtype])
    send_all(sock, [header, as_bytes(_as(token, torch.int32)), as_bytes(_as(expert, torch.int32)), as_bytes(hidden),
                    as_bytes(_as(weight, hidden.dtype))])


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() is still a torch call


def recv_request(sock, buffer: ReceiveBuffer) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, hidden [T, H], token [P] i32, expert [P] i32, weight [P]): views into buffer."""
    if (ops := native_ops()) is not None:
        layer, hidden, token, expert, weight, buffer.tensor = _native(ops.recv_request, sock.fileno(), _timeout(sock),
                                                                      buffer.tensor)
        return layer, hidden, token, expert, weight
    magic, layer, T, P, H, code = REQ.unpack(recv_exact(sock, REQ.size))
    if magic != MAGIC_REQ or code not in CODE_DTYPES:
        raise ProtocolError(f"bad request header: magic {magic!r}, dtype code {code}")
    dtype = CODE_DTYPES[code]
    token, expert, hidden, weight = buffer.recv(sock, [(torch.int32, (P,)), (torch.int32, (P,)), (dtype, (T, H)),
                                                       (dtype, (P,))])
    return layer, hidden, token, expert, weight


def recv_response(sock, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reply's out [T, H], received straight into `out` when given (a contiguous CPU tensor of the
    request's shape and dtype), else into a new tensor."""
    if out is not None and (not out.is_contiguous() or out.device.type != "cpu"):
        raise ValueError("recv_response: out must be a contiguous CPU tensor")
    if out is not None and (ops := native_ops()) is not None:
        if error := _native(ops.recv_response, sock.fileno(), _timeout(sock), out):
            raise WorkerError(f"expert worker error: {error}")
        return out
    magic, status, T, H, code = RSP.unpack(recv_exact(sock, RSP.size))
    if magic != MAGIC_RSP:
        raise ProtocolError(f"bad response magic {magic!r}")
    if status != 0:
        raise WorkerError(f"expert worker error: {recv_exact(sock, T).decode(errors='replace')}")
    if code not in CODE_DTYPES:
        raise ProtocolError(f"bad response dtype code {code}")
    if out is None:
        out = torch.empty(T, H, dtype=CODE_DTYPES[code])
    elif out.shape != (T, H) or out.dtype != CODE_DTYPES[code]:
        # The stream still holds the reply's bytes: the connection cannot be used after this.
        raise ProtocolError(f"reply of [{T}, {H}] {CODE_DTYPES[code]} for a request of {list(out.shape)} {out.dtype}")
    recv_into(sock, as_bytes(out))
    return out


def send_requests(socks: list, layer: int, hidden: list[torch.Tensor], token: list[torch.Tensor],
                  expert: list[torch.Tensor], weight: list[torch.Tensor]) -> list[BaseException | None]:
    """One layer's requests, one per socket (as send_request each), sent back to back. Per request None once
    sent, else the exception its send raised; a failed send does not stop the others."""
    if (ops := native_ops()) is not None:
        timeout = min((_timeout(s) for s in socks), key=lambda t: t if t >= 0 else float("inf"), default=-1.0)
        failed = ops.send_requests([s.fileno() for s in socks], timeout, layer, hidden, token, expert, weight)
        return [_failure(f) if f else None for f in failed]
    errors: list[BaseException | None] = []
    for s, h, t, e, w in zip(socks, hidden, token, expert, weight):
        try:
            send_request(s, layer, h, t, e, w)
            errors.append(None)
        except Exception as err:
            errors.append(err)
    return errors


def recv_responses(socks: list, outs: list[torch.Tensor]) -> list[torch.Tensor | BaseException]:
    """The reply on each socket into its out (as recv_response each), taken in whatever order they arrive.
    Per socket its out, a WorkerError (the connection keeps serving) or the exception that made the
    connection unusable."""
    if (ops := native_ops()) is not None:
        timeout = min((_timeout(s) for s in socks), key=lambda t: t if t >= 0 else float("inf"), default=-1.0)
        failed = ops.recv_responses([s.fileno() for s in socks], timeout, outs)
        return [_failure(f) if f else out for f, out in zip(failed, outs)]
    results: list[torch.Tensor | BaseException] = []
    for s, out in zip(socks, outs):
        try:
            results.append(recv_response(s, out))
        except Exception as err:
            results.append(err)
    return results


def send_response(sock, out: torch.Tensor) -> None:
    """A reply: out [T, H] in the compute dtype."""
    if (ops := native_ops()) is not None:
        return _native(ops.send_response, sock.fileno(), _timeout(sock), out)
    send_all(sock, [RSP.pack(MAGIC_RSP, 0, out.shape[0], out.shape[1], DTYPE_CODES[out.dtype]), as_bytes(out)])


def send_error(sock, message: str) -> None:
    """A reply that fails the request with this message (the connection keeps serving)."""
    data = message.encode()
    send_all(sock, [RSP.pack(MAGIC_RSP, 1, len(data), 0, 0), data])


Handler = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertServer:
    """Serves requests on a Unix socket and a TCP socket, one thread per connection."""

    def __init__(self, handler: Handler, tcp_host: str = "127.0.0.1"):
        self.handler = handler
        self.unix_path = f"/tmp/moe-serve-worker-{os.getpid()}-{id(self):x}.sock"
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind(self.unix_path)
        self._tcp = socket.create_server((tcp_host, 0))
        self.tcp_address = (tcp_host, self._tcp.getsockname()[1])
        self._closed = False
        for listener in (self._unix, self._tcp):
            listener.listen(64)
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="wire-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="wire-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = ReceiveBuffer()  # this thread's: the handler is done with a request's views before the next
        with conn:
            while True:
                try:
                    layer, hidden, token, expert, weight = recv_request(conn, buffer)
                except ProtocolError as err:
                    log.warning("dropping connection: %s", err)
                    return
                except (WireError, OSError):  # the router closed the connection, or it broke
                    return
                try:
                    out, error = self.handler(layer, hidden, token, expert, weight), None
                except Exception as err:  # reported to the router; the connection keeps serving
                    out, error = None, f"{type(err).__name__}: {err}"
                try:
                    send_response(conn, out) if error is None else send_error(conn, error)
                except OSError:  # the router went away mid-reply
                    return

    def close(self) -> None:
        self._closed = True
        for listener in (self._unix, self._tcp):
            listener.close()
        try:
            os.unlink(self.unix_path)
        except FileNotFoundError:
            pass
