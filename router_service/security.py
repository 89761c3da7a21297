"""Security of a router's gRPC server: TLS (optionally mutual) and bearer-token authentication.

What is protected, when configured (ClusterSettings `tls_*`, `auth_token`/`auth_token_file`):

- TLS: every service on the port, including health and reflection; plaintext connections are refused.
  With `tls_client_ca_file` a client must also present a certificate signed by that CA (mutual TLS).
- Bearer token: every call to `moeserve.v1.Generation` and `moeserve.v1.ClusterAdmin` must carry the
  metadata `authorization: Bearer <token>`; otherwise UNAUTHENTICATED, before the request is even parsed.
  `grpc.health.v1.Health` and server reflection stay open, so load balancers and Kubernetes probes work
  without the secret (they reveal the serving status and the public API schema, nothing else).
  The token travels in the clear without TLS: turn both on outside a trusted network.

What reaches the server from a network client is only ever parsed as protobuf (the generated
`FromString` deserializers, wrapped by `server.ErrorMappingInterceptor` so that malformed bytes are
INVALID_ARGUMENT): nothing a client sends is unpickled. Pickling happens only between Ray processes of
one cluster (controller, routers, expert workers), which Ray's own token authentication guards; that
stays on (Ray >= 2.60 enables it by default) and nothing here turns it off.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# Services that need the bearer token when authentication is on: every service we define.
PROTECTED_SERVICES = ("moeserve.v1.Generation", "moeserve.v1.ClusterAdmin")
AUTH_METADATA_KEY = "authorization"


class SecurityConfigError(ValueError):
    """An inconsistent or unreadable security setting; names the setting."""


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"{setting}: cannot read {path!r}: {err.strerror or err}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """A router's TLS files and bearer token; the default is plaintext and no authentication.

    The token is kept out of `repr` so that it never lands in a log line.
    """

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None

    def __post_init__(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SecurityConfigError("tls_cert_file and tls_key_file: set both (TLS) or neither (plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise SecurityConfigError(
                "tls_client_ca_file: mutual TLS needs the server's tls_cert_file and tls_key_file")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise SecurityConfigError("auth_token and auth_token_file: set one of them, not both")
        if self.auth_token is not None and not self.auth_token.strip():
            raise SecurityConfigError("auth_token: is empty")

    @classmethod
    def from_settings(cls, settings) -> "ServerSecurity":
        """From a `cluster.settings.ClusterSettings` (or anything with the same fields)."""
        token = settings.auth_token
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file,
                   token.get_secret_value() if token is not None else None, settings.auth_token_file)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def auth(self) -> bool:
        return self.auth_token is not None or self.auth_token_file is not None

    def token(self) -> str | None:
        """The bearer token (read from its file when configured that way), or None when auth is off."""
        if self.auth_token_file is not None:
            token = _read("auth_token_file", self.auth_token_file).decode("utf-8", "replace").strip()
            if not token:
                raise SecurityConfigError(f"auth_token_file: {self.auth_token_file!r} is empty")
            return token
        return self.auth_token.strip() if self.auth_token is not None else None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for `add_secure_port`, or None for plaintext."""
        if not self.tls:
            return None
        chain = _read("tls_cert_file", self.tls_cert_file)
        key = _read("tls_key_file", self.tls_key_file)
        ca = _read("tls_client_ca_file", self.tls_client_ca_file) if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS (and mutual TLS) for the HTTP server, or None for plaintext."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            if self.tls_client_ca_file:
                ctx.load_verify_locations(self.tls_client_ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as err:
            raise SecurityConfigError(f"tls_cert_file/tls_key_file/tls_client_ca_file: {err}") from None
        return ctx

    def check(self) -> None:
        """Read every configured file once, so that a typo fails at start-up rather than on the routers."""
        self.token()
        self.server_credentials()


def controller_security(controller) -> ServerSecurity:
    """Run on the controller actor (`controller.__ray_call__.remote(controller_security)`): its routers' security.

    Routers fetch their security from the controller at start-up instead of taking it as constructor
    arguments; the token crosses only Ray's authenticated channel, and files are read on the router's node.
    """
    return ServerSecurity.from_settings(controller.settings)


# --- bearer-token authentication ----------------------------------------------------------------


def _service_of(method: str) -> str:
    """'/moeserve.v1.Generation/Generate' -> 'moeserve.v1.Generation'."""
    return method.lstrip("/").split("/", 1)[0]


def bearer_credentials(value: str | bytes | None) -> str | None:
    """The token of an `authorization` value 'Bearer <token>' (gRPC metadata or HTTP header), else None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, credentials = value.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def token_matches(presented: str, token: bytes) -> bool:
    """Constant-time comparison, so that the time taken does not reveal how much of a guess was right."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"), token)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            return bearer_credentials(value)
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str, on_refuse) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without parsing the request."""

    async def refuse(context):
        on_refuse()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary(request, context):
        await refuse(context)

    async def stream(request, context):
        await refuse(context)
        yield  # pragma: no cover - makes this an async generator; abort raises first

    def ignore(raw: bytes):  # the payload of an unauthenticated call is never parsed
        return None

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, ignore)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, ignore)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, ignore)
    return grpc.stream_stream_rpc_method_handler(stream, ignore)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Calls to PROTECTED_SERVICES without `authorization: Bearer <token>` get UNAUTHENTICATED.

    Comparison is constant-time (`hmac.compare_digest`). Other services (health, reflection) pass through.
    Must come first among the server's interceptors, so that a refused call reaches nothing else.
    """

    def __init__(self, token: str, metrics=None):
        if not token:
            raise SecurityConfigError("auth_token: is empty")
        self._token = token.encode()
        self.metrics = metrics

    def _refused(self) -> None:
        if self.metrics:
            self.metrics.request_done(grpc.StatusCode.UNAUTHENTICATED.name)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or _service_of(details.method) not in PROTECTED_SERVICES:
            return handler
        presented = _bearer(details.invocation_metadata)
        if presented is None:
            return _refusal(handler, "missing bearer token: send metadata 'authorization: Bearer <token>'",
                            self._refused)
        if not token_matches(presented, self._token):
            return _refusal(handler, "invalid bearer token", self._refused)
        return handler


# --- client side ----------------------------------------------------------------------------


def client_channel(target: str, tls_ca_file: str | None = None, token: str | None = None,
                   tls_cert_file: str | None = None, tls_key_file: str | None = None,
                   options: list | None = None) -> grpc.Channel:
    """A synchronous channel to a router: TLS when a CA file is given, and the bearer token on every call.

    `tls_cert_file`/`tls_key_file` are the client's own certificate for servers that require mutual TLS.
    Without a CA file the channel is plaintext, and a token then goes in the clear,
    with a warning unless the target is a loopback address.
    """
    if tls_ca_file is None:
        if tls_cert_file or tls_key_file:
            raise SecurityConfigError(
                "--tls-cert/--tls-key need --tls-ca (the CA that signed the server's certificate)")
        channel = grpc.insecure_channel(target, options=options)
        if token:  # call credentials need TLS; on plaintext the token goes as plain metadata
            host = target.rsplit(":", 1)[0].strip("[]")
            if host not in {"127.0.0.1", "localhost", "::1"}:
                log.warning("sending the bearer token to %s over plaintext; give --tls-ca to use TLS", target)
            channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
        return channel
    creds = grpc.ssl_channel_credentials(
        _read("--tls-ca", tls_ca_file),
        _read("--tls-key", tls_key_file) if tls_key_file else None,
        _read("--tls-cert", tls_cert_file) if tls_cert_file else None)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds, options=options)


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                               "compression")), grpc.ClientCallDetails):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to each call on a plaintext channel (call credentials need TLS)."""

    def __init__(self, token: str):
        self._metadata = (AUTH_METADATA_KEY, f"Bearer {token}")

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._metadata], d.credentials,
                            d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)
