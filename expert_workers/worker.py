"""The expert worker: a Ray actor hosting a group of (layer, expert) replicas.

It reads its own weights from the checkpoint (weights never pass through the
router), keeps them on its GPU when Ray gave it one and on the CPU otherwise,
and runs each layer's tokens for all its experts as one call. Routing load is
counted by the routers, which see every pair (router_service.telemetry).

Shape legend: T_w tokens sent to this worker, P_w pairs, H hidden.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import torch

from expert_workers.checkpoint import Checkpoint, resolve_dtype
from expert_workers.collective import LinkServer, resolve_backend
from expert_workers.experts import DEFAULT_LOAD_DUTY, SPARE_ROWS, ExpertGroup
from expert_workers.wire import ExpertServer


def threads_for_cpus(cpus: float) -> int:
    """torch threads for a process given `cpus` by Ray: rounded down, at least 1.

    Ray's CPUs are a reservation, not a pinning: threads beyond them compete with the node's other actors,
    and OpenMP threads waiting on a descheduled peer stretch every parallel region."""
    return max(1, int(cpus))


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_threads_for(requested: int | None) -> int:
    """torch threads for an expert worker: `requested`, else `threads_for_cpus` of the CPUs Ray assigned it.

    Workers on a node compute at the same time (each its share of a layer's tokens), so they split the
    cores; a router takes turns with them instead and uses them all (`Router`)."""
    if requested is not None:
        return requested
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # outside Ray
        cpus = 1.0
    return threads_for_cpus(cpus)


class ExpertWorker:
    """Actor body; `cluster` wraps it with `ray.remote(...)` and the resources it asks for."""

    def __init__(self, worker_id: int, model_dir: str, hosted: dict[int, list[int]], dtype: str,
                 torch_threads: int | None = None, data_plane_host: str = "127.0.0.1",
                 load_duty: float = DEFAULT_LOAD_DUTY):
        torch.set_num_threads(torch_threads_for(torch_threads))
        self.worker_id = worker_id
        self.load_duty = load_duty  # fraction of the time a live load copies weights (ExpertGroup.add)
        self.device = torch.device("cuda" if self._assigned_gpu() else "cpu")
        self.dtype = resolve_dtype(dtype)
        started = time.perf_counter()
        self.checkpoint = Checkpoint(model_dir)
        # Room in each layer for replicas a live rebalance adds: they load into free rows, no layer is re-stacked.
        self.group = ExpertGroup.load(self.checkpoint, hosted, self.dtype, self.device, spare_rows=SPARE_ROWS)
        self.load_seconds = time.perf_counter() - started
        self._count_lock = threading.Lock()  # run() is called from Ray's thread and socket threads
        self.compute_seconds = 0.0  # expert compute time, for the benchmarks' step breakdown
        self.calls = 0
        # "node": this node's IP, so routers on other nodes reach it (multi-node clusters); else an address.
        self.data_plane_host = self._node_ip() if data_plane_host == "node" else data_plane_host
        self.server = ExpertServer(self.run, self.data_plane_host)
        self._links: dict[int, LinkServer] = {}  # CollectiveTransport links, by id; each removes itself on exit
        self._link_ids = itertools.count()
        self._links_lock = threading.Lock()

    @staticmethod
    def _node_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()

    def endpoint(self) -> dict:
        """Where the fast data plane reaches this worker (SocketTransport)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "unix": self.server.unix_path,
                "tcp": self.server.tcp_address}

    def open_link(self, backend: str = "auto", router_cuda: bool = False, timeout: float = 60.0) -> dict:
        """Host one CollectiveTransport link (this worker is rank 1) and serve it on a thread.

        Returns where the router joins it and the backend both ends use; the link ends when
        the router sends CLOSE or goes away."""
        gpu = self.device.type == "cuda"
        resolved = resolve_backend(backend, router_cuda, gpu)
        device = torch.device("cuda", torch.cuda.current_device()) if gpu else self.device  # the link thread's GPU
        # The link's thread keeps NCCL outputs on the GPU; with gloo, LinkServer copies them to host memory.
        server = LinkServer(self.run_on_device, self.data_plane_host, resolved, timeout, device, self._link_closed)
        with self._links_lock:
            link_id = next(self._link_ids)
            self._links[link_id] = server
        server.start()  # after registering: its thread may end (and unregister it) at once
        return {**server.rendezvous, "link_id": link_id}

    def _link_closed(self, server: LinkServer) -> None:
        with self._links_lock:
            self._links = {i: s for i, s in self._links.items() if s is not server}

    def open_links(self) -> int:
        """Collective links being served now (each is a thread)."""
        with self._links_lock:
            return sum(s.thread.is_alive() for s in self._links.values())

    @staticmethod
    def _assigned_gpu() -> bool:
        try:
            import ray

            return bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        except Exception:  # outside Ray (tests of the body itself)
            return False

    def info(self) -> dict:
        import ray

        gpu = self.device.type == "cuda"
        return {"worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "device": f"cuda:{torch.cuda.current_device()}" if gpu else "cpu",
                "device_name": torch.cuda.get_device_name(self.device) if gpu else "cpu",
                "weight_bytes": self.group.nbytes, "load_seconds": self.load_seconds,
                "hosted": self.group.hosted()}

    def run(self, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
            weight: torch.Tensor) -> torch.Tensor:
        """Weighted expert outputs for the rows sent: hidden [T_w, H]; token, expert, weight [P_w] -> [T_w, H].

        On the CPU, for the socket and Ray-call transports; `run_on_device` leaves it on the worker's device."""
        return self.run_on_device(layer, hidden, token, expert, weight).cpu()

    def run_on_device(self, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
        """As `run`, with the output [T_w, H] on this worker's device (the collective transport's NCCL links)."""
        d = self.device
        started = time.perf_counter()
        if d.type == "cuda":
            hidden, token, expert, weight = (t.to(d) for t in (hidden, token, expert, weight))
        out = self.group.run(layer, hidden, token, expert, weight)
        if d.type == "cuda":
            torch.cuda.synchronize(d)  # the compute seconds are the GPU's
        with self._count_lock:
            self.compute_seconds += time.perf_counter() - started
            self.calls += 1
        return out

    def load_replicas(self, hosted: dict[int, list[int]]) -> dict:
        """Read more replicas from the checkpoint while serving continues; returns bytes and seconds."""
        started = time.perf_counter()
        read = self.group.add(self.checkpoint, hosted, self.dtype, duty=self.load_duty)
        return {"bytes": read, "seconds": time.perf_counter() - started, "hosted": self.group.hosted()}

    def unload_replicas(self, hosted: dict[int, list[int]]) -> dict:
        """Drop replicas once no router sends them tokens (the controller's protocol guarantees it); their rows
        are free for the next load."""
        self.group.remove(hosted)
        return {"hosted": self.group.hosted()}

    def stats(self) -> dict:
        """Cumulative counters: calls served and seconds of expert compute, plus peak memory."""
        import resource

        with self._count_lock:
            return {"worker_id": self.worker_id, "calls": self.calls, "compute_seconds": self.compute_seconds,
                    "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
