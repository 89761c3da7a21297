"""The OpenAI-compatible HTTP front door: a second server next to gRPC, on the same engine.

    POST /v1/completions        POST /v1/chat/completions        GET /v1/models        GET /health

aiohttp, on the router's event loop (the one grpc.aio runs on): measured against FastAPI with uvicorn
streaming the same chunks, it spent 14-20 us of server CPU per streamed chunk against 20-25
(docs/http-api.md, docs/benchmarks/http_stack_overhead.py), and Ray already ships it. Tokens reach a response through the AsyncEngine's
output streams, so JSON encoding and socket writes stay on the event loop, off the engine thread.

The same guarantees as gRPC (`router_service.server`): admission and queue limits are the engine's (a
full queue is 429), a bad field or malformed JSON is a 400 in OpenAI's error format naming the field,
a missing or wrong bearer token is 401 (health stays open, as gRPC health does), the same TLS files
serve HTTPS, a draining server answers 503, and a client that disconnects, mid-stream or not, has its
requests aborted (their KV slots are freed at the next step): aiohttp cancels the handler when the
connection drops. Every finished request counts in requests_total with protocol="http".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web

from router_service import openai_protocol as oa
from router_service.async_engine import AsyncEngine, EngineStepError, OutputStream
from router_service.errors import EngineStopped, InvalidRequest, QueueFull
from router_service.metrics import RequestTimer, RouterMetrics
from router_service.security import ServerSecurity, bearer_credentials, token_matches
from router_service.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# Exception type -> (HTTP status, OpenAI error type); the first match in order wins.
HTTP_STATUS_OF: list[tuple[type[BaseException], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),
    (QueueFull, 429, "rate_limit_error"),
    (EngineStopped, 503, "service_unavailable"),
    (EngineStepError, 503, "service_unavailable"),
]
# What became of a stream whose headers (200) had gone out: 499 when the client left, the error's status when
# a step failed; what requests_total counts.
OUTCOME = web.ResponseKey("outcome", int)
PARSE_OFF_LOOP_BYTES = 1 << 20  # bodies larger than this are parsed on a thread, not on the event loop


class HTTPError(Exception):
    """An answer other than 200, in OpenAI's error format."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    @classmethod
    def of(cls, err: BaseException) -> "HTTPError | None":
        for kind, status, name in HTTP_STATUS_OF:
            if isinstance(err, kind):
                if isinstance(err, InvalidRequest):
                    param = _request_field(err.field)
                    return cls(status, name, f"{param}: {err.message}", param)
                return cls(status, name, str(err))
        return None

    def body(self) -> dict:
        return oa.error_body(str(self), self.kind, self.param, str(self.status))

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def _request_field(engine_field: str) -> str:
    """The engine names fields as the gRPC messages do (sampling.max_tokens, prompt.token_ids); the OpenAI
    request spells them at the top level (max_tokens, prompt)."""
    field = engine_field.removeprefix("sampling.")
    return "prompt" if field.startswith("prompt.") else field


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def _merged(streams: list[OutputStream]) -> AsyncIterator[tuple[int, Any]]:
    """(position in `streams`, StepOutput) as each stream yields, until all are done; the first failure raises."""
    if len(streams) == 1:  # the common case, without tasks
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: OutputStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as err:
            await queue.put((i, err))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class OpenAIFront:
    """Request handlers over one AsyncEngine (event loop only)."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: RouterMetrics | None = None,
                 token: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self._token = token.encode() if token else None
        self.started = int(time.time())

    # --- plumbing ---------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    def _count(self, status: int) -> None:
        if self.metrics:
            self.metrics.request_done(str(status), "http")

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Authentication first, then every exception as an OpenAI error; counts each finished request."""
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            response = await handler(request)
        except HTTPError as err:
            response = err.response()
        except web.HTTPException as err:  # aiohttp's own: unknown path (404), wrong method (405), body too large
            response = HTTPError(err.status, "invalid_request_error", err.reason).response()
        except asyncio.CancelledError:  # the client went away
            self._count(499)  # nginx's "client closed request": no answer was sent
            raise
        except Exception as err:
            mapped = HTTPError.of(err)
            if mapped is None:
                log.exception("%s %s failed", request.method, request.path)
                mapped = HTTPError(500, "internal_error", f"internal error: {type(err).__name__}")
            response = mapped.response()
        if request.path != "/health":
            self._count(response.get(OUTCOME, response.status))
        return response

    def _authenticate(self, request: web.Request) -> None:
        if self._token is None:
            return
        presented = bearer_credentials(request.headers.get("Authorization"))
        if presented is None:
            raise HTTPError(401, "authentication_error",
                            "missing bearer token: send the header 'Authorization: Bearer <token>'")
        if not token_matches(presented, self._token):
            raise HTTPError(401, "authentication_error", "invalid bearer token")

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise HTTPError(400, "invalid_request_error",
                            f"Content-Type must be application/json, got {request.content_type!r}", "Content-Type")
        raw = await request.read()
        try:
            # The event loop also serves every gRPC and HTTP stream: a long prompt of token ids is parsed aside.
            return json.loads(raw) if len(raw) <= PARSE_OFF_LOOP_BYTES else await asyncio.to_thread(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, "invalid_request_error", f"body is not valid JSON: {err}", "body") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise HTTPError(404, "invalid_request_error",
                            f"model {model!r} does not exist; this server serves {self.model_name!r}", "model")

    def _submit(self, choices: list[oa.Choice]) -> list[OutputStream]:
        """Admit every choice's request or none of them (a refusal closes those already admitted)."""
        streams: list[OutputStream] = []
        try:
            for c in choices:
                streams.append(self.engine.submit(c.request))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    # --- endpoints --------------------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "moe-serve",
                 "max_model_len": self.engine.engine.max_model_len}
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = oa.parse(oa.CompletionRequest, await self._body(request))
        self._check_model(req.model)
        response_id = oa.new_id("cmpl")
        choices = oa.completion_choices(req, self.engine.engine.tokenizer, response_id)
        return await self._serve(request, req, choices, response_id, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = oa.parse(oa.ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        response_id = oa.new_id("chatcmpl")
        engine = self.engine.engine
        choices = oa.chat_choices(req, engine.tokenizer, engine.max_model_len, response_id)
        return await self._serve(request, req, choices, response_id, chat=True)

    async def _serve(self, request: web.Request, req, choices: list[oa.Choice], response_id: str,
                     chat: bool) -> web.StreamResponse:
        streams = self._submit(choices)
        try:
            if req.stream:
                return await self._stream(request, req, choices, streams, response_id, chat)
            return await self._whole(req, choices, streams, response_id, chat)
        finally:
            for s in streams:
                s.close()

    async def _whole(self, req, choices: list[oa.Choice], streams: list[OutputStream], response_id: str,
                     chat: bool) -> web.Response:
        listing = oa.LogprobListing(self.engine.engine.tokenizer, len(choices))
        timers = [RequestTimer(self.metrics, "http") for _ in choices]
        texts = [""] * len(choices)
        logprobs: list[list[dict]] = [[] for _ in choices]
        finish: list[str | None] = [None] * len(choices)
        usage = oa.UsageCount()
        async with contextlib.aclosing(_merged(streams)) as outputs:
            async for i, out in outputs:
                timers[i].saw(out)
                if choices[i].request.params.logprobs and out.token_ids:
                    logprobs[i].append(listing.chat(out) if chat else listing.completion(i, out))
                texts[i] += out.text
                if out.finished:
                    finish[i] = oa.OPENAI_FINISH[out.finish_reason]
                    usage.finished(choices[i], out)
        body_choices = []
        for i, c in enumerate(choices):
            lp = _joined_logprobs(logprobs[i], chat) if c.request.params.logprobs else None
            if chat:
                body_choices.append({"index": c.index, "message": {"role": "assistant", "content": texts[i]},
                                     "logprobs": lp, "finish_reason": finish[i]})
            else:
                body_choices.append({"index": c.index, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
        body = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
                "created": oa.created(), "model": self.model_name, "choices": body_choices, "usage": usage.body()}
        return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def _stream(self, request: web.Request, req, choices: list[oa.Choice], streams: list[OutputStream],
                      response_id: str, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        listing = oa.LogprobListing(self.engine.engine.tokenizer, len(choices))
        timers = [RequestTimer(self.metrics, "http") for _ in choices]
        kind, stamp = ("chat.completion.chunk" if chat else "text_completion"), oa.created()
        usage_field = {"usage": None} if req.include_usage else {}
        usage = oa.UsageCount()
        started = [False] * len(choices)  # chat: has the choice's first chunk (the one naming the role) gone out

        def chunk(choices_field: list[dict], **extra) -> bytes:
            return _sse({"id": response_id, "object": kind, "created": stamp, "model": self.model_name,
                         "choices": choices_field, **usage_field, **extra})

        # Everything after the headers: a dropped connection or a failed step can happen at any write.
        try:
            async with contextlib.aclosing(_merged(streams)) as outputs:
                async for i, out in outputs:
                    timers[i].saw(out)
                    c = choices[i]
                    finish = oa.OPENAI_FINISH[out.finish_reason] if out.finished else None
                    if out.finished:
                        usage.finished(c, out)
                    if not (out.text or out.token_ids or finish):
                        continue
                    lp = None
                    if c.request.params.logprobs and out.token_ids:
                        lp = listing.chat(out) if chat else listing.completion(i, out)
                    if not chat:
                        await response.write(chunk([{"index": c.index, "text": out.text, "logprobs": lp,
                                                     "finish_reason": finish}]))
                        continue
                    delta = {"content": out.text} if out.text or not finish else {}
                    if not started[i]:  # with the first output, as OpenAI's first chunk: the role, then content
                        started[i] = True
                        delta = {"role": "assistant", **delta}
                    await response.write(chunk([{"index": c.index, "delta": delta, "logprobs": lp,
                                                 "finish_reason": finish}]))
            if req.include_usage:
                await response.write(chunk([], usage=usage.body()))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-stream: _serve closes (aborts) its requests
            response[OUTCOME] = 499
        except Exception as err:  # after the headers the error goes in the stream, as OpenAI's does
            mapped = HTTPError.of(err)
            if mapped is None:
                log.exception("streamed %s failed", request.path)
                mapped = HTTPError(500, "internal_error", f"internal error: {type(err).__name__}")
            response[OUTCOME] = mapped.status  # what the middleware counts: the headers said 200
            try:
                await response.write(_sse(mapped.body()))
                await response.write(SSE_DONE)
            except ConnectionResetError:
                response[OUTCOME] = 499
        return response


def _joined_logprobs(parts: list[dict], chat: bool) -> dict:
    """One choice's per-output logprob listings joined into the listing of its whole text."""
    if chat:
        return {"content": [entry for p in parts for entry in p["content"]]}
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for key in ("tokens", "token_logprobs", "text_offset"):
            joined[key] += p[key]
        joined["top_logprobs"] += p["top_logprobs"] or []
    if not joined["top_logprobs"]:
        joined["top_logprobs"] = None
    return joined


class HTTPServer:
    """A running HTTP front: its bound port; `stop()` closes it (the engine is the gRPC side's to stop)."""

    def __init__(self, runner: web.AppRunner, port: int):
        self.runner, self.port = runner, port

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http_server(engine: AsyncEngine, host: str, port: int, model_name: str,
                            metrics: RouterMetrics | None = None,
                            security: ServerSecurity | None = None) -> HTTPServer:
    """Serve the OpenAI API on host:port (0: a free port) on the running event loop."""
    security = security or ServerSecurity()
    front = OpenAIFront(engine, model_name, metrics, security.token())
    # handler_cancellation: a dropped connection cancels its handler, which aborts its requests.
    # shutdown_timeout: on stop, how long responses still going out may take (the gRPC side's finish_seconds).
    runner = web.AppRunner(front.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=security.ssl_context(), reuse_address=True)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"cannot bind the HTTP server to {host}:{port}: {err.strerror or err}") from None
    bound = runner.addresses[0][1]  # the port chosen when `port` is 0
    log.info("OpenAI HTTP API on %s://%s:%d", "https" if security.tls else "http", host, bound)
    return HTTPServer(runner, bound)
