"""Front end: what the grpc.aio server costs the engine thread it shares a process (and the GIL) with.

The router runs its gRPC server on an asyncio loop and the engine on its own thread, in one process.
Every torch call releases the GIL, so Python work on the loop thread can hold the engine thread up
between two operations. This suite decodes the same greedy batch twice on one engine: offline
(`Engine.step` in a loop, nothing else in the process) and served (the same engine behind a real
grpc.aio server on loopback, `--batch` GenerateStream calls from a client in another process, so the
client's own Python does not share this GIL). Per decode step it takes the wall time and the engine
thread's CPU time (`time.thread_time`); wall minus CPU is the time the engine thread was ready but not
running: waiting for the GIL, or for a core. Rounds alternate offline and served.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import threading
import time

import torch

from cluster.bench.common import machine, median, print_table, resolve_model, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: --preset, built once and cached)")
    p.add_argument("--preset", default="deepseek-moe-mini")
    p.add_argument("--batch", type=int, default=32, help="sequences decoded at once (= gRPC streams)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--rounds", type=int, default=3, help="alternating offline / served rounds")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the engine")
    p.add_argument("--out", default="bench-results/frontend.json")


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def _client(port: int, prompts: list[list[int]], tokens: int, go, done) -> None:
    """In a child process: one GenerateStream per prompt, all at once, each time `go` is set."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from router_service.api import generation_pb2 as pb2
    from router_service.api import generation_pb2_grpc as pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.GenerationStub(channel)

        def one(ids: list[int]) -> int:
            request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids), sampling=pb2.SamplingParams(
                max_tokens=tokens, temperature=0, ignore_eos=True))
            return sum(len(m.token_ids) for m in stub.GenerateStream(request, timeout=900))

        with ThreadPoolExecutor(len(prompts)) as pool:
            while go.wait() and not done.is_set():
                go.clear()
                list(pool.map(one, prompts))
                done.set()


class _StepClock:
    """Wraps Engine.step (engine thread): wall and thread CPU seconds of each full-batch step."""

    def __init__(self, engine, batch: int):
        self.engine, self.batch, self.step = engine, batch, engine.step
        self.wall: list[float] = []
        self.cpu: list[float] = []
        engine.step = self

    def __call__(self):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = self.step()
        if self.engine.num_running >= self.batch:  # decode steps of the whole batch only
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.thread_time() - cpu)
        return out

    def take(self) -> tuple[float, float]:
        """Median wall and CPU seconds per step since the last take."""
        out = median(self.wall), median(self.cpu)
        self.wall, self.cpu = [], []
        return out


def run(args: argparse.Namespace) -> int:
    from router_service.async_engine import AsyncEngine
    from router_service.engine import EngineSettings, Request, load_engine
    from router_service.sampling import SamplingParams
    from router_service.server import start_server

    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    model_dir = resolve_model(args.model, args.preset)
    engine = load_engine(str(model_dir), EngineSettings(max_num_seqs=max(args.batch, 1)))
    prompts = _prompts(args.batch, args.prompt_len, engine.spec.vocab_size)
    clock = _StepClock(engine, args.batch)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    def offline() -> None:
        for i, ids in enumerate(prompts):
            engine.add_request(Request(request_id=f"offline-{time.monotonic_ns()}-{i}", prompt_ids=ids, params=params))
        while engine.num_running or engine.num_waiting:
            engine.step()

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="bench-grpc-loop", daemon=True)
    loop_thread.start()

    async def serve():
        served = AsyncEngine(engine, asyncio.get_running_loop())
        server, port, _ = await start_server(served, None, "127.0.0.1", 0, model_dir.name, str(model_dir))
        return served, server, port

    served, server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(120)
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    client = ctx.Process(target=_client, args=(port, prompts, args.tokens, go, done), daemon=True)
    client.start()
    rounds: dict[str, list[tuple[float, float]]] = {"offline": [], "served": []}
    try:
        offline()  # warm-up
        clock.take()
        for _ in range(args.rounds):
            offline()
            rounds["offline"].append(clock.take())
            done.clear()
            go.set()
            done.wait(900)
            rounds["served"].append(clock.take())
    finally:
        done.set()
        go.set()
        client.join(10)
        served.stop()
        asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        torch.set_num_threads(threads)
    result = {}
    rows = []
    for name, xs in rounds.items():
        wall, cpu = median([w for w, _ in xs]), median([c for _, c in xs])
        result[name] = {"step_ms": wall * 1e3, "engine_thread_cpu_ms": cpu * 1e3, "not_running_ms": (wall - cpu) * 1e3}
        rows.append([name, wall * 1e3, cpu * 1e3, (wall - cpu) * 1e3, 100 * (wall - cpu) / wall])
    print(f"\n{args.batch} sequences on {model_dir.name}, {args.tokens} tokens each, {args.torch_threads} torch "
          f"thread(s); per full-batch decode step, medians of {args.rounds} alternating rounds")
    table = print_table(["mode", "step ms", "engine thread CPU ms", "not running ms", "not running %"], rows)
    share = result["served"]["not_running_ms"] / result["served"]["step_ms"]
    print(f"served: the engine thread waited {result['served']['not_running_ms']:.1f} ms a step "
          f"({100 * share:.1f}%) for the GIL or a core")
    write_json(args.out, {"suite": "frontend", "model": str(model_dir), "machine": machine(), "batch": args.batch,
                          "tokens": args.tokens, "torch_threads": args.torch_threads, "result": result,
                          "served_not_running_share": share, "table": table})
    return 0
