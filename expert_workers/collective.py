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
                        | data: hidden [T, H] | pairs int32 [2, P] (token row, expert) | weight [P] (hidden's dtype)
Response (rank 1 -> 0): control int64 [RSP_LEN] (status, T, H, dtype code) | data: out [T, H]
                        status != 0: T is the length of a UTF-8 message sent instead as control uint8 [T];
                        STATUS_ERROR: the request failed, the link keeps serving (the router's `WorkerError`);
                        STATUS_PROTOCOL: the worker did not understand the header and ends the link
op CLOSE ends the link (the router is done with it); each side then drops its groups.

Shape legend: T tokens sent, P (token, expert) pairs, H hidden.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from expert_workers.wire import CODE_DTYPES, DTYPE_CODES

log = logging.getLogger(__name__)

REQ_LEN, RSP_LEN = 6, 4  # int64 header lengths: (op, layer, T, P, H, dtype code); (status, T, H, dtype code)
OP_CLOSE, OP_RUN = 0, 1
STATUS_OK, STATUS_ERROR, STATUS_PROTOCOL = 0, 1, 2
ROUTER_RANK, WORKER_RANK = 0, 1
TAG = 0  # one tag: gloo and NCCL match point-to-point messages between two ranks in posting order
# An idle worker waits this long for the next header. A wait that expires breaks a gloo link for good,
# so this is "never" in practice; a router that died closes the TCP connection and ends the wait at once.
IDLE_WAIT = timedelta(days=3650)
# NCCL's watchdog ends operations pending longer than its group's timeout, and by default the process with
# them. Failures are detected on the gloo control group (within the link's timeout) and abort the NCCL group
# then; its own timeout is only a backstop, so it is well above the link's.
NCCL_TIMEOUT_FACTOR = 10
BACKENDS = ("auto", "gloo", "nccl")

Handler = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LinkError(ConnectionError):
    """The link's peer closed, reset or timed out: the link is unusable from here on."""


def check_backend(requested: str) -> str:
    """The one place a backend's name is validated (the transport's setting, a worker's open_link)."""
    if requested not in BACKENDS:
        raise ValueError(f"collective backend must be one of {BACKENDS}, not {requested!r}")
    return requested


def resolve_backend(requested: str, router_cuda: bool, worker_cuda: bool) -> str:
    """'nccl' moves tensors GPU to GPU and needs CUDA at both ends; 'gloo' moves host memory; 'auto' picks."""
    if check_backend(requested) == "auto":
        return "nccl" if router_cuda and worker_cuda and dist.is_nccl_available() else "gloo"
    if requested == "nccl" and not (router_cuda and worker_cuda):
        raise ValueError("the nccl backend needs CUDA tensors at both ends of the link "
                         f"(router cuda={router_cuda}, worker cuda={worker_cuda})")
    return requested


class Op(NamedTuple):
    """A posted send or receive, and what it was (for the error if it fails)."""

    work: Any
    what: str


class Link:
    """One end of a formed link: its groups, the device its data tensors live on, and the peer's rank.

    name says which peer this is, for errors (e.g. "expert worker 3 at 10.0.0.5:41234"). device: this end's
    CUDA device for the nccl backend (the engine's or the worker's; data tensors travel from there)."""

    def __init__(self, store: dist.Store, rank: int, backend: str, host: str, timeout: float, name: str = "peer",
                 device: torch.device | None = None):
        self.rank, self.peer, self.backend, self.name = rank, 1 - rank, backend, name
        self.timeout = timedelta(seconds=timeout)
        # Both constructors block until the peer has joined (each rank publishes its address in the store).
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # listen on the data-plane address
        options._timeout = self.timeout
        options._threads = 1  # point-to-point ops run on the device's own I/O thread, not the pool
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, 2, options)
        if backend == "nccl":
            if device is None or device.type != "cuda" or device.index is None:
                raise ValueError(f"the nccl backend needs this end's CUDA device with its index, not {device}")
            self.device = device
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = self.timeout * NCCL_TIMEOUT_FACTOR
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, 2, nccl_options)
        else:
            self.device = torch.device("cpu")
            self.data = self.ctrl

    def _error(self, what: str, err: BaseException) -> LinkError:
        detail = str(err).split("\n")[0] or type(err).__name__
        return LinkError(f"collective link to {self.name}: {what} failed: {detail}")

    def send(self, group, tensor: torch.Tensor, what: str) -> Op:
        """Post a send; it completes once the peer has posted the matching receive."""
        try:
            return Op(group.send([tensor], self.peer, TAG), f"send {what}")
        except RuntimeError as err:  # gloo refuses to post on a link that already failed
            raise self._error(f"send {what}", err) from err

    def recv(self, group, tensor: torch.Tensor, what: str) -> Op:
        try:
            return Op(group.recv([tensor], self.peer, TAG), f"receive {what}")
        except RuntimeError as err:
            raise self._error(f"receive {what}", err) from err

    def wait(self, op: Op, timeout: timedelta | None = None) -> None:
        """Wait for a posted operation; a closed, reset or silent peer raises LinkError.

        With NCCL the wait also orders the current CUDA stream after the transfer; given a
        timeout (always, here) it blocks the host until the transfer is done, as gloo does."""
        try:
            op.work.wait(timeout or self.timeout)
        except RuntimeError as err:  # gloo and NCCL report every transport failure as a RuntimeError
            raise self._error(op.what, err) from err

    def send_and_wait(self, sends: list[torch.Tensor], what: str, group=None,
                      timeout: timedelta | None = None) -> None:
        """Send tensors to the peer and wait for them (empty ones are skipped: both sides know the shapes)."""
        ops = [self.send(group or self.data, t, what) for t in sends if t.numel()]
        for op in ops:
            self.wait(op, timeout)

    def recv_and_wait(self, tensors: list[torch.Tensor], what: str, group=None) -> None:
        """Receive into pre-allocated tensors and wait for them."""
        ops = [self.recv(group or self.data, t, what) for t in tensors if t.numel()]
        for op in ops:
            self.wait(op)

    def abort(self) -> None:
        """After a failure: end the NCCL group's pending operations now, before its watchdog does (which ends
        the process). gloo needs nothing: its groups close their connections when dropped."""
        if self.data is not self.ctrl:
            try:
                self.data.abort()
            except Exception:  # already torn down; nothing more to do
                log.debug("aborting %s's NCCL group failed", self.name, exc_info=True)

    def shutdown(self) -> None:
        """After CLOSE (nothing pending at either end): release the NCCL communicator in order."""
        if self.data is not self.ctrl:
            self.data.shutdown()


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
    """The worker's side of one link: hosts the store, then serves requests on a thread until CLOSE or failure.

    `start()` starts the thread; the owner registers the server first, so that `on_exit` (which may run at
    once, e.g. when the router never joins) always finds it registered."""

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

    def start(self) -> "LinkServer":
        self.thread.start()
        return self

    def _run(self) -> None:
        link = None
        try:
            if self.backend == "nccl":
                torch.cuda.set_device(self.device)  # NCCL uses the thread's current device
            link = Link(self._store, WORKER_RANK, self.backend, self.host, self.timeout,
                        f"the router of link {self.address[0]}:{self.address[1]}", self.device)
            if self._serve(link):
                link.shutdown()
            else:
                link.abort()
        except Exception as err:
            if isinstance(err, LinkError):  # the router went away without CLOSE (killed, timed out)
                log.info("collective link %s ended: %s", self.address, err)
            else:
                log.exception("collective link %s failed", self.address)
            if link is not None:
                link.abort()
        finally:
            self._store = None  # drops the listener; the groups go with `link` when this frame ends
            if self.on_exit is not None:
                self.on_exit(self)

    def _serve(self, link: Link) -> bool:
        """Serve requests until CLOSE (returns True) or a request it cannot read (False, the link is broken)."""
        header = torch.empty(REQ_LEN, dtype=torch.int64)
        while True:
            link.wait(link.recv(link.ctrl, header, "request header"), IDLE_WAIT)
            op, layer, T, P, H, code = header.tolist()
            if op == OP_CLOSE:
                return True
            if op != OP_RUN or code not in CODE_DTYPES:
                # The request's tensors cannot be received without understanding the header, so the link
                # ends; the router is told why rather than left waiting for a reply until its timeout.
                log.warning("collective link %s: not our protocol: header %s; ending it", self.address,
                            header.tolist())
                self._reply_error(link, STATUS_PROTOCOL, f"not our protocol: header {header.tolist()}")
                return False
            hidden = torch.empty(T, H, dtype=CODE_DTYPES[code], device=link.device)  # [T, H]
            pairs = torch.empty(2, P, dtype=torch.int32, device=link.device)  # [2, P]: token row, expert
            weight = torch.empty(P, dtype=hidden.dtype, device=link.device)  # [P], in the compute dtype
            link.recv_and_wait([hidden, pairs, weight], "request tensors")
            self.requests += 1
            try:
                out = self.handler(layer, hidden, pairs[0], pairs[1], weight)
                out = out.to(link.device).contiguous()  # [T, H]
                status = torch.tensor([STATUS_OK, T, H, DTYPE_CODES[out.dtype]], dtype=torch.int64)
            except Exception as err:  # reported to the router; the link keeps serving
                self._reply_error(link, STATUS_ERROR, f"{type(err).__name__}: {err}")
                continue
            # The reply's sends complete only once the router posts its receives, i.e. when it collects the
            # reply: that can be long after the request (the other micro-batch's work, a recovery waiting for
            # a replacement, a failed step's leftovers until the next step). So wait as long as for a header;
            # a router that dies closes the connection and ends the wait at once.
            link.send_and_wait([status], "reply header", link.ctrl, IDLE_WAIT)
            link.send_and_wait([out], "reply", timeout=IDLE_WAIT)

    @staticmethod
    def _reply_error(link: Link, status: int, text: str) -> None:
        message = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)  # [n]
        header = torch.tensor([status, message.numel(), 0, 0], dtype=torch.int64)
        link.send_and_wait([header, message], "error reply", link.ctrl, IDLE_WAIT)
