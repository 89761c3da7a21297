"""The gRPC front: Generation and ClusterAdmin servicers, health, reflection, error mapping.

Servicers stay thin: message in, domain call, message out. One interceptor
turns the engine's exceptions into status codes, so every handler reports a
bad field, a full queue or a failed step the same way; it also turns bytes that
do not parse as the method's protobuf message into INVALID_ARGUMENT. Requests are
only ever parsed as protobuf: nothing a network client sends is unpickled.

Security (TLS, mutual TLS, bearer token: `router_service.security`) is wired in
`start_server`; graceful shutdown is `drain`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.async_engine import AsyncEngine, EngineStepError
from router_service.engine import Request, StepOutput
from router_service.errors import (CONTROLLER_UNAVAILABLE_METADATA, ControllerUnavailable, EngineStopped,
                                   InvalidRequest, QueueFull)
from router_service.metrics import RequestTimer, RouterMetrics
from router_service.sampling import SamplingParams
from router_service.security import BearerTokenInterceptor, ServerSecurity

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
MAX_MESSAGE_BYTES = 64 << 20  # largest request, gRPC or HTTP: a long prompt of token ids fits

FINISH_REASONS = {
    "length": pb2.FINISH_REASON_LENGTH,
    "stop": pb2.FINISH_REASON_STOP,
    "eos": pb2.FINISH_REASON_EOS,
    "cancelled": pb2.FINISH_REASON_CANCELLED,
}

# Exception type -> status code; the first match in order wins.
STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (EngineStepError, grpc.StatusCode.UNAVAILABLE),
    (ControllerUnavailable, grpc.StatusCode.UNAVAILABLE),
]


# --- message <-> domain ---------------------------------------------------------------------


def to_request(msg: pb2.GenerateRequest, tokenizer) -> Request:
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt", "is missing: set text or token_ids")
    if kind == "text":
        if not msg.text:
            raise InvalidRequest("prompt.text", "is empty")
        if tokenizer is None:
            raise InvalidRequest("prompt.text", "this model has no tokenizer; send token_ids")
        ids = tokenizer.encode(msg.text)
    else:
        ids = list(msg.token_ids.ids)
    s = msg.sampling
    params = SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=msg.return_logprobs,
        top_logprobs=msg.top_logprobs,
    )
    return Request(msg.request_id, ids, params)


def _timings(timer: RequestTimer) -> pb2.Timings:
    return pb2.Timings(queue_seconds=timer.queue, time_to_first_token_seconds=timer.first_token or 0.0,
                       total_seconds=timer.total)


def _top_logprobs(out: StepOutput) -> list[pb2.TopLogprobs]:
    return [pb2.TopLogprobs(token_ids=[t for t, _ in alts], logprobs=[lp for _, lp in alts])
            for alts in out.top_logprobs]


def _usage(out: StepOutput) -> pb2.Usage:
    return pb2.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)


# --- servicers --------------------------------------------------------------------------------


class GenerationServicer(pb2_grpc.GenerationServicer):
    def __init__(self, engine: AsyncEngine, model_name: str, model_path: str, metrics: RouterMetrics | None = None):
        self.engine = engine
        self.model_name, self.model_path = model_name, model_path
        self.metrics = metrics

    async def Generate(self, request: pb2.GenerateRequest, context) -> pb2.GenerateResponse:
        req = to_request(request, self.engine.engine.tokenizer)
        timer = RequestTimer(self.metrics)
        response = pb2.GenerateResponse()
        async for out in self.engine.generate(req):
            timer.saw(out)
            response.token_ids.extend(out.token_ids)
            response.logprobs.extend(out.logprobs)
            response.top_logprobs.extend(_top_logprobs(out))
            response.text += out.text
            if out.finished:
                response.finish_reason = FINISH_REASONS[out.finish_reason]
                response.usage.CopyFrom(_usage(out))
        response.request_id = req.request_id
        response.timings.CopyFrom(_timings(timer))
        return response

    async def GenerateStream(self, request: pb2.GenerateRequest, context):
        req = to_request(request, self.engine.engine.tokenizer)
        timer = RequestTimer(self.metrics)
        async for out in self.engine.generate(req):
            timer.saw(out)
            msg = pb2.GenerateStreamResponse(request_id=req.request_id, token_ids=out.token_ids, text=out.text,
                                             logprobs=out.logprobs, top_logprobs=_top_logprobs(out))
            if out.finished:
                msg.finish_reason = FINISH_REASONS[out.finish_reason]
                msg.usage.CopyFrom(_usage(out))
                msg.timings.CopyFrom(_timings(timer))
            yield msg

    async def Tokenize(self, request: pb2.TokenizeRequest, context) -> pb2.TokenizeResponse:
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequest("text", "this model has no tokenizer")
        ids = tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb2.TokenizeResponse(token_ids=ids, tokens=[tokenizer.id_to_token(i) or "" for i in ids])

    async def GetModelInfo(self, request, context) -> pb2.ModelInfo:
        engine = self.engine.engine
        spec = engine.spec
        moe = spec.moe
        info = pb2.ModelInfo(
            model_name=self.model_name, model_path=self.model_path, model_type=spec.model_type,
            vocab_size=spec.vocab_size, max_model_len=engine.max_model_len, num_layers=spec.num_layers,
            moe_layers=spec.moe_layers, hidden_size=spec.hidden_size, eos_token_ids=sorted(engine.eos_token_ids),
            dtype=str(engine.model.dtype).removeprefix("torch."),
        )
        if moe is not None:
            info.num_experts, info.top_k = moe.num_experts, moe.top_k
            info.moe_intermediate_size = moe.expert_intermediate_size
            info.shared_expert_intermediate_size = moe.shared_intermediate_size
            info.num_shared_experts = moe.shared_intermediate_size // moe.expert_intermediate_size
        return info


# (method name, serialized request) -> serialized response; the controller's `admin` call in a cluster.
AdminBackend = Callable[[str, bytes], Awaitable[bytes]]


class ClusterAdminServicer(admin_grpc.ClusterAdminServicer):
    """Every admin call is forwarded to the controller as serialized request -> serialized response."""

    def __init__(self, admin: AdminBackend):
        self.admin = admin

    async def _forward(self, method: str, request, response_type):
        return response_type.FromString(await self.admin(method, request.SerializeToString()))

    async def GetPlacement(self, request, context):
        return await self._forward("GetPlacement", request, admin_pb2.Placement)

    async def GetExpertLoad(self, request, context):
        return await self._forward("GetExpertLoad", request, admin_pb2.ExpertLoad)

    async def Rebalance(self, request, context):
        return await self._forward("Rebalance", request, admin_pb2.RebalanceResponse)

    async def GetAutoscalingPolicy(self, request, context):
        return await self._forward("GetAutoscalingPolicy", request, admin_pb2.AutoscalingPolicy)

    async def SetAutoscalingPolicy(self, request, context):
        return await self._forward("SetAutoscalingPolicy", request, admin_pb2.AutoscalingPolicy)


# --- error mapping --------------------------------------------------------------------------


def status_of(err: BaseException) -> grpc.StatusCode | None:
    return next((code for kind, code in STATUS_OF if isinstance(err, kind)), None)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Engine exceptions -> status codes with the exception's message; anything else is INTERNAL.

    It also counts every finished call by status code (requests_total), since it sees every outcome.
    """

    def __init__(self, metrics: RouterMetrics | None = None):
        self.metrics = metrics

    def _count(self, code: grpc.StatusCode) -> None:
        if self.metrics:
            self.metrics.request_done(code.name)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        # Only for the unary-request kinds, whose wrappers turn an unparseable request into INVALID_ARGUMENT.
        parse = _parse_or_malformed(handler.request_deserializer) if handler.request_deserializer else None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, details.method),
                                    request_deserializer=parse)
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, details.method),
                                    request_deserializer=parse)
        return handler

    async def _abort(self, context, err: Exception, method: str):
        code = status_of(err)
        if code is None:
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
        self._count(code)
        trailer = (CONTROLLER_UNAVAILABLE_METADATA,) if isinstance(err, ControllerUnavailable) else ()
        await context.abort(code, str(err), trailing_metadata=trailer)

    def _wrap_unary(self, fn, method):
        async def wrapped(request, context):
            try:
                _check_parsed(request)
                response = await fn(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                self._count(grpc.StatusCode.CANCELLED)
                raise
            except Exception as err:
                await self._abort(context, err, method)
            self._count(grpc.StatusCode.OK)
            return response

        return wrapped

    def _wrap_stream(self, fn, method):
        async def wrapped(request, context):
            try:
                _check_parsed(request)
                async for msg in fn(request, context):
                    yield msg
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                self._count(grpc.StatusCode.CANCELLED)
                raise
            except Exception as err:
                await self._abort(context, err, method)
                return
            self._count(grpc.StatusCode.OK)

        return wrapped


class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler turns it into INVALID_ARGUMENT.

    grpc would otherwise answer a deserializer's exception with INTERNAL, blaming the server for the
    client's bytes.
    """

    def __init__(self, error: Exception):
        self.error = error


def _parse_or_malformed(deserialize):
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as err:  # DecodeError, or anything else a parser raises on hostile bytes
            return _Malformed(err)

    return parse


def _check_parsed(request) -> None:
    if isinstance(request, _Malformed):
        raise InvalidRequest("request", f"is not a valid protobuf message of the method's type "
                                        f"({type(request.error).__name__}: {request.error or 'unparseable'})")


# --- wiring -----------------------------------------------------------------------------------


async def start_server(engine: AsyncEngine, admin: AdminBackend | None, host: str, port: int, model_name: str,
                       model_path: str, metrics: RouterMetrics | None = None,
                       security: ServerSecurity | None = None) -> tuple[grpc.aio.Server, int, Any]:
    """Start a grpc.aio server with every service; returns (server, bound port, health servicer).

    `security` (default: plaintext, no authentication) adds TLS on the port and the bearer-token check.
    """
    security = security or ServerSecurity()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    token = security.token()
    if token is not None:  # first: a refused call reaches no other interceptor and is never parsed
        interceptors.append(BearerTokenInterceptor(token, metrics))
    interceptors.append(ErrorMappingInterceptor(metrics))
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(engine, model_name, model_path, metrics), server)
    services = [pb2.DESCRIPTOR.services_by_name["Generation"].full_name]
    if admin is not None:
        admin_grpc.add_ClusterAdminServicer_to_server(ClusterAdminServicer(admin), server)
        services.append(admin_pb2.DESCRIPTOR.services_by_name["ClusterAdmin"].full_name)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(services, server)
    credentials = security.server_credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ["", *services[:2]]:
        await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC server on %s:%d (%s, %s)", host, bound,
             ("mutual TLS" if security.tls_client_ca_file else "TLS") if credentials else "plaintext",
             "bearer token required" if token is not None else "no authentication")
    return server, bound, health_servicer


async def drain(server: grpc.aio.Server, engine: AsyncEngine, health_servicer, grace_seconds: float,
                finish_seconds: float = 5.0, http=None) -> dict:
    """Graceful shutdown: refuse new work, let in-flight requests finish, cancel the rest, stop.

    1. New Generate/GenerateStream calls get UNAVAILABLE ("... draining ..."), and new HTTP requests
       (`http`, the router's HTTPServer, if any) 503; health reports NOT_SERVING for every service
       (HTTP /health 503), so load balancers and probes stop sending traffic.
    2. Requests in flight (running or queued) run to completion for up to `grace_seconds`.
    3. Whatever is left is cancelled: those calls end normally with FINISH_REASON_CANCELLED and the
       tokens generated so far.
    4. The gRPC server stops (up to `finish_seconds` for the last responses to go out), then the HTTP
       server, then the engine.
    Returns counts for logs: requests finished during the grace period and cancelled at its end.
    """
    started = time.monotonic()
    in_flight = engine.begin_drain()
    result = health_servicer.enter_graceful_shutdown()
    if hasattr(result, "__await__"):
        await result
    log.info("draining: %d requests in flight, grace %.1f s", in_flight, grace_seconds)
    await engine.wait_idle(grace_seconds)
    cancelled = engine.cancel_all()
    if cancelled:
        log.info("drain grace over: cancelling %d requests", cancelled)
        await engine.wait_idle(finish_seconds)
    await server.stop(finish_seconds)
    if http is not None:
        await http.stop()
    engine.stop()
    summary = {"in_flight": in_flight, "cancelled": cancelled, "seconds": time.monotonic() - started}
    log.info("drained: %s", summary)
    return summary


async def _set_health(servicer, service: str, status) -> None:
    result = servicer.set(service, status)
    if hasattr(result, "__await__"):
        await result
