"""The engine behind an asyncio server: one engine thread, one output queue per request.

Threads: the engine thread (`engine-loop`) alone calls `Engine.step`; outputs
reach request queues through `loop.call_soon_threadsafe`, so the queues and
`_streams` belong to the event loop. `submit` admits a request and returns its
`OutputStream`; `generate` is the same as an async generator. When the consumer
goes away (client cancel, deadline, disconnect) the stream is closed, the
request aborted and its KV slot freed at the next step boundary.

Draining (graceful shutdown, `server.drain`): `begin_drain` refuses new requests
with EngineStopped (UNAVAILABLE) while those in flight continue; `wait_idle`
waits for them; `cancel_all` aborts the rest, which end with finish reason
"cancelled".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator

from router_service.engine import Engine, Request, StepOutput
from router_service.errors import EngineStopped

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        self._streams: dict[str, asyncio.Queue] = {}  # event-loop only
        self._wake = threading.Event()
        self._stopped = False
        self._draining = False  # event-loop only
        self._idle = asyncio.Event()  # set while no request is in flight; event-loop only
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> "OutputStream":
        """Admit `request` now (raising InvalidRequest, QueueFull or EngineStopped at once, before any await)
        and return the stream of its outputs. The caller must `close()` the stream when done with it: a
        stream closed before its request finished aborts the request (its KV slot is freed at the next step).
        Event loop only."""
        if self._stopped:
            raise EngineStopped("the engine is shutting down")
        if self._draining:
            raise EngineStopped("the server is draining (shutting down) and accepts no new requests; "
                                "retry on another router")
        request.request_id = request.request_id or uuid.uuid4().hex
        # add_request first: a refused request (e.g. a duplicate of an in-flight id) must leave the stream
        # and the request that own that id alone. No output is lost: outputs reach `_streams` through
        # callbacks on this loop, which cannot run before the next await.
        self.engine.add_request(request)
        stream = OutputStream(self, request.request_id)
        self._streams[request.request_id] = stream.queue
        self._idle.clear()
        self._wake.set()
        return stream

    async def generate(self, request: Request) -> AsyncIterator[StepOutput]:
        """submit, then the outputs until the last; the request is aborted if the consumer stops early."""
        stream = self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _release(self, stream: "OutputStream") -> None:
        if self._streams.get(stream.request_id) is stream.queue:  # a reused id may own the entry by now
            del self._streams[stream.request_id]
            if not self._streams:
                self._idle.set()
        if not stream.finished:
            self.engine.abort(stream.request_id)
            self._wake.set()

    @property
    def in_flight(self) -> int:
        """Requests whose stream is open: queued or running in the engine."""
        return len(self._streams)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> int:
        """Refuse new requests from now on; returns how many are in flight."""
        self._draining = True
        return len(self._streams)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no request is in flight; True if none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return not self._streams

    def cancel_all(self) -> int:
        """Abort every request in flight; each ends with finish reason "cancelled". Returns how many."""
        ids = list(self._streams)
        for request_id in ids:
            self.engine.abort(request_id)
        self._wake.set()
        return len(ids)

    def wake(self) -> None:
        """Make the engine loop look for work (or a queued plan) now."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _deliver(self, items: list[tuple[str, StepOutput | BaseException]]) -> None:
        for request_id, item in items:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(item)

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_work():
                self.engine.idle()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                failed = [(request_id, EngineStepError(str(err))) for request_id in self.engine.fail_running()]
                self.loop.call_soon_threadsafe(self._deliver, failed)
                continue
            if outputs:  # one wake-up of the event loop per step, not one per request: it shares our GIL
                self.loop.call_soon_threadsafe(self._deliver, [(out.request_id, out) for out in outputs])


class OutputStream:
    """One admitted request's outputs, in order (event loop only): iterate it until the output that
    finishes the request, and close it in any case."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._closed = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True  # a failed step already dropped the request from the engine
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Stop listening; aborts the request unless it finished. Idempotent."""
        if not self._closed:
            self._closed = True
            self.engine._release(self)


class EngineStepError(RuntimeError):
    """A step failed (e.g. an expert worker died); its requests end with this error (UNAVAILABLE)."""
