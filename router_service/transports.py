"""How one layer's sub-batch reaches an expert worker and comes back.

    RayCallTransport  reference: one Ray actor call per worker per layer (1-2 ms here)
    SocketTransport   fast: a persistent stream socket per worker carrying raw tensor bytes
                      (Unix socket on the same node, TCP across nodes); Ray only hands out endpoints
    CollectiveTransport  a 2-rank torch.distributed group per worker: NCCL GPU to GPU when both ends
                      hold GPUs, gloo (host memory) otherwise; Ray only does the rendezvous

All give identical outputs: the same worker code runs the same tensors (docs/data-plane.md).

Threads: `connect` may block (it asks Ray for endpoints) and runs off the engine
thread; `retain`, `submit` and `collect` run on the engine thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from expert_workers import collective
from expert_workers.collective import CODE_DTYPES, DTYPE_CODES, Link, LinkError
from expert_workers.wire import WorkerError, recv_response, recv_responses, send_request, send_requests

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


class Transport(ABC):
    """Results of `collect` are of three kinds: the output; a `WorkerError`, when the worker answered with an
    error (it is alive and its connection keeps serving); or any other exception, when the call could not be
    completed (the worker died, its connection failed or timed out): the connection is then unusable."""

    @abstractmethod
    def connect(self, workers: dict[int, Any]) -> None:
        """Make these workers (id -> Ray actor handle) reachable; existing endpoints stay. A worker that
        cannot be reached is logged and left out: calls to it fail, and the dispatcher re-runs them elsewhere."""

    @abstractmethod
    def retain(self, worker_ids: set[int]) -> None:
        """Drop endpoints of workers that left the plan (called at a step boundary)."""

    @abstractmethod
    def submit(self, worker_id: int, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
               weight: torch.Tensor, out: torch.Tensor | None = None) -> Any:
        """Start one call; returns a handle for `collect`. hidden [T_w, H] on the engine's device; token (index
        into hidden's rows), expert, weight [P_w] in host memory (the dispatch plan's); out [T_w, H]: where
        the output is to be written (memory from `reply_buffer`), or None for new memory."""

    @abstractmethod
    def collect(self, handles: list[Any]) -> list[torch.Tensor | BaseException]:
        """Wait for the calls; outputs [T_w, H] in the same order (each call's `out` where it gave one), or the
        exception of a failed call (a handle that is already an exception, from a failed submit, is passed
        through). Never raises."""

    def submit_all(self, layer: int, requests: list[tuple]) -> list[Any]:
        """Start one layer's calls at once: requests (worker_id, hidden, token, expert, weight, out) as `submit`
        takes them, at most one per worker. Returns their handles in order; a call whose start failed gets
        its exception as its handle (`collect` passes it through)."""
        handles = []
        for worker_id, hidden, token, expert, weight, out in requests:
            try:
                handles.append(self.submit(worker_id, layer, hidden, token, expert, weight, out))
            except Exception as err:  # a dead peer can fail the send already
                handles.append(err)
        return handles

    def reply_buffer(self, rows: int, hidden: torch.Tensor) -> torch.Tensor:
        """Memory for `rows` output rows of hidden's width and dtype where this transport delivers replies:
        host memory, pinned when the engine is on a GPU (the copy there is then fast)."""
        return torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, pin_memory=hidden.is_cuda)

    def close(self) -> None:
        """Release connections."""

    @staticmethod
    def _collect_each(handles: list[Any], finish) -> list[torch.Tensor | BaseException]:
        """collect's loop: a handle that is already an exception (a failed submit) passes through; the rest are
        finished in order by `finish`, which returns the output or the call's exception."""
        return [h if isinstance(h, BaseException) else finish(h) for h in handles]

    @staticmethod
    def _connect_each(workers: dict[int, Any], ask: Callable[[Any], Any],
                      form: Callable[[int, Any], None]) -> set[int]:
        """connect's loop: ask every worker at once (`ask(handle)` returns a Ray object ref), then `form(worker_id,
        answer)` each endpoint in turn. A worker that fails (it died, say, before the plan naming it arrived) is
        logged and skipped, so it cannot keep the others' connections, and the plan, from being set up.
        Returns the ids of those that failed."""
        import ray

        failed = set()
        asked = {}
        for worker_id, handle in workers.items():
            try:
                asked[worker_id] = ask(handle)
            except Exception as err:
                log.warning("cannot reach expert worker %d: %s", worker_id, err)
                failed.add(worker_id)
        for worker_id, ref in asked.items():
            try:
                form(worker_id, ray.get(ref))
            except Exception as err:
                log.warning("cannot connect to expert worker %d: %s", worker_id, err)
                failed.add(worker_id)
        return failed


class RayCallTransport(Transport):
    def __init__(self):
        self._workers: dict[int, Any] = {}
        self._lock = threading.Lock()

    def connect(self, workers):
        with self._lock:
            self._workers.update(workers)

    def retain(self, worker_ids):
        with self._lock:
            self._workers = {w: h for w, h in self._workers.items() if w in worker_ids}

    def submit(self, worker_id, layer, hidden, token, expert, weight, out=None):
        # Host memory: the worker may have no GPU to unpickle a CUDA tensor onto; it moves them to its device.
        return self._workers[worker_id].run.remote(layer, hidden.cpu(), token.cpu(), expert.cpu(), weight.cpu()), out

    def collect(self, handles):
        return self._collect_each(handles, self._get)

    @staticmethod
    def _get(handle) -> torch.Tensor | BaseException:
        import ray

        ref, out = handle
        try:
            result = ray.get(ref)
            return result if out is None else out.copy_(result)
        except ray.exceptions.RayTaskError as err:  # the worker's method raised: it is alive, the call failed
            cause = err.cause if err.cause is not None else err
            return WorkerError(f"expert worker error: {type(cause).__name__}: {cause}")
        except Exception as err:  # RayActorError when the worker died
            return err


@dataclass
class _Connection:
    """One worker's socket, and the pinned buffer reused on it when the engine is on a GPU (engine thread)."""

    sock: socket.socket
    staging: torch.Tensor | None = None  # pinned host memory that hidden rows on a GPU are copied through

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """t in host memory: itself on the CPU, else a copy in this connection's pinned staging buffer."""
        if t.device.type == "cpu":
            return t
        n = t.numel() * t.element_size()
        if self.staging is None or self.staging.numel() < n:
            self.staging = torch.empty(max(n, 2 * (0 if self.staging is None else self.staging.numel())),
                                       dtype=torch.uint8, pin_memory=True)
        staged = self.staging[:n].view(t.dtype).view(t.shape)
        staged.copy_(t)  # synchronous: the bytes are on the host before the send reads them
        return staged


class SocketTransport(Transport):
    """Tensors travel from host memory: a router on a GPU sends its rows through a pinned staging buffer and
    gets outputs back on the CPU (the dispatcher moves them to its device)."""

    def __init__(self, node_id: str | None = None, timeout: float = 60.0):
        self.node_id = node_id  # this router's Ray node: same-node workers get a Unix socket
        self.timeout = timeout  # a peer that vanished without closing (node loss) fails the call after this
        self._socks: dict[int, _Connection] = {}
        self._lock = threading.Lock()

    def connect(self, workers):
        with self._lock:
            new = {w: h for w, h in workers.items() if w not in self._socks}
        self._connect_each(new, lambda h: h.endpoint.remote(), self._add)

    def _add(self, worker_id: int, endpoint: dict) -> None:
        sock = self._open(endpoint)
        with self._lock:
            self._socks[worker_id] = _Connection(sock)

    def _open(self, endpoint: dict) -> socket.socket:
        if endpoint["node_id"] == self.node_id and endpoint.get("unix"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(endpoint["unix"])
        else:
            sock = socket.create_connection(tuple(endpoint["tcp"]))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        return sock

    def retain(self, worker_ids):
        with self._lock:
            gone = [w for w in self._socks if w not in worker_ids]
            for w in gone:
                self._socks.pop(w).sock.close()

    def submit(self, worker_id, layer, hidden, token, expert, weight, out=None):
        conn = self._socks[worker_id]
        try:
            send_request(conn.sock, layer, conn.host(hidden), token, expert, weight)
        except OSError:
            conn.sock.close()
            raise
        return conn, out

    def submit_all(self, layer, requests):
        # Every request of the layer in one call (wire.send_requests): no Python runs between the first send,
        # which wakes a worker that may take this core, and the last.
        handles: list[Any] = []
        ready = []  # (index, connection, hidden in host memory, request)
        for worker_id, hidden, token, expert, weight, out in requests:
            try:
                conn = self._socks[worker_id]  # KeyError: a worker that could not be connected
                ready.append((len(handles), conn, conn.host(hidden), token, expert, weight))
                handles.append((conn, out))
            except Exception as err:
                handles.append(err)
        errors = send_requests([r[1].sock for r in ready], layer, *([r[k] for r in ready] for k in range(2, 6)))
        for (i, conn, *_), err in zip(ready, errors):
            if err is not None:
                conn.sock.close()
                handles[i] = err
        return handles

    def collect(self, handles):
        # Replies into their buffers in whatever order they arrive (wire.recv_responses), where every call has one.
        live = [i for i, h in enumerate(handles) if not isinstance(h, BaseException)]
        if any(handles[i][1] is None for i in live):
            return self._collect_each(handles, self._receive)
        results = list(handles)
        got = recv_responses([handles[i][0].sock for i in live], [handles[i][1] for i in live])
        for i, r in zip(live, got):
            if isinstance(r, BaseException) and not isinstance(r, WorkerError):
                handles[i][0].sock.close()  # the stream is unusable from here on
            results[i] = r
        return results

    @staticmethod
    def _receive(handle: tuple[_Connection, torch.Tensor | None]) -> torch.Tensor | BaseException:
        conn, out = handle
        try:
            return recv_response(conn.sock, out)
        except WorkerError as err:  # the whole answer was read: the connection keeps serving
            return err
        except Exception as err:  # WireError, reset, timeout: the stream is unusable from here on
            conn.sock.close()
            return err

    def close(self):
        with self._lock:
            for conn in self._socks.values():
                conn.sock.close()
            self._socks.clear()


@dataclass
class _Call:
    """One submitted request on a link: what collect needs, and the tensors the posted sends still read."""

    link: Link
    T: int
    H: int
    header_send: collective.Op  # control group
    data_sends: list[collective.Op]  # data group (NCCL on GPUs)
    tensors: tuple  # what those sends read: referenced until they complete
    status: torch.Tensor  # int64 [RSP_LEN], filled by the posted receive below
    status_recv: collective.Op
    out: torch.Tensor | None  # where the reply goes, or None for new memory


class CollectiveTransport(Transport):
    """One 2-rank torch.distributed group per worker (router rank 0), formed through the worker's `open_link`.

    backend: "auto" (NCCL where router and worker both hold GPUs, else gloo), "gloo" or "nccl".
    host: the address this end listens on for the worker's connections; None: loopback for a worker on
    loopback, else this Ray node's IP.
    device: the engine's device. A CUDA one lets links use NCCL (the data then travels from and to it);
    otherwise, and on gloo links, tensors travel from host memory.
    """

    def __init__(self, backend: str = "auto", timeout: float = 60.0, host: str | None = None,
                 device: torch.device | str = CPU):
        self.backend = collective.check_backend(backend)
        self.timeout = timeout  # a silent peer fails the call after this; a dead one fails it at once
        self.host = host
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda": the device the engine's tensors go to
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._links: dict[int, Link] = {}
        self._failed: set[int] = set()  # workers whose link failed or never formed: not re-opened
        self._closing: list[threading.Thread] = []
        self._lock = threading.Lock()

    def connect(self, workers):
        with self._lock:
            new = {w: h for w, h in workers.items() if w not in self._links and w not in self._failed}
        router_cuda = self.device.type == "cuda"
        failed = self._connect_each(new, lambda h: h.open_link.remote(self.backend, router_cuda, self.timeout),
                                    lambda w, address: self.add(w, self.join(address, f"expert worker {w}")))
        with self._lock:
            self._failed |= failed  # the dispatcher takes them for dead at their first call

    def join(self, address: dict, name: str = "expert worker") -> Link:
        """Form this end of a link a worker opened (`open_link`'s answer); blocks until both ends are up."""
        host = self.host
        if host is None:
            if ipaddress.ip_address(address["host"]).is_loopback:
                host = "127.0.0.1"
            else:
                import ray

                host = ray.util.get_node_ip_address()
        store = collective.join_store(address["host"], address["port"], self.timeout)
        return Link(store, collective.ROUTER_RANK, address["backend"], host, self.timeout,
                    f"{name} at {address['host']}:{address['port']}", self.device)

    def add(self, worker_id: int, link: Link) -> None:
        """Use an already formed link for `worker_id` (connect does this after the rendezvous)."""
        with self._lock:
            self._links[worker_id] = link

    def retain(self, worker_ids):
        with self._lock:
            gone = [self._links.pop(w) for w in list(self._links) if w not in worker_ids]
        for link in gone:
            self._close_later(link)

    def _close_later(self, link: Link) -> None:
        """Tell the worker the link is done (its thread exits) off the engine thread; then drop our groups."""

        def close():
            try:
                link.send_and_wait([torch.tensor([collective.OP_CLOSE] + [0] * (collective.REQ_LEN - 1))], "CLOSE",
                                   link.ctrl)
            except LinkError:  # the worker is gone already: nothing to tell
                link.abort()
                return
            link.shutdown()

        thread = threading.Thread(target=close, daemon=True, name="collective-close")
        thread.start()
        with self._lock:
            self._closing = [t for t in self._closing if t.is_alive()] + [thread]

    def reply_buffer(self, rows, hidden):
        # Replies arrive on the engine's device: NCCL links write them there (gloo ones are copied).
        return torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, device=self.device)

    def submit(self, worker_id, layer, hidden, token, expert, weight, out=None):
        link = self._links[worker_id]
        T, H = hidden.shape
        d = link.device  # with gloo the tensors travel from host memory; with NCCL from the GPU
        header = torch.tensor([collective.OP_RUN, layer, T, token.numel(), H, DTYPE_CODES[hidden.dtype]],
                              dtype=torch.int64)
        hidden = hidden.to(d).contiguous()  # [T, H]
        pairs = torch.stack([token, expert]).to(device=d, dtype=torch.int32)  # [2, P]
        weight = weight.to(device=d, dtype=hidden.dtype).contiguous()  # [P], in the compute dtype
        try:
            header_send = link.send(link.ctrl, header, "request header")
            data_sends = [link.send(link.data, t, "request tensors") for t in (hidden, pairs, weight) if t.numel()]
            status = torch.empty(collective.RSP_LEN, dtype=torch.int64)
            # Posted now so the worker's answer is not held up waiting for a receive to match it.
            status_recv = link.recv(link.ctrl, status, "reply header")
        except LinkError:  # e.g. gloo refuses to post on a link that already failed
            self._drop(link)
            raise
        return _Call(link, T, H, header_send, data_sends, (header, hidden, pairs, weight), status, status_recv, out)

    def collect(self, handles):
        return self._collect_each(handles, self._finish)

    def _finish(self, call: _Call) -> torch.Tensor | BaseException:
        try:
            return self._receive(call)
        except WorkerError as err:  # the worker's own error: reported, the link keeps serving
            return err
        except Exception as err:  # LinkError (reset, closed, timed out) or worse: the link is unusable
            self._drop(call.link)
            return err

    def _receive(self, call: _Call) -> torch.Tensor:
        link = call.link
        # The reply header first, on gloo: it arrives only once the worker has received every tensor of the
        # request and computed, and gloo fails it at once if the worker dies. Waiting on the (NCCL) data sends
        # first would notice a dead worker only at the timeout.
        link.wait(call.header_send)
        link.wait(call.status_recv)
        status, n, H, code = call.status.tolist()
        if status == collective.STATUS_PROTOCOL:  # the worker did not take the request's tensors; it ends the link
            raise LinkError(f"collective link to {link.name}: the worker refused the request: "
                            f"{self._error_text(link, n)}")
        for op in call.data_sends:  # complete: the worker has them all (the tensors may be released now)
            link.wait(op)
        if status != collective.STATUS_OK:
            raise WorkerError(f"expert worker error: {self._error_text(link, n)}")
        if (n, H) != (call.T, call.H) or code not in CODE_DTYPES:
            raise LinkError(f"collective link to {link.name}: bad reply header {call.status.tolist()} "
                            f"for a [{call.T}, {call.H}] request")
        out = call.out
        if out is None or out.device != link.device or out.dtype != CODE_DTYPES[code]:
            received = torch.empty(n, H, dtype=CODE_DTYPES[code], device=link.device)  # [T, H]
            link.recv_and_wait([received], "reply")
            return received if out is None else out.copy_(received)
        link.recv_and_wait([out], "reply")
        return out

    @staticmethod
    def _error_text(link: Link, n: int) -> str:
        message = torch.empty(n, dtype=torch.uint8)
        link.recv_and_wait([message], "error reply", link.ctrl)
        return bytes(message.tolist()).decode(errors="replace")

    def _drop(self, link: Link) -> None:
        """Forget a failed link; the dispatcher treats its worker as dead from here on."""
        with self._lock:
            self._failed |= {w for w, l in self._links.items() if l is link}
            self._links = {w: l for w, l in self._links.items() if l is not link}
        link.abort()

    def close(self):
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            self._close_later(link)
        with self._lock:
            closing = list(self._closing)
        for thread in closing:
            thread.join(self.timeout)


TRANSPORTS = {"ray": RayCallTransport, "socket": SocketTransport, "collective": CollectiveTransport}


def make_transport(name: str, device: torch.device | str = CPU) -> Transport:
    """A router's transport by its setting's name, in a Ray process; device: the engine's device."""
    if name == "socket":
        import ray

        return SocketTransport(ray.get_runtime_context().get_node_id())  # Unix sockets to same-node workers
    if name == "collective":
        return CollectiveTransport(device=device)
    return TRANSPORTS[name]()
