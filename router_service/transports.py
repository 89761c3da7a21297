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
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from expert_workers import collective
from expert_workers.collective import CODE_DTYPES, DTYPE_CODES, Link, LinkError
from expert_workers.wire import recv_response, send_request


class Transport(ABC):
    @abstractmethod
    def connect(self, workers: dict[int, Any]) -> None:
        """Make these workers (id -> Ray actor handle) reachable; existing endpoints stay."""

    @abstractmethod
    def retain(self, worker_ids: set[int]) -> None:
        """Drop endpoints of workers that left the plan (called at a step boundary)."""

    @abstractmethod
    def submit(self, worker_id: int, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
               weight: torch.Tensor) -> Any:
        """Start one call; returns a handle for `collect`. hidden [T_w, H]; token, expert, weight [P_w]."""

    @abstractmethod
    def collect(self, handles: list[Any]) -> list[torch.Tensor | BaseException]:
        """Wait for the calls; outputs [T_w, H] in the same order, or the exception of a failed call
        (a handle that is already an exception, from a failed submit, is passed through)."""

    def close(self) -> None:
        """Release connections."""

    @staticmethod
    def _collect_each(handles: list[Any], finish) -> list[torch.Tensor | BaseException]:
        """collect's loop: a handle that is already an exception (a failed submit) passes through; the rest are
        finished in order by `finish`, which returns the output or the call's exception."""
        return [h if isinstance(h, BaseException) else finish(h) for h in handles]


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

    def submit(self, worker_id, layer, hidden, token, expert, weight):
        return self._workers[worker_id].run.remote(layer, hidden, token, expert, weight)

    def collect(self, handles):
        import ray

        results = []
        for h in handles:
            try:
                results.append(h if isinstance(h, BaseException) else ray.get(h))
            except Exception as err:  # RayActorError when the worker died
                results.append(err)
        return results


class SocketTransport(Transport):
    def __init__(self, node_id: str | None = None, timeout: float = 60.0):
        self.node_id = node_id  # this router's Ray node: same-node workers get a Unix socket
        self.timeout = timeout  # a peer that vanished without closing (node loss) fails the call after this
        self._socks: dict[int, socket.socket] = {}
        self._lock = threading.Lock()

    def connect(self, workers):
        import ray

        with self._lock:
            new = {w: h for w, h in workers.items() if w not in self._socks}
        endpoints = dict(zip(new, ray.get([h.endpoint.remote() for h in new.values()])))
        for worker_id, ep in endpoints.items():
            sock = self._open(ep)
            with self._lock:
                self._socks[worker_id] = sock

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
                self._socks.pop(w).close()

    def submit(self, worker_id, layer, hidden, token, expert, weight):
        sock = self._socks[worker_id]
        try:
            send_request(sock, layer, hidden, token, expert, weight)
        except OSError:
            sock.close()
            raise
        return sock

    def collect(self, handles):
        return self._collect_each(handles, self._receive)

    @staticmethod
    def _receive(sock: socket.socket) -> torch.Tensor | BaseException:
        try:
            return recv_response(sock)
        except OSError as err:  # WireError, reset, timeout: the stream is unusable from here on
            sock.close()
            return err

    def close(self):
        with self._lock:
            for sock in self._socks.values():
                sock.close()
            self._socks.clear()


@dataclass
class _Call:
    """One submitted request on a link: what collect needs, and the tensors the posted sends still read."""

    link: Link
    T: int
    H: int
    sends: list  # works of the request's posted sends
    tensors: tuple  # what those sends read: referenced until they complete
    status: torch.Tensor  # int64 [RSP_LEN], filled by the posted receive below
    status_work: Any


class CollectiveTransport(Transport):
    """One 2-rank torch.distributed group per worker (router rank 0), formed through the worker's `open_link`.

    backend: "auto" (NCCL where router and worker both hold GPUs, else gloo), "gloo" or "nccl".
    host: the address this end listens on for the worker's connections; None: loopback for a worker on
    loopback, else this Ray node's IP.
    """

    def __init__(self, backend: str = "auto", timeout: float = 60.0, host: str | None = None):
        if backend not in collective.BACKENDS:
            raise ValueError(f"collective backend must be one of {collective.BACKENDS}, not {backend!r}")
        self.backend = backend
        self.timeout = timeout  # a silent peer fails the call after this; a dead one fails it at once
        self.host = host
        self._links: dict[int, Link] = {}
        self._closing: list[threading.Thread] = []
        self._lock = threading.Lock()

    def connect(self, workers):
        import ray

        with self._lock:
            new = {w: h for w, h in workers.items() if w not in self._links}
        router_cuda = torch.cuda.is_available()
        addresses = ray.get([h.open_link.remote(self.backend, router_cuda, self.timeout) for h in new.values()])
        for worker_id, address in zip(new, addresses):
            self.add(worker_id, self.join(address))

    def join(self, address: dict) -> Link:
        """Form this end of a link a worker opened (`open_link`'s answer); blocks until both ends are up."""
        host = self.host
        if host is None:
            if ipaddress.ip_address(address["host"]).is_loopback:
                host = "127.0.0.1"
            else:
                import ray

                host = ray.util.get_node_ip_address()
        store = collective.join_store(address["host"], address["port"], self.timeout)
        return Link(store, collective.ROUTER_RANK, address["backend"], host, self.timeout)

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
                link.send_and_wait([torch.tensor([collective.OP_CLOSE] + [0] * (collective.REQ_LEN - 1))], link.ctrl)
            except LinkError:  # the worker is gone already: nothing to tell
                pass

        thread = threading.Thread(target=close, daemon=True, name="collective-close")
        thread.start()
        with self._lock:
            self._closing = [t for t in self._closing if t.is_alive()] + [thread]

    def submit(self, worker_id, layer, hidden, token, expert, weight):
        link = self._links[worker_id]
        T, H = hidden.shape
        P = token.numel()
        d = link.device  # with gloo the tensors travel from host memory; with NCCL from the GPU
        header = torch.tensor([collective.OP_RUN, layer, T, P, H, DTYPE_CODES[hidden.dtype]], dtype=torch.int64)
        hidden = hidden.to(d).contiguous()  # [T, H]
        pairs = torch.stack([token, expert]).to(device=d, dtype=torch.int32)  # [2, P]
        weight = weight.to(device=d, dtype=torch.float32).contiguous()  # [P]
        try:
            sends = [link.send(link.ctrl, header)]
            sends += [link.send(link.data, t) for t in (hidden, pairs, weight) if t.numel()]
            status = torch.empty(collective.RSP_LEN, dtype=torch.int64)
            # Posted now so the worker's answer is not held up waiting for a receive to match it.
            status_work = link.recv(link.ctrl, status)
        except RuntimeError as err:  # gloo refuses to post on a link that already failed
            self._drop(link)
            raise LinkError(str(err).split("\n")[0]) from err
        return _Call(link, T, H, sends, (header, hidden, pairs, weight), status, status_work)

    def collect(self, handles):
        return self._collect_each(handles, self._finish)

    def _finish(self, call: _Call) -> torch.Tensor | BaseException:
        try:
            return self._receive(call)
        except LinkError as err:  # reset, closed or timed out: the link is unusable from here on
            self._drop(call.link)
            return err
        except RuntimeError as err:  # the worker's own error: reported, the link keeps serving
            return err

    def _receive(self, call: _Call) -> torch.Tensor:
        link = call.link
        for work in call.sends:
            link.wait(work)
        link.wait(call.status_work)
        status, n, H, code = call.status.tolist()
        if status != 0:
            message = torch.empty(n, dtype=torch.uint8)
            link.recv_and_wait([message], link.ctrl)
            raise RuntimeError(f"expert worker error: {bytes(message.tolist()).decode(errors='replace')}")
        if (n, H) != (call.T, call.H) or code not in CODE_DTYPES:
            raise LinkError(f"bad response header {call.status.tolist()} for a [{call.T}, {call.H}] request")
        out = torch.empty(n, H, dtype=CODE_DTYPES[code], device=link.device)  # [T, H]
        link.recv_and_wait([out])
        return out

    def _drop(self, link: Link) -> None:
        """Forget a failed link; the dispatcher treats its worker as dead from here on."""
        with self._lock:
            self._links = {w: l for w, l in self._links.items() if l is not link}

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
