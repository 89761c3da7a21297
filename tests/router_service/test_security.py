"""TLS, mutual TLS and bearer-token authentication of the router's gRPC server (no Ray).

Certificates are made at test time with `cryptography`: one CA signs a server certificate for
127.0.0.1/localhost and a client certificate; a second, unrelated CA stands for "someone else's".
Three local servers on the tiny model: token only (with a ClusterAdmin backend), TLS only, and
mutual TLS with the token read from a file (what a Kubernetes Secret mount gives).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster import client as cli_client
from cluster.settings import ClusterSettings
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings
from router_service.security import SecurityConfigError, ServerSecurity, client_channel

TOKEN = "s3cret-token-for-tests"
TIMEOUT = 30
PROMPT = [0, 19923, 2058, 14, 566, 344]
SETTINGS = EngineSettings(max_model_len=64, max_num_seqs=2, max_queue=4)


# --- certificates ----------------------------------------------------------------------------------


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, san=None, client: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if not ca:
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *objs) -> str:
    data = b""
    for obj in objs:
        if isinstance(obj, x509.Certificate):
            data += obj.public_bytes(serialization.Encoding.PEM)
        else:
            data += obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@dataclass
class Pki:
    ca: str  # CA certificate (PEM file)
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here
    other_client_cert: str  # a client certificate from other_ca
    other_client_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("moe-serve test CA", ca_key, "moe-serve test CA", ca_key, ca=True)
    other = _cert("someone else's CA", other_key, "someone else's CA", other_key, ca=True)
    server_key, client_key, other_client_key = _key(), _key(), _key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", server_key, "moe-serve test CA", ca_key, san=san)
    client = _cert("test client", client_key, "moe-serve test CA", ca_key, client=True)
    other_client = _cert("intruder", other_client_key, "someone else's CA", other_key, client=True)
    return Pki(_write(d / "ca.pem", ca), _write(d / "server.pem", server), _write(d / "server.key", server_key),
               _write(d / "client.pem", client), _write(d / "client.key", client_key),
               _write(d / "other-ca.pem", other), _write(d / "intruder.pem", other_client),
               _write(d / "intruder.key", other_client_key))


# --- servers -----------------------------------------------------------------------------------------


async def fake_admin(method: str, payload: bytes) -> bytes:
    """Stands in for the controller: a fixed placement."""
    return admin_pb2.Placement(plan_version=7).SerializeToString()


@pytest.fixture(scope="module")
def token_server(local_server):
    srv = local_server(SETTINGS, ServerSecurity(auth_token=TOKEN), admin=fake_admin)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tls_server(local_server, pki):
    srv = local_server(SETTINGS, ServerSecurity(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def mtls_server(local_server, pki, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(f"  {TOKEN}\n")  # a Secret mounted from `kubectl create secret --from-file` may end in \n
    srv = local_server(SETTINGS, ServerSecurity(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                                                tls_client_ca_file=pki.ca, auth_token_file=str(token_file)),
                       admin=fake_admin)
    yield srv
    srv.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def generate(channel, metadata=None) -> pb2.GenerateResponse:
    return pb2_grpc.GenerationStub(channel).Generate(
        pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT), sampling=pb2.SamplingParams(max_tokens=3)),
        timeout=TIMEOUT, metadata=metadata)


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)  # a stream fails while it is read
    return info.value.code(), info.value.details()


# --- bearer token ------------------------------------------------------------------------------------


def _every_protected_call(channel, metadata):
    """One call of each protected method, as thunks; each returns a response or a stream to read."""
    gen = pb2_grpc.GenerationStub(channel)
    admin = admin_grpc.ClusterAdminStub(channel)
    request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT), sampling=pb2.SamplingParams(max_tokens=2))
    return {
        "Generate": lambda: gen.Generate(request, timeout=TIMEOUT, metadata=metadata),
        "GenerateStream": lambda: gen.GenerateStream(request, timeout=TIMEOUT, metadata=metadata),
        "Tokenize": lambda: gen.Tokenize(pb2.TokenizeRequest(text="hi"), timeout=TIMEOUT, metadata=metadata),
        "GetModelInfo": lambda: gen.GetModelInfo(pb2.GetModelInfoRequest(), timeout=TIMEOUT, metadata=metadata),
        "GetPlacement": lambda: admin.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=TIMEOUT,
                                                   metadata=metadata),
        "Rebalance": lambda: admin.Rebalance(admin_pb2.RebalanceRequest(), timeout=TIMEOUT, metadata=metadata),
    }


@pytest.mark.parametrize("metadata, why", [
    (None, "missing"),
    (bearer("wrong-token"), "invalid"),
    (bearer(TOKEN[:-1]), "invalid"),  # a prefix of the token is not the token
    (bearer(TOKEN + "x"), "invalid"),
    ([("authorization", TOKEN)], "missing"),  # no "Bearer " scheme
    ([("authorization", f"Basic {TOKEN}")], "missing"),
    ([("x-api-key", TOKEN)], "missing"),
], ids=["no-metadata", "wrong", "prefix", "longer", "no-scheme", "basic-scheme", "other-header"])
def test_calls_without_the_right_token_are_unauthenticated(token_server, metadata, why):
    with grpc.insecure_channel(token_server.target) as channel:
        for method, call in _every_protected_call(channel, metadata).items():
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
            assert why in details and TOKEN not in details, details
    assert token_server.engine.num_waiting == 0 and token_server.engine.kv.used_slots == 0


def test_the_right_token_works_on_every_method(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        calls = _every_protected_call(channel, bearer(TOKEN))
        assert len(calls["Generate"]().token_ids) == 2
        assert calls["GenerateStream"]()  # a stream object; read it
        assert sum(len(m.token_ids) for m in calls["GenerateStream"]()) == 2
        assert list(calls["Tokenize"]().token_ids)
        assert calls["GetModelInfo"]().vocab_size > 0
        assert calls["GetPlacement"]().plan_version == 7
    # "bearer" is case-insensitive (RFC 6750 follows RFC 7235 here); surrounding spaces do not matter.
    with grpc.insecure_channel(token_server.target) as channel:
        assert len(generate(channel, [("authorization", f"  bearer {TOKEN} ")]).token_ids) == 3


def test_health_and_reflection_need_no_token(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"moeserve.v1.Generation", "moeserve.v1.ClusterAdmin"} <= set(db.get_services())
        assert DescriptorPool(db).FindServiceByName("moeserve.v1.ClusterAdmin")


def test_an_unauthenticated_payload_is_not_even_parsed(token_server):
    """Garbage bytes without a token are UNAUTHENTICATED, not INVALID_ARGUMENT: the check comes before parsing."""
    with grpc.insecure_channel(token_server.target) as channel:
        raw = channel.unary_unary("/moeserve.v1.Generation/Generate", request_serializer=None,
                                  response_deserializer=None)
        code, _ = code_of(lambda: raw(b"\xff\xfe garbage \x00", timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: raw(b"\xff\xfe garbage \x00", timeout=TIMEOUT, metadata=bearer(TOKEN)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_helper_sends_the_token_on_plaintext_loopback(token_server):
    with client_channel(token_server.target, token=TOKEN) as channel:
        assert len(generate(channel).token_ids) == 3
        stream = pb2_grpc.GenerationStub(channel).GenerateStream(
            pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT), sampling=pb2.SamplingParams(max_tokens=2)),
            timeout=TIMEOUT)
        assert sum(len(m.token_ids) for m in stream) == 2


# --- TLS ----------------------------------------------------------------------------------------------


def test_tls_server_answers_a_tls_client(tls_server, pki):
    for host in ["127.0.0.1", "localhost"]:  # both names are in the certificate
        with client_channel(f"{host}:{tls_server.port}", pki.ca) as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert len(generate(channel).token_ids) == 3


def test_tls_server_refuses_plaintext(tls_server):
    with grpc.insecure_channel(tls_server.target) as channel:
        code, _ = code_of(lambda: generate(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_tls_client_refuses_a_server_its_ca_did_not_sign(tls_server, pki):
    with client_channel(tls_server.target, pki.other_ca) as channel:
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server, pki):
    target = mtls_server.target
    with client_channel(target, pki.ca, TOKEN) as channel:  # no client certificate
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
    with client_channel(target, pki.ca, TOKEN, pki.other_client_cert, pki.other_client_key) as channel:
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
    with client_channel(target, pki.ca, None, pki.client_cert, pki.client_key) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING  # health: certificate, no token
        code, _ = code_of(lambda: generate(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED  # the certificate does not replace the token
    with client_channel(target, pki.ca, TOKEN, pki.client_cert, pki.client_key) as channel:
        assert len(generate(channel).token_ids) == 3


def test_cli_generate_and_status_over_mutual_tls_with_token_from_env(mtls_server, pki, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--target")
    cli_client.add_connection_flags(parser)
    args = parser.parse_args(["--target", f"localhost:{mtls_server.port}", "--tls-ca", pki.ca,
                              "--tls-cert", pki.client_cert, "--tls-key", pki.client_key])
    assert args.token is None
    gen_args = argparse.Namespace(**vars(args), prompt=[], prompt_ids=[PROMPT], json=True, timeout=TIMEOUT,
                                  temperature=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=2, stop=[],
                                  stop_token_ids=[], ignore_eos=True, logprobs=False)
    monkeypatch.delenv(cli_client.TOKEN_ENV, raising=False)
    assert cli_client.generate_remote(gen_args) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv(cli_client.TOKEN_ENV, TOKEN)
    assert cli_client.generate_remote(gen_args) == 0
    assert '"finish_reason": "length"' in capsys.readouterr().out
    # status: GetPlacement passes (fake admin); GetExpertLoad's answer is the fake's Placement bytes, which
    # parse as an empty ExpertLoad, so the status table prints.
    assert cli_client.print_status(args) == 0
    assert "plan version 7" in capsys.readouterr().out
    gen_args.token = "wrong"  # the flag wins over the environment
    assert cli_client.generate_remote(gen_args) == 1
    assert "invalid bearer token" in capsys.readouterr().err


# --- settings --------------------------------------------------------------------------------------


def test_settings_from_environment_and_the_token_stays_out_of_reprs(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_SERVE_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MOE_SERVE_DRAIN_GRACE_SECONDS", "12.5")
    settings = ClusterSettings()
    assert settings.drain_grace_seconds == 12.5
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    security = ServerSecurity.from_settings(settings)
    assert security.token() == TOKEN and security.auth and not security.tls
    assert TOKEN not in repr(security)
    # What the controller hands its routers (the python-mode dump round-trips the secret).
    assert ServerSecurity.from_settings(ClusterSettings(**settings.model_dump())).token() == TOKEN
    monkeypatch.delenv("MOE_SERVE_AUTH_TOKEN")
    assert not ServerSecurity.from_settings(ClusterSettings()).auth  # default: off


@pytest.mark.parametrize("kwargs, setting", [
    (dict(tls_cert_file="a.pem"), "tls_cert_file and tls_key_file"),
    (dict(tls_key_file="a.key"), "tls_cert_file and tls_key_file"),
    (dict(tls_client_ca_file="ca.pem"), "tls_client_ca_file"),
    (dict(auth_token="x", auth_token_file="t"), "auth_token and auth_token_file"),
    (dict(auth_token="  "), "auth_token"),
])
def test_inconsistent_security_settings_are_refused_naming_the_setting(kwargs, setting):
    with pytest.raises(SecurityConfigError, match=setting):
        ServerSecurity(**kwargs)


def test_unreadable_files_are_refused_naming_the_setting(tmp_path, pki):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SecurityConfigError, match="tls_key_file: cannot read"):
        ServerSecurity(tls_cert_file=pki.server_cert, tls_key_file=missing).check()
    with pytest.raises(SecurityConfigError, match="auth_token_file: cannot read"):
        ServerSecurity(auth_token_file=missing).check()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match="auth_token_file: .* is empty"):
        ServerSecurity(auth_token_file=str(empty)).check()


# --- the OpenAI HTTP API: the same token and TLS ------------------------------------------------------------


def openai_client(base_url: str, api_key: str, verify=None):
    """The official client; `verify`: an ssl.SSLContext for HTTPS."""
    import openai

    http_client = openai.DefaultHttpxClient(verify=verify) if verify is not None else None
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT,
                         http_client=http_client)


def http_complete(client) -> str:
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text


def raw_http(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None,
             context=None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP call (stdlib, so nothing in between interprets the answer)."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("headers, why", [({}, "missing"), ({"Authorization": "Bearer wrong"}, "invalid"),
                                          ({"Authorization": f"Basic {TOKEN}"}, "missing")])
def test_http_calls_without_the_right_token_are_401_and_health_stays_open(token_server, headers, why):
    url = token_server.http_url
    for method, path, body in [("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("GET", "/v1/models", None)]:
        status, answer = raw_http(url + path, method, body, headers)
        assert status == 401, (path, answer)
        assert why in answer["error"]["message"] and answer["error"]["type"] == "authentication_error"
    assert raw_http(url + "/health")[0] == 200


def test_the_openai_client_with_the_right_token_is_served(token_server):
    import openai

    assert http_complete(openai_client(token_server.http_url, TOKEN))
    with pytest.raises(openai.AuthenticationError):
        http_complete(openai_client(token_server.http_url, "wrong"))


def test_https_with_the_grpc_servers_certificate(tls_server, pki):
    import ssl
    import urllib.error

    assert http_complete(openai_client(tls_server.http_url, "unused", verify=ssl.create_default_context(cafile=pki.ca)))
    plain = tls_server.http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port: no answer
        raw_http(plain + "/health")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a CA that signed nothing here
        raw_http(tls_server.http_url + "/health", context=ssl.create_default_context(cafile=pki.other_ca))


def test_https_with_mutual_tls_needs_a_client_certificate_and_the_token(mtls_server, pki):
    import ssl
    import urllib.error

    def client_ctx(cert=None, key=None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=pki.ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx

    url = mtls_server.http_url
    for ctx in (client_ctx(), client_ctx(pki.other_client_cert, pki.other_client_key)):
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            raw_http(url + "/health", context=ctx)
    ours = client_ctx(pki.client_cert, pki.client_key)
    assert raw_http(url + "/health", context=ours)[0] == 200
    assert raw_http(url + "/v1/models", context=ours)[0] == 401  # the certificate does not replace the token
    assert http_complete(openai_client(url, TOKEN, verify=ours))
