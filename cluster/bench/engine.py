"""Decode throughput of the single-process engine against transformers and vLLM, and its roofline.

Every side decodes the same random prompts greedily on the same checkpoint. Decode tokens/s excludes
prefill: each side runs N tokens and 1 token and divides the B*(N-1) extra tokens by the extra time. The
sides alternate for several rounds and each reports its median, so a burst of load from elsewhere on a
shared machine hits all of them. transformers runs in this process; vLLM (`--vllm PYTHON`, an interpreter
of a venv with vLLM installed) in a subprocess driven line by line (cluster/bench/vllm_peer.py), idle
while the others run.

The roofline: a decode step of batch B must read every non-routed weight once (attention, norms, gates,
shared experts, dense MLPs, LM head), the routed experts its tokens hit (counted from the step's own
routing), and the KV cache of its sequences. Bytes per step over the step's time, against a streaming-read
bandwidth measured in the same run, is the fraction of the memory-bandwidth limit the step attains.

Prefill tokens/s (--prefill-len prompts, the 1-token run's time) and peak resident memory are reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import torch

from cluster.bench.common import machine, median, peak_rss_bytes, print_table, resolve_model, timed, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: --preset, built once and cached)")
    p.add_argument("--preset", default="deepseek-moe-mini")
    p.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per sequence")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    p.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill measurement (0: skip)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--vllm", metavar="PYTHON", help="also measure vLLM: the python of a venv with vLLM installed")
    p.add_argument("--out", default="bench-results/engine.json")


# --- the sides -----------------------------------------------------------------------------------


def _engine_runner(engine, prompts):
    from router_service.sampling import SamplingParams

    return lambda n: engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))


def _reference_runner(model, prompts):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    return run


# transformers has no `deepseek` model type; DeepSeek-MoE-16B's own repository ships a config class loaded
# with trust_remote_code, and vLLM's DeepseekForCausalLM reads these fields from it.
_DEEPSEEK_CONFIG = '''"""DeepSeek-MoE's config.json as a transformers config class (written by moe-serve bench engine)."""
from transformers import PretrainedConfig

FIELDS = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
          "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": None, "n_shared_experts": None,
          "n_routed_experts": None, "num_experts_per_tok": None, "moe_layer_freq": 1, "first_k_dense_replace": 0,
          "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
          "attention_dropout": 0.0, "initializer_range": 0.02}


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"

    def __init__(self, **kwargs):
        for name, default in FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__init__(**kwargs)
'''


def vllm_view(model_dir: Path) -> Path:
    """A directory vLLM can load: the checkpoint itself, or for model_type `deepseek` a view of it (the same
    files as symlinks, plus config.json's auto_map to the config class above)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "deepseek" or "auto_map" in config:
        return model_dir
    from cluster.make_model import cache_root

    view = cache_root() / "vllm-views" / model_dir.resolve().name
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.resolve().iterdir():
        if f.name != "config.json":
            link = view / f.name
            link.unlink(missing_ok=True)
            link.symlink_to(f)
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekConfig"}
    (view / "config.json").write_text(json.dumps(config, indent=2))
    (view / "configuration_deepseek.py").write_text(_DEEPSEEK_CONFIG)
    return view


class VLLMPeer:
    """vLLM in a subprocess of its own interpreter, answering one timed generate per request line."""

    def __init__(self, python: str, model_dir: Path, dtype: torch.dtype, max_model_len: int, max_num_seqs: int,
                 max_batched_tokens: int):
        from cluster.process_env import preload_env

        # vLLM's CPU backend pins one OpenMP thread per listed CPU; give it the CPUs this process may use.
        cpus = sorted(os.sched_getaffinity(0))
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        venv_iomp = Path(python).resolve().parent.parent / "lib" / "libiomp5.so"
        libs = [p for p in preload_env().get("LD_PRELOAD", "").split(":") if "iomp" not in p]
        if venv_iomp.exists():  # vLLM's CPU docs: tcmalloc and its own venv's Intel OpenMP, preloaded
            libs.append(str(venv_iomp))
        if libs:
            env["LD_PRELOAD"] = ":".join(libs)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).with_name("vllm_peer.py")), "--model", str(vllm_view(model_dir)),
             "--dtype", str(dtype).removeprefix("torch."), "--max-model-len", str(max_model_len),
             "--max-num-seqs", str(max_num_seqs), "--max-batched-tokens", str(max_batched_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        hello = self._read()
        self.version = hello["vllm"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM peer exited (code {self.proc.wait()}); run it by hand to see why")
        return json.loads(line)

    def request(self, **fields) -> dict:
        self.proc.stdin.write(json.dumps(fields) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def runner(self, prompts):
        return lambda n: self.request(prompts=prompts, tokens=n)["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def decode_rate(run, batch: int, tokens: int, attempts: int = 5) -> float:
    """Decode tokens/s of one round: (N-token run) minus (1-token run) isolates decode steps.

    On a small model and a busy machine the 1-token run can take longer than the N-token one (a preempted
    prefill), which would give a negative rate: such a pair is measured again, up to `attempts` times."""
    for _ in range(attempts):
        extra = _seconds(run, tokens) - _seconds(run, 1)
        if extra > 0:
            return batch * (tokens - 1) / extra
    raise RuntimeError(f"decode rate at batch {batch}: {attempts} rounds of {tokens} tokens took no longer than "
                       f"1 token; the machine is too noisy for this measurement (raise --tokens)")


def _seconds(run, n: int) -> float:
    """A run's time: measured here, or as the peer reports it (its own clock, without the pipe)."""
    measured = {}
    wall = timed(lambda: measured.setdefault("s", run(n)))
    return measured["s"] if isinstance(measured["s"], float) else wall


# --- the roofline ------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stream_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: the best of `repeats` sums over a buffer larger than the caches,
    on this process's torch threads (the same cores the engine decodes on)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(timed(buf.sum) for _ in range(repeats))
    return nbytes / best


def _nbytes(value) -> int:
    """Bytes of a weight (a tensor or a prepared LinearWeight) or of every weight in a dataclass of them."""
    from expert_workers.kernels import LinearWeight

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, LinearWeight):
        return value.nbytes
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def non_expert_bytes(model) -> int:
    """Weights every decode step reads whatever its batch: every layer's tensors, the final norm, the LM head
    (the embedding table is only indexed, a row per token)."""
    return sum(_nbytes(lw) for lw in model.layers) + _nbytes(model.norm) + _nbytes(model.lm_head)


class HitCounter:
    """Wraps the engine's dispatcher to count the distinct routed experts each MoE layer's dispatch hits."""

    def __init__(self, inner):
        self.inner = inner
        self.hits: list[int] = []

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        self.hits.append(int(topk_ids.unique().numel()))
        return self.inner.dispatch(layer, hidden, topk_ids, topk_weights)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def decode_step_bytes(engine, prompts, tokens: int) -> float:
    """Bytes one decode step of these prompts reads: non-expert weights, the routed experts hit (counted over
    the decode steps of a real run), and the KV cache of the attended positions."""
    model, spec = engine.model, engine.spec
    counter = HitCounter(model.dispatcher)
    model.dispatcher = counter
    try:
        _engine_runner(engine, prompts)(1)
        prefill = len(counter.hits)
        _engine_runner(engine, prompts)(tokens)
    finally:
        model.dispatcher = counter.inner
    decode_hits = counter.hits[prefill + prefill:]  # the N-token run's own prefill dispatches come first
    moe_layers = max(1, len(spec.moe_layers))
    steps = max(1, len(decode_hits) // moe_layers)
    element = torch.finfo(model.dtype).bits // 8
    experts = sum(decode_hits) / steps * spec.expert_bytes(element) if spec.moe else 0.0
    B, mean_len = len(prompts), len(prompts[0]) + tokens / 2
    kv = engine.kv.k[0, 0, :, 0].numel() * element * (1 if engine.kv.v is None else 2) * len(model.layers)  # per position
    return non_expert_bytes(model) + experts + B * mean_len * kv


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from expert_workers import kernels
    from router_service.engine import EngineSettings, load_engine

    model_dir = resolve_model(args.model, args.preset)
    batches = [int(b) for b in args.batch.split(",")]
    max_len = max(args.prompt_len + args.tokens + 1, args.prefill_len + 2)
    settings = EngineSettings(max_num_seqs=max(batches), max_model_len=max_len,
                              max_batched_tokens=max(2048, args.prefill_len))
    engine = load_engine(model_dir, settings)
    engine_rss = current_rss_bytes()  # before transformers and the bandwidth probe share this process
    dtype = engine.model.dtype
    reference = None
    if not args.no_reference:
        from cluster.reference import load_reference

        reference = load_reference(model_dir, dtype)
    peer = VLLMPeer(args.vllm, model_dir, dtype, max_len, max(batches), max(2048, args.prefill_len)) if args.vllm else None
    bandwidth = stream_bandwidth()
    backends = kernels.available_backends()
    print(f"{model_dir.name} in {str(dtype).removeprefix('torch.')}, CPU kernels: {', '.join(backends) or 'none'}; "
          f"streaming read {bandwidth / 1e9:.1f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, results = [], []
    try:
        for b in batches:
            prompts = torch.randint(0, engine.spec.vocab_size, (b, args.prompt_len), generator=gen).tolist()
            runners = {"engine": _engine_runner(engine, prompts)}
            if reference is not None:
                runners["transformers"] = _reference_runner(reference, prompts)
            if peer is not None:
                runners["vllm"] = peer.runner(prompts)
            for r in runners.values():
                r(2)  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, r in runners.items():
                    rates[name].append(decode_rate(r, b, args.tokens))
            rate = {name: median(v) for name, v in rates.items()}
            step_bytes = decode_step_bytes(engine, prompts, args.tokens)
            attained = step_bytes * rate["engine"] / b / bandwidth
            result = {"batch": b, **{f"{n}_tokens_per_s": v for n, v in rate.items()},
                      "rounds_tokens_per_s": rates, "step_bytes": step_bytes, "roofline_fraction": attained}
            results.append(result)
            row = [b, rate["engine"]]
            for other in ("vllm", "transformers"):
                if other in rate:
                    row += [rate[other], f"{rate['engine'] / rate[other]:.2f}x"]
            rows.append(row + [step_bytes / 1e6, f"{100 * attained:.0f}%"])
            print(f"batch {b}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in rate.items()) +
                  f"; {step_bytes / 1e6:.0f} MB per step, {100 * attained:.0f}% of the bandwidth limit", flush=True)
        prefill = measure_prefill(engine, reference, peer, args) if args.prefill_len else None
        memory = {"engine_rss_bytes": engine_rss, "process_peak_rss_bytes": peak_rss_bytes()}
        if peer is not None:
            memory["vllm_peak_rss_bytes"] = peer.request(peak_rss=True)["bytes"]
    finally:
        if peer is not None:
            peer.close()
    headers = ["batch", "engine tok/s"]
    if peer is not None:
        headers += ["vllm tok/s", "engine/vllm"]
    if reference is not None:
        headers += ["transformers tok/s", "engine/transformers"]
    headers += ["MB/step", "of limit"]
    print(f"\ndecode tokens/s on {model_dir.name} ({engine.spec.model_type}, {str(dtype).removeprefix('torch.')}), "
          f"{args.prompt_len}-token prompts, {args.tokens} tokens each, median of {args.rounds} alternating rounds; "
          f"limit: {bandwidth / 1e9:.1f} GB/s streaming read")
    table = print_table(headers, rows)
    if prefill:
        print("prefill tokens/s, " + ", ".join(f"{n} {v:.0f}" for n, v in prefill.items()))
    print(f"resident memory: engine {engine_rss / 2**30:.2f} GiB once loaded (this process's peak, with transformers "
          f"and the bandwidth probe: {memory['process_peak_rss_bytes'] / 2**30:.2f} GiB)" +
          (f"; vLLM's largest process at its peak {memory['vllm_peak_rss_bytes'] / 2**30:.2f} GiB "
           f"(with its {os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB KV cache)" if peer else ""))
    write_json(args.out, {"suite": "engine", "model": str(model_dir), "machine": machine(),
                          "dtype": str(dtype).removeprefix("torch."), "cpu_kernels": list(backends),
                          "vllm": peer.version if peer else None, "stream_bandwidth_bytes_per_s": bandwidth,
                          "prompt_len": args.prompt_len, "tokens": args.tokens, "results": results,
                          "prefill_len": args.prefill_len, "prefill_tokens_per_s": prefill, "memory": memory,
                          "table": table})
    return 0


def measure_prefill(engine, reference, peer, args) -> dict[str, float]:
    """Prefill tokens/s of one --prefill-len prompt: the time of a 1-token run (median of rounds)."""
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, engine.spec.vocab_size, (1, args.prefill_len), generator=gen).tolist()
    runners = {"engine": _engine_runner(engine, prompts)}
    if peer is not None:
        runners["vllm"] = peer.runner(prompts)
    if reference is not None:
        runners["transformers"] = _reference_runner(reference, prompts)
    for r in runners.values():
        r(1)
    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.rounds):
        for n, r in runners.items():
            times[n].append(_seconds(r, 1))
    return {n: args.prefill_len / median(t) for n, t in times.items()}
