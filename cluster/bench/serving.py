"""Serving: the cluster against the single-process engine and transformers, side by side in one run.

One checkpoint, the same random prompts, five figure groups:

1. throughput  decode tokens/s per batch size of the single-process engine (in this process), the
               cluster with the reference transport ("ray": one Ray actor call per worker per MoE
               layer), the cluster with the fast transport ("socket": raw tensor bytes over Unix
               sockets) and transformers generate(). A cluster gets B concurrent gRPC Generate
               requests (ignore_eos, fixed max_tokens). Decode rate as in `bench engine`: N-token run
               minus 1-token run. Each cluster is started once, measured at every batch size in rounds
               that alternate with the engine, and stopped; its ratio is to the engine's rounds taken
               alongside it. transformers alternates with the engine the same way.
               `--micro-batches 1,2` adds "cluster-socket-mb2": the fast-transport cluster once more,
               its router splitting each step into two micro-batches (EngineSettings.micro_batches),
               reported also as a ratio to cluster-socket (plain, and through each one's engine ratio).
2. latency     `--streams` concurrent GenerateStream calls on the fast-transport cluster, arriving
               `--stagger-ms` apart: time to first token and inter-token latency (p50, p99), taken
               client side from message arrival times.
3. dispatch    per MoE layer, what the dispatch adds next to its floor: a raw pipe round trip between
               this process and a child carrying one layer's dispatch at the breakdown batch
               (B x hidden values in the compute dtype out, the same back), measured while each cluster is up.
4. memory      peak RSS of this process (the engine; taken before transformers loads), the router and
               every expert worker of each cluster.
5. breakdown   where a decode step's time goes, as shares of the step (breakdown batch: 32 if
               measured, else the largest batch): the engine's StepProfile, and for each cluster the
               router's StepProfile plus the workers' compute, profiled in rounds that alternate with
               the engine's (the engine column is its twin next to cluster-socket).

Dispatch overhead, defined. Per MoE layer the router sends the routed tokens (profile section
`routed`), runs the shared experts (`shared_experts`) while the workers compute, then waits for the
replies (`routed` again). With R and S those sections' seconds per decode step and C the workers'
compute per step on the critical path (the slower worker: max over workers of its compute seconds
per step, from `ExpertWorker.stats()`), the layer could not finish before max(S, C) even with a free
data plane, so

    dispatch overhead per MoE layer = (R + S - max(S, C)) / MoE layers

and the routed compute exposed on the router's step is max(0, C - S). A worker's compute always lies
inside its layer's R + S window, so this is never negative; except with two micro-batches, where the
compute also hides behind the other micro-batch's attention and gate, and a negative figure says so.
The workers' counters are cumulative, so C is the max of per-step totals, not the sum over layers of
each layer's slower worker: a layer's straggler (routing imbalance, a worker descheduled on a busy
machine) therefore counts as overhead here, as it is a cost of distributing the layer, though not of
moving the bytes.
Client side, without any profile: (cluster step time - engine step time) / MoE layers, where a step
time is batch / tokens per second at the breakdown batch. Direct: the same transport class driven from
this process against the cluster's workers (one message of B rows per worker, then the replies), the
workers' compute subtracted; next to the router's figure it tells the data plane's own cost from what
the router process adds around it.

Decode "per step" figures subtract a 1-token run from an N-token run (profile seconds, worker
compute, steps and wall time alike), so prefill drops out as it does from the tokens/s.

The router's profile comes from `Router.profile`, peak RSS from every actor's `stats()`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cluster.bench.common import (machine, median, peak_rss_bytes, percentile, print_table, resolve_model, timed,
                                  write_json)
from cluster.bench.engine import _engine_runner, _reference_runner, decode_rate

SYSTEMS = ("engine", "cluster-ray", "cluster-socket", "transformers")  # --micro-batches 2 adds cluster-socket-mb2
# Step-time categories, in stacking order; StepProfile section names map onto them in _categories.
CATEGORIES = ("scheduling", "attention", "dense MLP", "gate", "shared experts", "routed compute",
              "routed dispatch", "LM head", "sampling", "detokenize", "other")
RPC_TIMEOUT = 900.0

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: --preset, built once and cached)")
    p.add_argument("--preset", default="deepseek-moe-mini")
    p.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per sequence (and per stream)")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    p.add_argument("--workers", type=int, default=2, help="expert workers per cluster")
    p.add_argument("--streams", type=int, default=16, help="concurrent gRPC streams for the latency figure")
    p.add_argument("--stagger-ms", type=float, default=50.0, help="gap between stream arrivals")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of the engine and transformers (this process) and of the router (default 1: "
                        "on a small shared machine, threads beyond the free cores make OpenMP wait on descheduled "
                        "threads and the figures swing tenfold); expert workers keep the cluster's default")
    p.add_argument("--router-threads", type=int, default=None,
                   help="torch threads of the router (default: --torch-threads). At equal cores the engine takes "
                        "every CPU and the cluster's processes share the same ones: e.g. --torch-threads 2 "
                        "--router-threads 2 on 2 CPUs (a cluster's routers default to every CPU of the node)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--micro-batches", default="1", type=_micro_batches,
                   help="comma-separated engine micro_batches values for the fast-transport cluster; 1 "
                        "(cluster-socket) always runs, 2 adds a cluster-socket-mb2 column: two-micro-batch overlap "
                        "(e.g. 1,2)")
    p.add_argument("--out-dir", default="bench-results", help="where serving.json and the PNG plots go")


def _micro_batches(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()} | {1})
    if not set(values) <= {1, 2}:
        raise argparse.ArgumentTypeError(f"--micro-batches takes 1 and/or 2, got {text!r}")
    return values


def _clusters(micro_batches: list[int]) -> dict[str, tuple[str, int]]:
    """The cluster systems of a run: name -> (transport, engine micro_batches)."""
    out = {"cluster-ray": ("ray", 1), "cluster-socket": ("socket", 1)}
    out.update({f"cluster-socket-mb{mb}": ("socket", mb) for mb in micro_batches if mb != 1})
    return out


def _systems(clusters: dict) -> list[str]:
    """Every system of a run in column order: the engine, the clusters, transformers."""
    return [SYSTEMS[0], *clusters, SYSTEMS[-1]]


def _label(system: str) -> str:
    """A cluster's short name in the dispatch table and JSON: its transport, plus -mbN where it splits steps."""
    return system.removeprefix("cluster-")


# --- runners ----------------------------------------------------------------------------------------


def _greedy_request(ids: list[int], max_tokens: int):
    from router_service.api import generation_pb2 as pb2

    return pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                               sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _cluster_runner(stub, prompts: list[list[int]]):
    """B concurrent unary Generate calls (grpc futures), all sent before any is awaited."""

    def run(n: int) -> None:
        futures = [stub.Generate.future(_greedy_request(ids, n), timeout=RPC_TIMEOUT) for ids in prompts]
        for f in futures:
            got = f.result().usage.completion_tokens
            if got != n:
                raise RuntimeError(f"cluster returned {got} tokens, asked for {n}")

    return run


def _alternate(runners: dict, batch: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Warm each runner up, then `rounds` rounds of decode_rate, the runners taking turns within a round."""
    for run in runners.values():
        run(2)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            rates[name].append(decode_rate(run, batch, tokens))
    return rates


# --- step profiles ----------------------------------------------------------------------------------


class _EngineProbe:
    """Profile of the single-process engine in this process."""

    hook = "in process"

    def __init__(self, engine):
        self.profile = engine.model.profile

    def reset(self, enable: bool) -> None:
        self.profile.reset(enable)

    def read(self) -> dict:
        return {"seconds": dict(self.profile.seconds), "steps": self.profile.steps, "workers": []}


class _ClusterProbe:
    """The router's profile (`Router.profile`) and the workers' cumulative compute."""

    hook = "Router.profile"

    def __init__(self, router, workers: dict):
        import ray

        self.ray, self.router, self.workers = ray, router, workers

    def _profile(self, enable):
        return self.ray.get(self.router.profile.remote(enable), timeout=RPC_TIMEOUT)

    def reset(self, enable: bool) -> None:
        self._profile(enable)

    def read(self) -> dict:
        out = self._profile(None)
        stats = self.ray.get([w.stats.remote() for w in self.workers.values()], timeout=RPC_TIMEOUT)
        out["workers"] = [(s["compute_seconds"], s["calls"]) for s in stats]
        return out


def _profiled_round(run, probe, tokens: int) -> dict | None:
    """Seconds per decode step by profile section, wall time and worker compute: N-token minus 1-token run."""
    one, many = {}, {}
    for n, into in ((1, one), (tokens, many)):
        probe.reset(True)
        before = probe.read()["workers"]
        into["wall"] = timed(lambda: run(n))
        after = probe.read()
        into.update(after)
        into["workers"] = [(c1 - c0, k1 - k0) for (c0, k0), (c1, k1) in zip(before, after["workers"])]
    probe.reset(False)
    steps = many["steps"] - one["steps"]
    if steps <= 0:
        return None
    names = set(one["seconds"]) | set(many["seconds"])
    return {
        "decode_steps": steps,
        "step_seconds": (many["wall"] - one["wall"]) / steps,
        "sections": {k: (many["seconds"].get(k, 0.0) - one["seconds"].get(k, 0.0)) / steps for k in names},
        "worker_compute_seconds": [(cm - c1) / steps for (c1, _), (cm, _) in zip(one["workers"], many["workers"])],
        "worker_calls": [(km - k1) / steps for (_, k1), (_, km) in zip(one["workers"], many["workers"])],
    }


def _profiled_steps(systems: dict, tokens: int, rounds: int) -> dict[str, dict]:
    """{name: (run, probe)} profiled in alternating rounds; per name, the round with the median step time
    (each round is one consistent set of sections)."""
    sets: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, (run, probe) in systems.items():
            if (got := _profiled_round(run, probe, tokens)) is not None:
                sets[name].append(got)
    for name, got in sets.items():
        if not got:
            raise RuntimeError(f"{name}: no decode steps between the 1-token and the N-token runs; raise --tokens")
    return {name: sorted(got, key=lambda s: s["step_seconds"])[len(got) // 2] for name, got in sets.items()}


def _routed_seconds(sections: dict[str, float]) -> float:
    """`routed` (send + wait), or its parts should the profile ever split it (e.g. routed_send, routed_wait)."""
    return sum(v for k, v in sections.items() if k.startswith("routed"))


def _categories(prof: dict) -> dict[str, float]:
    """Seconds per step by category; for a cluster, `routed` splits into exposed compute and dispatch."""
    sec = dict(prof["sections"])
    # Sections are differences of two runs (N tokens minus 1): on a noisy machine a short one can come out
    # below zero, which is no time spent, not negative time.
    R, S = max(0.0, _routed_seconds(sec)), max(0.0, sec.get("shared_experts", 0.0))
    sec = {k: v for k, v in sec.items() if not k.startswith("routed")}
    if prof["worker_compute_seconds"]:
        C = max(prof["worker_compute_seconds"])
        exposed = min(R, max(0.0, C - S))
        compute, dispatch = exposed, R - exposed  # R - exposed == R + S - max(S, C), clipped at R >= 0
    else:
        compute, dispatch = R, 0.0  # local experts: `routed` is the routed compute itself
    names = {"scheduling": "scheduling", "attention": "attention", "dense_mlp": "dense MLP", "gate": "gate",
             "shared_experts": "shared experts", "lm_head": "LM head", "sampling": "sampling",
             "detokenize": "detokenize"}
    out = {c: 0.0 for c in CATEGORIES}
    out["routed compute"], out["routed dispatch"] = compute, dispatch
    for k, v in sec.items():
        out[names.get(k, "other")] += max(v, 0.0)
    out["other"] += max(0.0, prof["step_seconds"] - sum(out.values()))
    return out


def _breakdown_record(prof: dict) -> dict:
    cats = _categories(prof)
    total = sum(cats.values()) or 1.0
    return {"step_ms": prof["step_seconds"] * 1e3, "decode_steps": prof["decode_steps"],
            "ms_per_step": {k: v * 1e3 for k, v in cats.items()}, "shares": {k: v / total for k, v in cats.items()},
            "profile_sections_ms": {k: v * 1e3 for k, v in sorted(prof["sections"].items())},
            "worker_compute_ms_per_step": [c * 1e3 for c in prof["worker_compute_seconds"]],
            "worker_calls_per_step": prof["worker_calls"]}


def _dispatch_record(prof: dict, moe_layers: int, floor_s: float) -> dict:
    sec = prof["sections"]
    R, S = _routed_seconds(sec), sec.get("shared_experts", 0.0)
    C = max(prof["worker_compute_seconds"])
    overhead = (R + S - max(S, C)) / moe_layers
    us = lambda s: s / moe_layers * 1e6  # noqa: E731 seconds per step -> us per MoE layer
    return {"routed_us": us(R), "shared_experts_us": us(S), "worker_compute_us": us(C),
            "overhead_us": overhead * 1e6, "floor_us": floor_s * 1e6, "overhead_over_floor": overhead / floor_s}


# --- the pipe floor ---------------------------------------------------------------------------------

_ECHO = """\
import os, sys
n = int(sys.argv[1])
while True:
    buf = bytearray()
    while len(buf) < n:
        b = os.read(0, n - len(buf))
        if not b:
            sys.exit(0)
        buf += b
    view = memoryview(buf)
    while view:
        view = view[os.write(1, view):]
"""


def pipe_round_trip(nbytes: int, reps: int = 400) -> float:
    """Median seconds of a round trip of `nbytes` through OS pipes to a child process and back."""
    child = subprocess.Popen([sys.executable, "-c", _ECHO, str(nbytes)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)
    payload = memoryview(os.urandom(nbytes))
    back = bytearray(nbytes)
    out_fd, in_file = child.stdin.fileno(), child.stdout

    def once():
        view = payload
        while view:
            view = view[os.write(out_fd, view):]
        got, into = 0, memoryview(back)
        while got < nbytes:
            k = in_file.readinto(into[got:])
            if not k:
                raise RuntimeError("pipe echo child exited")
            got += k

    try:
        for _ in range(20):
            once()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        if bytes(back) != bytes(payload):
            raise RuntimeError("pipe echo returned different bytes")
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()
    return median(times)


def direct_round_trip(transport_name: str, workers: dict, batch: int, hidden_size: int, dtype: torch.dtype,
                      reps: int = 200) -> dict:
    """The data plane alone, from this process: one layer-like round (a message to every worker, then every
    reply) of `batch` rows each, through a fresh transport of the router's kind. Each row goes to one
    hosted expert, so compute is small; it is subtracted (the slower worker's mean compute per call)."""
    import ray

    from router_service.transports import make_transport

    infos = ray.get([h.info.remote() for h in workers.values()], timeout=RPC_TIMEOUT)
    handles = {i["worker_id"]: h for i, h in zip(infos, workers.values())}
    targets = {}
    for i in infos:
        layer = min(i["hosted"])
        targets[i["worker_id"]] = (layer, i["hosted"][layer][0])
    transport = make_transport(transport_name)  # host-memory tensors, as this process makes them
    transport.connect(handles)
    hidden = torch.randn(batch, hidden_size).to(dtype)
    token, weight = torch.arange(batch), torch.ones(batch, dtype=dtype)

    def layer_round():
        sent = [transport.submit(w, layer, hidden, token, torch.full((batch,), e), weight)
                for w, (layer, e) in targets.items()]
        for out in transport.collect(sent):
            if out.shape != hidden.shape:
                raise RuntimeError(f"worker returned {tuple(out.shape)}, sent {tuple(hidden.shape)}")

    stats = lambda: ray.get([h.stats.remote() for h in handles.values()], timeout=RPC_TIMEOUT)  # noqa: E731
    try:
        for _ in range(10):
            layer_round()
        before = stats()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            layer_round()
            times.append(time.perf_counter() - start)
        after = stats()
    finally:
        transport.close()
    compute = max((a["compute_seconds"] - b["compute_seconds"]) / max(1, a["calls"] - b["calls"])
                  for a, b in zip(after, before))
    rtt = median(times)
    return {"direct_round_trip_us": rtt * 1e6, "direct_compute_us": compute * 1e6,
            "direct_overhead_us": (rtt - compute) * 1e6}


# --- latency under concurrent streams ---------------------------------------------------------------


def grpc_stream(stub):
    """One greedy GenerateStream: yields the number of tokens in each message that has some."""

    def stream(ids: list[int], tokens: int):
        for msg in stub.GenerateStream(_greedy_request(ids, tokens), timeout=RPC_TIMEOUT):
            if msg.token_ids:
                yield len(msg.token_ids)

    return stream


def http_stream(base_url: str):
    """One greedy streamed completion through the OpenAI API with the official client: yields 1 per chunk that
    carries a token (each decode step streams one chunk per sequence), checking the count against usage."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=RPC_TIMEOUT)
    model = client.models.list().data[0].id  # once: inside a stream it would count in its time to first token

    def stream(ids: list[int], tokens: int):
        chunks = client.completions.create(model=model, prompt=ids, max_tokens=tokens,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for chunk in chunks:
            if chunk.choices:
                yield 1
            elif chunk.usage.completion_tokens != tokens:
                raise RuntimeError(f"an HTTP stream generated {chunk.usage.completion_tokens} tokens, asked {tokens}")

    return stream


def stream_latency(stream, prompts: list[list[int]], tokens: int, stagger_s: float) -> dict:
    """Each prompt its own stream (grpc_stream or http_stream), the i-th sent i * stagger_s after the first;
    times client side."""
    records: list = [None] * len(prompts)
    start = time.perf_counter() + 0.05

    def one(i: int) -> None:
        time.sleep(max(0.0, start + i * stagger_s - time.perf_counter()))
        sent = time.perf_counter()
        arrivals = [(time.perf_counter(), n) for n in stream(prompts[i], tokens)]
        records[i] = (sent, arrivals)

    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, range(len(prompts))))
    ttft, itl = [], []
    for sent, arrivals in records:
        if sum(n for _, n in arrivals) != tokens:
            raise RuntimeError(f"a stream returned {sum(n for _, n in arrivals)} tokens, asked for {tokens}")
        ttft.append(arrivals[0][0] - sent)
        itl += [(t - prev) / n for (prev, _), (t, n) in zip(arrivals, arrivals[1:])]
    pct = lambda xs: {"p50": percentile(xs, 50) * 1e3, "p99": percentile(xs, 99) * 1e3,  # noqa: E731
                      "mean": sum(xs) / len(xs) * 1e3}
    return {"ttft_ms": pct(ttft), "itl_ms": pct(itl), "itl_samples": len(itl)}


def _protocol_latency(cluster, prompts: list[list[int]], args) -> dict:
    """TTFT and ITL over gRPC and over the OpenAI HTTP API on the same router, in alternating rounds (samples
    pooled per protocol), so that both see the same machine."""
    streams = {"grpc": grpc_stream(cluster.stub), "http": http_stream(cluster.http_url)}
    for stream in streams.values():  # warm-up: connections, and the HTTP client's first request
        list(stream(prompts[0], 2))
    rounds: dict[str, list[dict]] = {p: [] for p in streams}
    for _ in range(max(args.rounds - 1, 1)):
        for protocol, stream in streams.items():
            rounds[protocol].append(stream_latency(stream, prompts, args.tokens, args.stagger_ms / 1e3))
    out = {}
    for protocol, runs in rounds.items():
        pooled = {key: {stat: median([r[key][stat] for r in runs]) for stat in ("p50", "p99", "mean")}
                  for key in ("ttft_ms", "itl_ms")}
        out[protocol] = {**pooled, "itl_samples": sum(r["itl_samples"] for r in runs), "rounds": len(runs)}
    return out


# --- a cluster's life -------------------------------------------------------------------------------


class _Cluster:
    """Start a cluster for one transport; stop it (always) on exit. Ray must be initialised."""

    def __init__(self, model_dir: Path, transport: str, workers: int, engine_settings, router_threads: int):
        from cluster.settings import ClusterSettings

        fields = dict(model=str(model_dir), num_workers=workers, port=0, http_port=0, engine=engine_settings,
                      transport=transport, router_torch_threads=router_threads)
        known = ClusterSettings.model_fields
        # A benchmark measures one fixed placement: no rebalancing or autoscaling mid-run.
        if "rebalance_below_balancedness" in known:
            fields["rebalance_below_balancedness"] = None
        self.settings = ClusterSettings(**fields)
        self.transport = transport

    def __enter__(self) -> "_Cluster":
        import grpc
        import ray

        from cluster.client import wait_until_serving
        from cluster.controller import start_cluster
        from cluster.settings import CONTROLLER_NAME, NAMESPACE
        from router_service.api import generation_pb2_grpc as pb2_grpc

        try:
            ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            raise RuntimeError(f"a cluster controller {CONTROLLER_NAME!r} is already running in namespace "
                               f"{NAMESPACE!r}; stop it before benchmarking")
        except ValueError:
            pass  # none: good
        started = time.perf_counter()
        self.controller, ports = start_cluster(self.settings)
        try:
            self.target = f"127.0.0.1:{ports[0]}"
            wait_until_serving(self.target, timeout=120)
            self.channel = grpc.insecure_channel(self.target)
            self.stub = pb2_grpc.GenerationStub(self.channel)
            self.router = ray.get_actor("router-0", namespace=NAMESPACE)
            self.http_url = f"http://127.0.0.1:{ray.get(self.controller.endpoints.remote())[0]['http']}/v1"
            names = sorted((a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["namespace"] == NAMESPACE and a["name"].startswith("expert-worker-")),
                           key=lambda n: int(n.rsplit("-", 1)[1]))
            self.workers = {n: ray.get_actor(n, namespace=NAMESPACE) for n in names}
        except BaseException:
            self._stop()
            raise
        print(f"cluster up ({self.transport} transport, {len(self.workers)} workers) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        return self

    def peak_rss(self) -> dict[str, int]:
        """Peak RSS of the router and each worker, from their stats()."""
        import ray

        return {name: ray.get(h.stats.remote(), timeout=RPC_TIMEOUT)["max_rss_bytes"]
                for name, h in {"router-0": self.router, **self.workers}.items()}

    def _stop(self) -> None:
        from cluster.controller import stop_cluster

        if getattr(self, "channel", None) is not None:
            self.channel.close()
        stop_cluster(self.controller)

    def __exit__(self, *exc) -> None:
        self._stop()


# --- the run ----------------------------------------------------------------------------------------


def router_threads(args: argparse.Namespace) -> int:
    return args.torch_threads if args.router_threads is None else args.router_threads


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import ray

    from router_service.engine import EngineSettings, load_engine

    model_dir = resolve_model(args.model, args.preset)
    batches = [int(b) for b in args.batch.split(",")]
    bd_batch = 32 if 32 in batches else max(batches)
    out_dir = Path(args.out_dir)
    settings = EngineSettings(max_num_seqs=max(max(batches), args.streams),
                              max_model_len=args.prompt_len + args.tokens + 1)
    engine = load_engine(model_dir, settings)
    spec = engine.spec
    moe_layers = len(spec.moe_layers)
    # One layer's dispatch as the router sends it: B rows of hidden states in the compute dtype.
    payload = bd_batch * spec.hidden_size * engine.model.dtype.itemsize
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, spec.vocab_size, (b, args.prompt_len), generator=gen).tolist() for b in batches}
    stream_prompts = torch.randint(0, spec.vocab_size, (args.streams, args.prompt_len), generator=gen).tolist()
    engine_runs = {b: _engine_runner(engine, prompts[b]) for b in batches}
    for b in batches:
        engine_runs[b](2)
    print(f"model {model_dir.name} ({spec.model_type}): hidden {spec.hidden_size}, {moe_layers} MoE layers; "
          f"batches {batches}, {args.prompt_len}-token prompts, {args.tokens} tokens each", flush=True)

    clusters = _clusters(args.micro_batches)
    systems = _systems(clusters)
    rates: dict[str, dict[int, list[float]]] = {s: {} for s in systems}  # system -> batch -> rounds
    engine_alongside: dict[str, dict[int, list[float]]] = {s: {} for s in systems}  # the engine's rounds next to s
    breakdown: dict[str, dict] = {}
    engine_profs: dict[str, dict] = {}  # the engine's profiled step next to each cluster's
    dispatch: dict[str, dict] = {}
    memory: list[dict] = []

    memory.append({"process": "bench (single-process engine)", "peak_rss_bytes": peak_rss_bytes()})

    started_ray = not ray.is_initialized()
    if started_ray:
        from cluster.settings import NAMESPACE

        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    latency = None
    try:
        for system, (transport, micro_batches) in clusters.items():
            cluster_settings = settings.model_copy(update={"micro_batches": micro_batches})
            with _Cluster(model_dir, transport, args.workers, cluster_settings, router_threads(args)) as cluster:
                for b in batches:
                    r = _alternate({"engine": engine_runs[b], system: _cluster_runner(cluster.stub, prompts[b])},
                                   b, args.tokens, args.rounds)
                    rates[system][b], engine_alongside[system][b] = r[system], r["engine"]
                    print(f"batch {b}: {system} {median(r[system]):.1f} tok/s, engine {median(r['engine']):.1f} "
                          f"tok/s", flush=True)
                probe = _ClusterProbe(cluster.router, cluster.workers)
                profs = _profiled_steps({"engine": (engine_runs[bd_batch], _EngineProbe(engine)),
                                         system: (_cluster_runner(cluster.stub, prompts[bd_batch]), probe)},
                                        args.tokens, args.rounds)
                prof, engine_profs[system] = profs[system], profs["engine"]
                breakdown[system] = {**_breakdown_record(prof), "router_profile_via": probe.hook,
                                     "engine_alongside": _breakdown_record(profs["engine"])}
                floor = pipe_round_trip(payload)
                dispatch[system] = {**_dispatch_record(prof, moe_layers, floor), "payload_bytes": payload}
                direct = direct_round_trip(transport, cluster.workers, bd_batch, spec.hidden_size, engine.model.dtype)
                direct["direct_over_floor"] = direct["direct_overhead_us"] / dispatch[system]["floor_us"]
                dispatch[system].update(direct)
                step = lambda rs: bd_batch / median(rs)  # noqa: E731 seconds per decode step
                client = (step(rates[system][bd_batch]) - step(engine_alongside[system][bd_batch])) / moe_layers
                dispatch[system]["client_side_overhead_us"] = client * 1e6
                dispatch[system]["client_side_over_floor"] = client / floor
                if system == "cluster-socket":
                    latency = _protocol_latency(cluster, stream_prompts, args)
                split = "" if micro_batches == 1 else f", {micro_batches} micro-batches"
                for name, rss in cluster.peak_rss().items():
                    memory.append({"process": f"{name} ({transport} transport{split})", "peak_rss_bytes": rss})
    finally:
        if started_ray:
            ray.shutdown()

    # The engine's column: its profile taken next to the fast-transport cluster (each cluster keeps its own twin).
    breakdown = {"engine": _breakdown_record(engine_profs.get("cluster-socket") or next(iter(engine_profs.values()))),
                 **breakdown}
    if not args.no_reference:
        from cluster.reference import load_reference

        reference = load_reference(model_dir, engine.model.dtype)
        for b in batches:
            r = _alternate({"engine": engine_runs[b], "transformers": _reference_runner(reference, prompts[b])},
                           b, args.tokens, args.rounds)
            rates["transformers"][b], engine_alongside["transformers"][b] = r["transformers"], r["engine"]
            print(f"batch {b}: transformers {median(r['transformers']):.1f} tok/s, engine "
                  f"{median(r['engine']):.1f} tok/s", flush=True)
        memory.append({"process": "bench (engine + transformers loaded)", "peak_rss_bytes": peak_rss_bytes()})
    for b in batches:  # the engine's figure: every round it ran, next to whichever system
        rates["engine"][b] = [x for s in systems for x in engine_alongside[s].get(b, [])]

    record = _report(args, model_dir, spec, systems, batches, bd_batch, rates, engine_alongside, latency, dispatch,
                     memory, breakdown)
    out_dir.mkdir(parents=True, exist_ok=True)
    record["plots"] = [str(_plot_throughput(record, out_dir / "serving-throughput.png")),
                       str(_plot_breakdown(record, out_dir / "serving-breakdown.png"))]
    write_json(out_dir / "serving.json", record)
    return 0


# --- report -----------------------------------------------------------------------------------------


def _report(args, model_dir, spec, systems, batches, bd_batch, rates, engine_alongside, latency, dispatch, memory,
            breakdown) -> dict:
    tables = {}
    moe_layers = len(spec.moe_layers)
    from cluster.settings import ClusterSettings
    from expert_workers.worker import threads_for_cpus

    defaults = ClusterSettings()
    worker_threads = defaults.torch_threads or threads_for_cpus(defaults.worker_num_cpus)

    throughput = []
    for b in batches:
        row = {"batch": b, "tokens_per_s": {}, "ratio_to_engine": {}, "rounds": {}}
        for s in systems:
            if b not in rates[s]:
                continue
            row["tokens_per_s"][s] = median(rates[s][b])
            row["rounds"][s] = rates[s][b]
            if s != "engine":
                row["ratio_to_engine"][s] = median(rates[s][b]) / median(engine_alongside[s][b])
        # Two-micro-batch overlap against the same transport unsplit. The two clusters cannot be up at once, so
        # besides the plain ratio of their medians, each relative to the engine rounds taken alongside it.
        row["overlap"] = {s: {"over_cluster_socket": row["tokens_per_s"][s] / row["tokens_per_s"]["cluster-socket"],
                              "over_cluster_socket_engine_normalised":
                                  row["ratio_to_engine"][s] / row["ratio_to_engine"]["cluster-socket"]}
                          for s in systems if s.startswith("cluster-socket-mb") and s in row["tokens_per_s"]}
        throughput.append(row)
    print(f"\n1. decode tokens/s on {model_dir.name} ({spec.model_type}), {args.prompt_len}-token prompts, "
          f"{args.tokens} tokens each; ratio = system / engine rounds taken alongside it\n"
          f"   torch threads: engine and transformers {args.torch_threads}, router {router_threads(args)}, each of "
          f"{args.workers} expert workers {worker_threads} ({os.cpu_count()} CPUs)")
    cell = lambda row, s: (f"{row['tokens_per_s'][s]:.1f}" if s in row["tokens_per_s"] else "-")  # noqa: E731
    ratio = lambda row, s: (f"{row['ratio_to_engine'][s]:.2f}x" if s in row["ratio_to_engine"] else "-")  # noqa: E731
    others = systems[1:]
    tables["throughput"] = print_table(
        ["batch", "engine", *[h for s in others for h in (s, "x engine")]],
        [[r["batch"], cell(r, "engine"), *[c for s in others for c in (cell(r, s), ratio(r, s))]] for r in throughput])
    for r in throughput:
        for s, o in r["overlap"].items():
            print(f"   batch {r['batch']}: {s} / cluster-socket = {o['over_cluster_socket']:.2f}x "
                  f"({o['over_cluster_socket_engine_normalised']:.2f}x as ratios to the engine alongside each)")
    cpus = os.cpu_count() or 1
    if args.torch_threads < cpus:
        print(f"   note: the engine computes on {args.torch_threads} of {cpus} CPUs while the cluster's router and "
              f"workers can use all of them: a ratio above 1 partly reflects parallelism the engine was not given "
              f"(--torch-threads {cpus} --router-threads {cpus} compares at equal cores)")

    print(f"\n2. latency: {args.streams} concurrent streams on cluster-socket, arriving {args.stagger_ms:g} ms apart, "
          f"{args.tokens} tokens each (client side): gRPC GenerateStream against streamed /v1/completions with the "
          f"openai client, alternating rounds (median of {latency['grpc']['rounds']} each)")
    rows = []
    for metric, key in (("time to first token", "ttft_ms"), ("inter-token latency", "itl_ms")):
        g, h = latency["grpc"][key], latency["http"][key]
        rows.append([metric, g["p50"], g["p99"], h["p50"], h["p99"], f"{h['p50'] / g['p50']:.2f}x",
                     f"{h['p99'] / g['p99']:.2f}x"])
    tables["latency"] = print_table(["metric", "gRPC p50 ms", "gRPC p99 ms", "HTTP p50 ms", "HTTP p99 ms",
                                     "HTTP/gRPC p50", "HTTP/gRPC p99"], rows)

    payload = next(iter(dispatch.values()))["payload_bytes"] if dispatch else 0
    print(f"\n3. dispatch per MoE layer at batch {bd_batch} ({moe_layers} MoE layers); floor: pipe round trip of "
          f"{payload} bytes each way to a child process. overhead = routed + shared - max(shared, worker compute)")
    print("   in the router: from its step profile and the workers' compute; direct: the same transport driven from "
          "this process, one message per worker, compute subtracted; client side: (cluster - engine step) / layers")
    tables["dispatch"] = print_table(
        ["transport", "routed us", "shared us", "worker compute us", "overhead us", "pipe floor us", "overhead/floor",
         "direct us", "direct/floor", "client-side us", "client/floor"],
        [[_label(s), d["routed_us"], d["shared_experts_us"], d["worker_compute_us"], d["overhead_us"],
          d["floor_us"], f"{d['overhead_over_floor']:.1f}x", d["direct_overhead_us"], f"{d['direct_over_floor']:.1f}x",
          d["client_side_overhead_us"], f"{d['client_side_over_floor']:.1f}x"] for s, d in dispatch.items()])

    print("\n4. peak memory (RSS) per process")
    tables["memory"] = print_table(["process", "peak RSS MiB"],
                                   [[m["process"], m["peak_rss_bytes"] / 2**20] for m in memory])

    bd_systems = [s for s in systems if s in breakdown]
    print(f"\n5. where a decode step goes at batch {bd_batch}: share of the step (ms per step in the last row)")
    tables["breakdown"] = print_table(
        ["category", *bd_systems],
        [[c, *[f"{breakdown[s]['shares'][c] * 100:.1f}%" for s in bd_systems]] for c in CATEGORIES]
        + [["step ms", *[breakdown[s]["step_ms"] for s in bd_systems]],
           ["engine step ms alongside", "", *[breakdown[s]["engine_alongside"]["step_ms"] for s in bd_systems[1:]]]])

    targets = _targets(throughput, bd_batch, dispatch, breakdown)
    print("\ntargets (not asserted):")
    for t in targets:
        print(f"  {t['text']}")
    return {"suite": "serving", "model": str(model_dir), "model_type": spec.model_type, "machine": machine(),
            "systems": systems,
            "settings": {"batches": batches, "breakdown_batch": bd_batch, "prompt_len": args.prompt_len,
                         "tokens": args.tokens, "rounds": args.rounds, "workers": args.workers,
                         "streams": args.streams, "stagger_ms": args.stagger_ms, "torch_threads": args.torch_threads,
                         "router_threads": router_threads(args),
                         "worker_torch_threads": worker_threads, "micro_batches": args.micro_batches,
                         "hidden_size": spec.hidden_size,
                         "moe_layers": moe_layers},
            "throughput": {"unit": "decode tokens/s", "results": throughput},
            "latency": {"transport": "socket", "streams": args.streams, "stagger_ms": args.stagger_ms,
                        "tokens": args.tokens, **latency},
            "dispatch": {"batch": bd_batch, "moe_layers": moe_layers, "payload_bytes": payload,
                         "transports": {_label(s): d for s, d in dispatch.items()}},
            "memory": {"processes": memory},
            "breakdown": {"batch": bd_batch, "categories": list(CATEGORIES), "systems": breakdown},
            "targets": targets, "tables": tables}


def _targets(throughput, bd_batch, dispatch, breakdown) -> list[dict]:
    row = next(r for r in throughput if r["batch"] == bd_batch)
    out = []

    def add(name, value, goal, met, text, blocker=None):
        out.append({"target": name, "value": value, "goal": goal, "met": met,
                    "text": text + ("" if met else f": NOT MET. {blocker}" if blocker else ": NOT MET"),
                    "blocker": None if met else blocker})

    if "cluster-socket" in row["ratio_to_engine"]:
        v = row["ratio_to_engine"]["cluster-socket"]
        cl = breakdown["cluster-socket"]
        e, c = cl["engine_alongside"]["ms_per_step"], cl["ms_per_step"]
        extra = sorted(((c[k] - e[k], k) for k in CATEGORIES), reverse=True)[:3]
        blocker = ("Profiled side by side, ms per step over the engine, largest first: "
                   + ", ".join(f"{k} {d:+.1f}" for d, k in extra)
                   + f" (step {cl['step_ms']:.1f} vs {cl['engine_alongside']['step_ms']:.1f} ms)")
        add("cluster-socket >= 0.9x engine", v, 0.9, v >= 0.9,
            f"cluster-socket at batch {bd_batch}: {v:.2f}x the engine (target >= 0.9x)" + ("" if v < 0.9 else ": met"),
            blocker)
    if "cluster-socket" in dispatch:
        d = dispatch["cluster-socket"]
        v = d["overhead_over_floor"]
        share = min(1.0, max(0.0, d["direct_overhead_us"] / d["overhead_us"]))
        blocker = (f"Per MoE layer the router spends {d['routed_us']:.0f} us in routed (send + wait) and "
                   f"{d['shared_experts_us']:.0f} us in shared experts while the slower worker computes "
                   f"{d['worker_compute_us']:.0f} us; {d['overhead_us']:.0f} us is beyond the compute, against a "
                   f"{d['floor_us']:.0f} us pipe floor. Driven directly from this process the same transport costs "
                   f"{d['direct_overhead_us']:.0f} us beyond compute ({d['direct_over_floor']:.1f}x the floor): the "
                   f"data plane itself accounts for about {share:.0%} of the overhead, the router process around it "
                   f"(engine thread against the gRPC event loop for the GIL, wake-ups, combine) for the rest")
        add("dispatch overhead <= 3x pipe floor", v, 3.0, v <= 3.0,
            f"socket dispatch overhead per MoE layer: {d['overhead_us']:.0f} us = {v:.1f}x the pipe floor "
            f"(target <= 3x)" + ("" if v > 3.0 else ": met"), blocker)
    if "transformers" in row["ratio_to_engine"]:
        v = 1 / row["ratio_to_engine"]["transformers"]
        e = breakdown["engine"]["ms_per_step"]
        top = sorted(((e[k], k) for k in CATEGORIES), reverse=True)[:3]
        blocker = "the engine's step is mostly " + ", ".join(f"{k} {ms:.1f} ms" for ms, k in top)
        add("engine >= 2x transformers", v, 2.0, v >= 2.0,
            f"engine at batch {bd_batch}: {v:.2f}x transformers (target >= 2x)" + ("" if v < 2.0 else ": met"),
            blocker)
    return out


# --- plots ------------------------------------------------------------------------------------------


def _plot_throughput(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["throughput"]["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, marker in zip(record["systems"], "osDv^"):
        pts = [(r["batch"], r["tokens_per_s"][s]) for r in rows if s in r["tokens_per_s"]]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=s)
    batches = [r["batch"] for r in rows]
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (concurrent sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput: {Path(record['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_breakdown(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bd = record["breakdown"]
    systems = list(bd["systems"])
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(systems)))
    colors = plt.get_cmap("tab20").colors
    left = [0.0] * len(systems)
    for i, c in enumerate(CATEGORIES):
        shares = [bd["systems"][s]["shares"][c] for s in systems]
        ax.barh(range(len(systems)), shares, left=left, color=colors[i % len(colors)], label=c)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_yticks(range(len(systems)), [f"{s}\n{bd['systems'][s]['step_ms']:.1f} ms/step" for s in systems])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of a decode step at batch {bd['batch']}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
