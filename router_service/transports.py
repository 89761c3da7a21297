"""How one layer's sub-batch reaches an expert worker and comes back.

    RayCallTransport  reference: one Ray actor call per worker per layer (1-2 ms here)
    SocketTransport   fast: a persistent stream socket per worker carrying raw tensor bytes
                      (Unix socket on the same node, TCP across nodes); Ray only hands out endpoints

Both give identical outputs: the same worker code runs the same tensors.
GPU tensors: see docs/data-plane.md for the NCCL design used when workers hold GPUs.

Threads: `connect` may block (it asks Ray for endpoints) and runs off the engine
thread; `retain`, `submit` and `collect` run on the engine thread.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from typing import Any

import torch

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
        results = []
        for h in handles:
            if isinstance(h, BaseException):
                results.append(h)
                continue
            try:
                results.append(recv_response(h))
            except OSError as err:  # WireError, reset, timeout: the stream is unusable from here on
                h.close()
                results.append(err)
        return results

    def close(self):
        with self._lock:
            for sock in self._socks.values():
                sock.close()
            self._socks.clear()


TRANSPORTS = {"ray": RayCallTransport, "socket": SocketTransport}
