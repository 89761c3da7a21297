"""The collective data plane: one 2-rank torch.distributed process group per (router, worker) link.

Ray only does the rendezvous: the router asks a worker to open a link, the worker
hosts a `TCPStore` on its data-plane address and answers with it, and both sides
form their groups from that store (router rank 0, worker rank 1). No global
`init_process_group`: links come and go with placement plans, one at a time.

A link has a control group, always gloo on CPU tensors, and a data group for the
tensors: the same gloo group when tensors live in host memory, an NCCL group when
both ends hold GPUs. Headers stay on gloo even with NCCL because an idle worker
waits on the next header indefinitely, which gloo allows and NCCL's watchdog does
not (it aborts operations pending longer than its timeout), and because gloo sees a
dead peer at once as a closed TCP connection.

Request  (rank 0 -> 1): control int64 [REQ_LEN] (op, layer, T, P, H, dtype code)
                        | data: hidden [T, H] | pairs int32 [2, P] (token row, expert) | weight float32 [P]
Response (rank 1 -> 0): control int64 [RSP_LEN] (status, T, H, dtype code) | data: out [T, H]
                        status != 0: T is the length of a UTF-8 message sent instead as control uint8 [T]
op CLOSE ends the link (the router is done with it); each side then drops its groups.

Shape legend: T tokens sent, P (token, expert) pairs, H hidden.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from expert_workers.wire import CODE_DTYPES, DTYPE_CODES

log = logging.getLogger(__name__)

REQ_LEN, RSP_LEN = 6, 4  # int64 header lengths: (op, layer, T, P, H, dtype code); (status, T, H, dtype code)
OP_CLOSE, OP_RUN = 0, 1
ROUTER_RANK, WORKER_RANK = 0, 1
TAG = 0  # one tag: gloo and NCCL match point-to-point messages between two ranks in posting order
# An idle worker waits this long for the next header. A wait that expires breaks a gloo link for good,
# so this is "never" in practice; a router that died closes the TCP connection and ends the wait at once.
IDLE_WAIT = timedelta(days=3650)
BACKENDS = ("auto", "gloo", "nccl")

Handler = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LinkError(ConnectionError):
    """The link's peer closed, reset or timed out: the link is unusable from here on."""


def resolve_backend(requested: str, router_cuda: bool, worker_cuda: bool) -> str:
    """'nccl' moves tensors GPU to GPU and needs CUDA at both ends; 'gloo' moves host memory; 'auto' picks."""
    if requested not in BACKENDS:
        raise ValueError(f"collective backend must be one of {BACKENDS}, not {requested!r}")
    if requested == "auto":
        return "nccl" if router_cuda and worker_cuda and dist.is_nccl_available() else "gloo"
    if requested == "nccl" and not (router_cuda and worker_cuda):
        raise ValueError("the nccl backend needs CUDA tensors at both ends of the link "
                         f"(router cuda={router_cuda}, worker cuda={worker_cuda})")
    return requested


class Link:
    """One end of a formed link: its groups, the device its data tensors live on, and the peer's rank."""

    def __init__(self, store: dist.Store, rank: int, backend: str, host: str, timeout: float):
        self.rank, self.peer, self.backend = rank, 1 - rank, backend
        self.timeout = timedelta(seconds=timeout)
        # Both constructors block until the peer has joined (each rank publishes its address in the store).
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # listen on the data-plane address
        options._timeout = self.timeout
        options._threads = 1  # point-to-point ops run on the device's own I/O thread, not the pool
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, 2, options)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = self.timeout
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, 2, nccl_options)
        else:
            self.device = torch.device("cpu")
            self.data = self.ctrl

    def send(self, group, tensor: torch.Tensor):
        """Post a send; the returned work completes once the peer has posted the matching receive."""
        return group.send([tensor], self.peer, TAG)

    def recv(self, group, tensor: torch.Tensor):
        return group.recv([tensor], self.peer, TAG)

    def wait(self, work, timeout: timedelta | None = None) -> None:
        """Wait for a posted operation; a closed, reset or silent peer raises LinkError.

        With NCCL the wait also orders the current CUDA stream after the transfer; given a
        timeout (always, here) it blocks the host until the transfer is done, as gloo does."""
        try:
            work.wait(timeout or self.timeout)
        except RuntimeError as err:  # gloo reports every transport failure as a RuntimeError
            raise LinkError(str(err).split("\n")[0]) from err

    def send_and_wait(self, sends: list[torch.Tensor], group=None) -> None:
        """Send tensors to the peer and wait for them (empty ones are skipped: both sides know the shapes)."""
        works = [self.send(group or self.data, t) for t in sends if t.numel()]
        for work in works:
            self.wait(work)

    def recv_and_wait(self, tensors: list[torch.Tensor], group=None) -> None:
        """Receive into pre-allocated tensors and wait for them."""
        works = [self.recv(group or self.data, t) for t in tensors if t.numel()]
        for work in works:
            self.wait(work)


def listen_store(host: str, timeout: float) -> dist.TCPStore:
    """A TCPStore hosted here, listening on `host` only (TCPStore alone would listen on every interface)."""
    listener = socket.create_server((host, 0))
    port = listener.getsockname()[1]
    # The store takes the listening socket over and closes it when it goes.
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, master_listen_fd=listener.detach(),
                         timeout=timedelta(seconds=timeout))


def join_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))


class LinkServer:
    """The worker's side of one link: hosts the store, then serves requests on a thread until CLOSE or failure."""

    def __init__(self, handler: Handler, host: str, backend: str, timeout: float = 60.0,
                 device: torch.device | None = None, on_exit: Callable[["LinkServer"], None] | None = None):
        self.handler = handler
        self.host, self.backend, self.timeout = host, backend, timeout
        self.device = device  # the worker's CUDA device, for the nccl backend
        self.on_exit = on_exit
        self.requests = 0
        self._store = listen_store(host, timeout)
        self.address = (host, self._store.port)
        self.rendezvous = {"host": host, "port": self._store.port, "backend": backend}  # what the router joins
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"collective-link-{self.address[1]}")
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.backend == "nccl":
                torch.cuda.set_device(self.device)  # NCCL uses the thread's current device
            link = Link(self._store, WORKER_RANK, self.backend, self.host, self.timeout)
            self._serve(link)
        except LinkError as err:  # the router went away without CLOSE (killed, timed out)
            log.info("collective link %s ended: %s", self.address, err)
        except Exception:
            log.exception("collective link %s failed", self.address)
        finally:
            self._store = None  # drops the listener; the groups go with `link` when this frame ends
            if self.on_exit is not None:
                self.on_exit(self)

    def _serve(self, link: Link) -> None:
        header = torch.empty(REQ_LEN, dtype=torch.int64)
        while True:
            link.wait(link.recv(link.ctrl, header), IDLE_WAIT)
            op, layer, T, P, H, code = header.tolist()
            if op == OP_CLOSE:
                return
            if op != OP_RUN or code not in CODE_DTYPES:
                raise LinkError(f"not our protocol: header {header.tolist()}")
            hidden = torch.empty(T, H, dtype=CODE_DTYPES[code], device=link.device)  # [T, H]
            pairs = torch.empty(2, P, dtype=torch.int32, device=link.device)  # [2, P]: token row, expert
            weight = torch.empty(P, dtype=torch.float32, device=link.device)  # [P]
            link.recv_and_wait([hidden, pairs, weight])
            self.requests += 1
            try:
                out = self.handler(layer, hidden, pairs[0].long(), pairs[1].long(), weight.to(hidden.dtype))
                out = out.to(link.device).contiguous()  # [T, H]
                status = torch.tensor([0, T, H, DTYPE_CODES[out.dtype]], dtype=torch.int64)
            except Exception as err:  # reported to the router; the link keeps serving
                message = torch.frombuffer(bytearray(f"{type(err).__name__}: {err}".encode()), dtype=torch.uint8)
                link.send_and_wait([torch.tensor([1, message.numel(), 0, 0], dtype=torch.int64), message], link.ctrl)
                continue
            link.send_and_wait([status], link.ctrl)
            link.send_and_wait([out])
