"""Soak: many concurrent streams with random cancels and client deadlines against a real local server (no Ray).

24 clients (asyncio, one channel each) loop for a bounded time, each request with a random prompt (ids or
text), random sampling and length; about one in six is cancelled after a random number of messages and one
in six gets a short random deadline. Checked:

- every request that was neither cancelled nor past its deadline ends with LENGTH, EOS or STOP, with
  usage matching the tokens streamed, and no other error ever (the queue is sized not to overflow);
- afterwards the engine is idle: running == waiting == 0, no KV slot used, no stream left open;
- the process's resident memory returns to within RSS_BOUND_MB of its level after a warm-up.

Short form in CI (about 20 s). Longer soak, e.g. ten minutes:

    MOE_SERVE_SOAK_SECONDS=600 python -m pytest -s tests/router_service/test_soak.py

(`MOE_SERVE_SOAK_CLIENTS` changes the concurrency, `MOE_SERVE_SOAK_SEED` replays a run's random choices;
`-s` shows the figures: requests completed per finish reason, cancelled, deadlines, RSS before/after.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter

import grpc
import pytest

from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings

SECONDS = float(os.environ.get("MOE_SERVE_SOAK_SECONDS", "10"))
CLIENTS = int(os.environ.get("MOE_SERVE_SOAK_CLIENTS", "24"))
SEED = int(os.environ.get("MOE_SERVE_SOAK_SEED", str(random.randrange(2**31))))
WARMUP_SECONDS = 2.0
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 8
# Allocator noise only: glibc arenas and grpc buffers keep some freed memory. A leaked KV slot would not show
# here (the cache is preallocated) but is checked directly; leaked per-request state (token lists, queues,
# text streams, torch generators) over thousands of requests would exceed this bound.
RSS_BOUND_MB = 64
FINISHED = {pb2.FINISH_REASON_LENGTH: "length", pb2.FINISH_REASON_EOS: "eos", pb2.FINISH_REASON_STOP: "stop"}
TEXTS = ["Hello world, this is", "The capital of France is", "Once upon a time", "def main():", "1, 2, 3, 4,",
         "Ünïcödé and 中文 too", "a"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.fixture(scope="module")
def server(local_server):
    srv = local_server(EngineSettings(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                                      max_queue=4 * CLIENTS))
    yield srv
    srv.close()


def random_request(rng: random.Random) -> pb2.GenerateRequest:
    s = pb2.SamplingParams(max_tokens=rng.randint(1, 32), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        s.temperature = rng.choice([0.5, 0.8, 1.0, 1.5])
        s.top_k = rng.choice([0, 0, 5, 50])
        if rng.random() < 0.5:
            s.top_p = rng.choice([0.5, 0.9, 1.0])
        if rng.random() < 0.5:
            s.seed = rng.randrange(2**63)
    if rng.random() < 0.2:
        s.stop.extend(rng.sample(["the", "e", ",", " a", "zz"], rng.randint(1, 2)))
    if rng.random() < 0.1:
        s.stop_token_ids.extend([rng.randrange(129280) for _ in range(rng.randint(1, 3))])
    request = pb2.GenerateRequest(sampling=s, return_logprobs=rng.random() < 0.3)
    if rng.random() < 0.5:
        request.text = rng.choice(TEXTS)
    else:
        request.token_ids.ids.extend(rng.randrange(129280) for _ in range(rng.randint(1, 40)))
    return request


async def client(target: str, rng: random.Random, until: float, tally: Counter, failures: list) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        while time.monotonic() < until:
            request = random_request(rng)
            action = rng.choices(["complete", "cancel", "deadline"], [4, 1, 1])[0]
            timeout = rng.uniform(0.05, 1.5) if action == "deadline" else 120.0
            cancel_after = rng.randint(1, 8) if action == "cancel" else None
            call = stub.GenerateStream(request, timeout=timeout)
            messages = []
            try:
                async for msg in call:
                    messages.append(msg)
                    if cancel_after is not None and len(messages) >= cancel_after and not msg.finish_reason:
                        call.cancel()
                        break
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and action == "deadline":
                    tally["deadline exceeded"] += 1
                elif err.code() == grpc.StatusCode.CANCELLED and action == "cancel":
                    tally["cancelled"] += 1
                else:
                    failures.append(f"{err.code().name}: {err.details()} for {request}")
                continue
            if call.cancelled() or (cancel_after is not None and not (messages and messages[-1].finish_reason)):
                tally["cancelled"] += 1
                continue
            last = messages[-1] if messages else None
            if last is None or last.finish_reason not in FINISHED:
                failures.append(f"ended without a finish reason ({last}) for {request}")
                continue
            tokens = sum(len(m.token_ids) for m in messages)
            if tokens != last.usage.completion_tokens or not 1 <= tokens <= request.sampling.max_tokens:
                failures.append(f"{tokens} tokens streamed, usage {last.usage}, for {request}")
            if last.finish_reason == pb2.FINISH_REASON_LENGTH and tokens != request.sampling.max_tokens:
                failures.append(f"LENGTH after {tokens} of {request.sampling.max_tokens} tokens for {request}")
            tally[FINISHED[last.finish_reason]] += 1


async def soak(target: str, seconds: float, seed: int) -> tuple[Counter, list[str]]:
    tally, failures = Counter(), []
    until = time.monotonic() + seconds
    await asyncio.gather(*[client(target, random.Random(seed * 1000 + i), until, tally, failures)
                           for i in range(CLIENTS)])
    return tally, failures


def wait_idle(server, timeout: float = 10.0) -> None:
    engine, deadline = server.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (engine.num_running or engine.num_waiting or engine.kv.used_slots or server.async_engine.in_flight):
            return
        time.sleep(0.02)


def test_soak_concurrent_streams_with_cancels_and_deadlines(server):
    print(f"\nsoak: {CLIENTS} clients for {SECONDS:g} s after a {WARMUP_SECONDS:g} s warm-up, seed {SEED} "
          f"(MOE_SERVE_SOAK_SEED={SEED} replays it)")
    warm, warm_failures = asyncio.run(soak(server.target, WARMUP_SECONDS, SEED + 1))
    assert not warm_failures, warm_failures[:5]
    wait_idle(server)
    gc.collect()
    before = rss_mb()
    steps_before = server.engine.steps
    started = time.monotonic()
    tally, failures = asyncio.run(soak(server.target, SECONDS, SEED))
    elapsed = time.monotonic() - started
    wait_idle(server)
    gc.collect()
    after = rss_mb()
    engine = server.engine
    completed = sum(tally[r] for r in FINISHED.values())
    print(f"soak: {sum(tally.values())} requests in {elapsed:.1f} s: {completed} completed "
          f"({', '.join(f'{r} {tally[r]}' for r in FINISHED.values())}), {tally['cancelled']} cancelled, "
          f"{tally['deadline exceeded']} past their deadline; {engine.steps - steps_before} engine steps; "
          f"RSS {before:.1f} MB -> {after:.1f} MB ({after - before:+.1f} MB, bound {RSS_BOUND_MB} MB)")
    assert not failures, f"{len(failures)} failures, e.g. {failures[:5]}"
    assert completed >= CLIENTS and tally["cancelled"] and tally["deadline exceeded"], tally
    assert (engine.num_running, engine.num_waiting, engine.kv.used_slots) == (0, 0, 0)
    assert server.async_engine.in_flight == 0
    assert after - before < RSS_BOUND_MB, f"RSS grew {after - before:.1f} MB over the soak"
