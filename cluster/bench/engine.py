"""Decode throughput of the single-process engine against transformers generate().

Both decode the same random prompts greedily on the same checkpoint, in this
process. Decode tokens/s excludes prefill: each side runs N tokens and 1 token
and divides the B*(N-1) extra tokens by the extra time. The two sides alternate
for several rounds and each reports its median, so a burst of load from
elsewhere on a shared machine hits both.
"""

from __future__ import annotations

import argparse

import torch

from cluster.bench.common import machine, print_table, resolve_model, timed, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: --preset, built once and cached)")
    p.add_argument("--preset", default="deepseek-moe-mini")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per sequence")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--out", default="bench-results/engine.json")


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


def decode_rate(run, batch: int, tokens: int) -> float:
    """Decode tokens/s of one round: (N-token run) minus (1-token run) isolates decode steps."""
    extra = timed(lambda: run(tokens)) - timed(lambda: run(1))
    return batch * (tokens - 1) / extra


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run(args: argparse.Namespace) -> int:
    from router_service.engine import EngineSettings, load_engine

    model_dir = resolve_model(args.model, args.preset)
    batches = [int(b) for b in args.batch.split(",")]
    engine = load_engine(model_dir, EngineSettings(max_num_seqs=max(batches),
                                                   max_model_len=args.prompt_len + args.tokens + 1))
    reference = None
    if not args.no_reference:
        from cluster.reference import load_reference

        reference = load_reference(model_dir, engine.model.dtype)
    gen = torch.Generator().manual_seed(0)
    rows, results = [], []
    for b in batches:
        prompts = torch.randint(0, engine.spec.vocab_size, (b, args.prompt_len), generator=gen).tolist()
        runners = {"engine": _engine_runner(engine, prompts)}
        if reference is not None:
            runners["transformers"] = _reference_runner(reference, prompts)
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run(2)  # warm-up
        for _ in range(args.rounds):
            for name, run in runners.items():
                rates[name].append(decode_rate(run, b, args.tokens))
        ours = median(rates["engine"])
        ref = median(rates["transformers"]) if reference is not None else None
        results.append({"batch": b, "engine_tokens_per_s": ours, "transformers_tokens_per_s": ref,
                        "ratio": ours / ref if ref else None})
        rows.append([b, ours, ref if ref else "-", f"{ours / ref:.2f}x" if ref else "-"])
        print(f"batch {b}: engine {ours:.1f} tok/s" + (f", transformers {ref:.1f} tok/s" if ref else ""), flush=True)
    print(f"\ndecode tokens/s on {model_dir.name} ({engine.spec.model_type}), {args.prompt_len}-token prompts, "
          f"{args.tokens} tokens each")
    table = print_table(["batch", "engine tok/s", "transformers tok/s", "ratio"], rows)
    write_json(args.out, {"suite": "engine", "model": str(model_dir), "machine": machine(),
                          "prompt_len": args.prompt_len, "tokens": args.tokens, "results": results, "table": table})
    return 0
