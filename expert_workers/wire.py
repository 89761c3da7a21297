"""The fast data plane's wire format and the worker-side socket server.

Ray places actors and hands out endpoints; tensors then travel over a plain
stream socket (a Unix socket between processes on one node, TCP across nodes):
a fixed header plus raw tensor bytes, no pickling. One connection per router;
requests on a connection are answered in order.

Request:  header REQ (layer, T, P, H, dtype code) | hidden [T, H] | token [P] i32 | expert [P] i32 | weight [P] f32
Response: header RSP (status, T, H, dtype code)   | out [T, H]    (status != 0: a UTF-8 error message instead)
"""

from __future__ import annotations

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


class WireError(ConnectionError):
    """The peer closed the connection or sent something that is not our protocol."""


class WorkerError(RuntimeError):
    """The expert worker answered a request with an error (an expert it does not host, say).

    Every transport returns it for such an answer (socket, collective link, Ray call alike). The worker
    is alive and its connection keeps serving: the request failed, not the worker."""


def as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("connection closed by peer")
        got += k
    return buf


def recv_tensor(sock: socket.socket, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(recv_exact(sock, n), dtype=torch.uint8).view(dtype).reshape(shape)


def send_all(sock: socket.socket, parts: list) -> None:
    """sendmsg with scatter-gather, looping over partial sends."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def send_request(sock, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                 weight: torch.Tensor) -> None:
    T, H = hidden.shape
    P = token.numel()
    header = REQ.pack(MAGIC_REQ, layer, T, P, H, DTYPE_CODES[hidden.dtype])
    send_all(sock, [header, as_bytes(hidden), as_bytes(token.to(torch.int32)), as_bytes(expert.to(torch.int32)),
                    as_bytes(weight.to(torch.float32))])


def recv_response(sock) -> torch.Tensor:
    magic, status, T, H, code = RSP.unpack(recv_exact(sock, RSP.size))
    if magic != MAGIC_RSP:
        raise WireError(f"bad response magic {magic!r}")
    if status != 0:
        raise WorkerError(f"expert worker error: {recv_exact(sock, T).decode(errors='replace')}")
    return recv_tensor(sock, CODE_DTYPES[code], (T, H))


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
        with conn:
            while True:
                try:
                    magic, layer, T, P, H, code = REQ.unpack(recv_exact(conn, REQ.size))
                except WireError:
                    return
                if magic != MAGIC_REQ:
                    log.warning("dropping connection: bad request magic %r", magic)
                    return
                hidden = recv_tensor(conn, CODE_DTYPES[code], (T, H))
                token = recv_tensor(conn, torch.int32, (P,)).long()
                expert = recv_tensor(conn, torch.int32, (P,)).long()
                weight = recv_tensor(conn, torch.float32, (P,)).to(hidden.dtype)
                try:
                    out = self.handler(layer, hidden, token, expert, weight)
                    send_all(conn, [RSP.pack(MAGIC_RSP, 0, T, H, DTYPE_CODES[out.dtype]), as_bytes(out)])
                except Exception as err:  # report to the router; keep serving
                    message = f"{type(err).__name__}: {err}".encode()
                    send_all(conn, [RSP.pack(MAGIC_RSP, 1, len(message), 0, 0), message])

    def close(self) -> None:
        self._closed = True
        for listener in (self._unix, self._tcp):
            listener.close()
        try:
            os.unlink(self.unix_path)
        except FileNotFoundError:
            pass
