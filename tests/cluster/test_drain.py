"""Graceful drain: `server.drain` on a local server, and SIGTERM to a real `moe-serve serve` process.

The SIGTERM test runs `moe-serve serve --address local` as a subprocess: a Ray cluster of its own, not the
session's shared instance. Sharing that instance (`--address <its GCS>`) would save Ray's start-up but
puts the process's detached controller and its named routers and workers into the namespace that the
other cluster tests use (`controller`, `router-0`, ...), so one module's leftovers could break the other;
and a separate cluster is exactly what an operator's `moe-serve serve` is: a driver that started Ray and
must stop it. `local` (rather than no address) makes Ray start a new instance even when RAY_ADDRESS or a
`ray start` cluster on this machine would otherwise be picked up. The process gets its own session, so a
failed test can kill it and every Ray process it started as one process group.

The process also requires a bearer token (MOE_SERVE_AUTH_TOKEN_FILE): that checks, at no extra start-up
cost, that security settings reach the routers through the controller.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import wait_until_serving
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings
from router_service.server import drain

SERVICES = ["", "moeserve.v1.Generation"]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def ids_request(n_tokens: int, first: int = 5) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[0, first, 6, 7]),
                               sampling=pb2.SamplingParams(max_tokens=n_tokens, ignore_eos=True))


def health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    pytest.fail(f"not {what} after {timeout} s")


def refused_as_draining(stub, metadata=None) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(ids_request(2), timeout=10, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(ids_request(2), timeout=10, metadata=metadata))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()


# --- server.drain on a local server (no Ray) --------------------------------------------------------


def test_drain_finishes_what_fits_in_the_grace_period_and_cancels_the_rest(local_server):
    # One slot: the long request runs, the other two wait in the queue behind it.
    srv = local_server(EngineSettings(max_model_len=256, max_num_seqs=1, max_queue=4))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb2_grpc.GenerationStub(channel)
            long_call = stub.GenerateStream(ids_request(240), timeout=60)
            head = next(long_call)  # running now
            queued = [stub.GenerateStream(ids_request(2, first=9 + i), timeout=60) for i in range(2)]
            wait_for(lambda: srv.engine.num_waiting == 2, 10, "queued")
            summary = asyncio.run_coroutine_threadsafe(  # on the server's loop; the test goes on meanwhile
                drain(srv.server, srv.async_engine, srv.health, grace_seconds=0.5), srv.loop)
            wait_for(lambda: all(health(channel, s) == NOT_SERVING for s in SERVICES), 5, "NOT_SERVING")
            refused_as_draining(stub)
            messages = [head, *long_call]
            last = messages[-1]
            assert last.finish_reason == pb2.FINISH_REASON_CANCELLED
            generated = sum(len(m.token_ids) for m in messages)
            assert 1 <= generated == last.usage.completion_tokens < 240
            for call in queued:  # never admitted: cancelled with no tokens, still a normal end of the call
                rest = list(call)
                assert rest[-1].finish_reason == pb2.FINISH_REASON_CANCELLED
                assert rest[-1].usage.completion_tokens == 0 and rest[-1].usage.prompt_tokens == 4
            result = summary.result(30)
            assert result["in_flight"] == 3 and result["cancelled"] == 3
        assert (srv.engine.num_running, srv.engine.num_waiting, srv.engine.kv.used_slots) == (0, 0, 0)
    finally:
        srv.close()


def test_drain_lets_short_requests_finish(local_server):
    srv = local_server(EngineSettings(max_model_len=64, max_num_seqs=4))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb2_grpc.GenerationStub(channel)
            calls = [stub.GenerateStream(ids_request(12, first=5 + i), timeout=60) for i in range(3)]
            heads = [next(c) for c in calls]
            result = srv.run(drain(srv.server, srv.async_engine, srv.health, grace_seconds=30))
            for head, call in zip(heads, calls):
                messages = [head, *call]
                assert messages[-1].finish_reason == pb2.FINISH_REASON_LENGTH
                assert sum(len(m.token_ids) for m in messages) == 12
            assert result["in_flight"] == 3 and result["cancelled"] == 0
            assert result["seconds"] < 30
    finally:
        srv.close()


# --- SIGTERM to `moe-serve serve` ---------------------------------------------------------------------

GRACE_SECONDS = 25  # the in-flight streams need a few seconds; exit must come within this
STREAM_TOKENS = 100
START_TIMEOUT = 150  # Ray plus three actor processes on a busy two-core machine
TOKEN = "drain-test-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moe_serve(tiny_model, tmp_path):
    """`moe-serve serve` on the tiny model with one expert worker, on a free port; killed if still running."""
    port, http_port = free_port(), free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "MOE_SERVE_DRAIN_GRACE_SECONDS": str(GRACE_SECONDS),
           "MOE_SERVE_AUTH_TOKEN_FILE": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", tiny_model, "--port",
                                 str(port), "--http-port", str(http_port), "--workers", "1", "--address", "local"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    proc.port, proc.http_port, proc.log_path, proc.model = port, http_port, log_path, tiny_model
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
            proc.wait(30)


def log_tail(proc) -> str:
    return "\n".join(Path(proc.log_path).read_text(errors="replace").splitlines()[-40:])


@pytest.mark.cluster
def test_sigterm_drains_in_flight_streams_then_exits_0(moe_serve):
    """gRPC and OpenAI HTTP streams in flight at SIGTERM finish, new requests on both are refused as draining."""
    import openai

    target = f"127.0.0.1:{moe_serve.port}"
    started = time.monotonic()
    try:
        wait_until_serving(target, START_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"moe-serve did not start:\n{log_tail(moe_serve)}")
    print(f"\nmoe-serve SERVING after {time.monotonic() - started:.1f} s")
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        assert all(health(channel, s) == SERVING for s in [*SERVICES, "moeserve.v1.ClusterAdmin"])
        with pytest.raises(grpc.RpcError) as info:  # the router got the token from the controller
            stub.Generate(ids_request(2), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        calls = [stub.GenerateStream(ids_request(STREAM_TOKENS, first=5 + i), timeout=120, metadata=AUTH)
                 for i in range(3)]
        heads = [next(c) for c in calls]  # all three are generating
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{moe_serve.http_port}/v1", api_key=TOKEN, max_retries=0,
                             timeout=120)
        chat = http.chat.completions.create(model=Path(moe_serve.model).name,
                                            messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=STREAM_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chat_head = next(iter(chat))  # the HTTP stream is generating too (its first chunk names the role)
        assert chat_head.choices[0].delta.role == "assistant"

        moe_serve.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: all(health(channel, s) == NOT_SERVING
                             for s in [*SERVICES, "moeserve.v1.ClusterAdmin"]), 10, "NOT_SERVING")
        not_serving_after = time.monotonic() - signalled
        refused_as_draining(stub, AUTH)
        with pytest.raises(openai.APIStatusError) as refused:
            http.completions.create(model=Path(moe_serve.model).name, prompt="x", max_tokens=2)
        assert refused.value.status_code == 503 and "draining" in refused.value.body["message"]
        for head, call in zip(heads, calls):
            messages = [head, *call]  # raises if the stream fails
            assert messages[-1].finish_reason == pb2.FINISH_REASON_LENGTH, log_tail(moe_serve)
            assert sum(len(m.token_ids) for m in messages) == STREAM_TOKENS
        chat_chunks = list(chat)
        assert [c.choices[0].finish_reason for c in chat_chunks if c.choices][-1] == "length"
        assert chat_chunks[-1].usage.completion_tokens == STREAM_TOKENS
        streams_done_after = time.monotonic() - signalled
        assert streams_done_after < GRACE_SECONDS, "the streams outlived the grace period (not a drain test then)"
    try:
        rc = moe_serve.wait(GRACE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"moe-serve still running {GRACE_SECONDS + 30} s after SIGTERM:\n{log_tail(moe_serve)}")
    exited_after = time.monotonic() - signalled
    print(f"SIGTERM -> NOT_SERVING {not_serving_after:.2f} s, streams done {streams_done_after:.1f} s, "
          f"exit {exited_after:.1f} s (grace {GRACE_SECONDS} s)")
    assert rc == 0, log_tail(moe_serve)
    assert exited_after < GRACE_SECONDS, f"exit took {exited_after:.1f} s\n{log_tail(moe_serve)}"
    log = Path(moe_serve.log_path).read_text(errors="replace")
    assert "draining" in log and "'in_flight': 4, 'cancelled': 0" in log, log_tail(moe_serve)
