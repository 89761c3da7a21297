"""`moe-serve bench engine` end to end on the tiny model: rates, the roofline, prefill, memory, the JSON,
and the view of a `deepseek` checkpoint that vLLM loads (checked with transformers, as vLLM parses it)."""

from __future__ import annotations

import argparse
import json
import math


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_engine_quick_run(tiny_model, tmp_path, capsys):
    from cluster.bench import engine

    parser = argparse.ArgumentParser()
    engine.add_arguments(parser)
    args = parser.parse_args(["--model", tiny_model, "--batch", "1,3", "--tokens", "4", "--rounds", "1",
                              "--prefill-len", "24", "--out", str(tmp_path / "engine.json")])
    assert engine.run(args) == 0
    out = capsys.readouterr().out
    assert "engine/transformers" in out and "of limit" in out and "prefill tokens/s" in out
    record = json.loads((tmp_path / "engine.json").read_text())
    assert _positive(record["stream_bandwidth_bytes_per_s"]) and record["vllm"] is None
    for r in record["results"]:
        assert _positive(r["engine_tokens_per_s"]) and _positive(r["transformers_tokens_per_s"])
        assert _positive(r["roofline_fraction"])
    one, three = record["results"]
    # A step reads at least every non-expert weight, and three sequences hit at least as many experts as one.
    assert three["step_bytes"] >= one["step_bytes"] > 0
    assert _positive(record["prefill_tokens_per_s"]["engine"]) and _positive(record["memory"]["engine_rss_bytes"])


def test_step_bytes_count_the_hit_experts(tiny_model):
    """decode_step_bytes = non-expert weights + distinct experts hit per MoE layer + KV: with every expert
    forced onto one (a huge routing bias), exactly top_k experts per layer are hit."""
    from cluster.bench.engine import decode_step_bytes, non_expert_bytes
    from router_service.engine import EngineSettings, load_engine

    eng = load_engine(tiny_model, EngineSettings(max_model_len=64, max_num_seqs=4, dtype="float32",
                                                 routing_bias={0: 1e4, 1: 1e4}))
    spec = eng.spec
    prompts = [[1, 2, 3, 4]] * 4
    got = decode_step_bytes(eng, prompts, 5)
    kv = 4 * (4 + 5 / 2) * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    assert got == non_expert_bytes(eng.model) + len(spec.moe_layers) * 2 * spec.expert_bytes(4) + kv


def test_vllm_view_parses_as_a_transformers_config(tiny_model):
    from transformers import AutoConfig

    from cluster.bench.engine import vllm_view

    view = vllm_view(__import__("pathlib").Path(tiny_model))
    config = AutoConfig.from_pretrained(view, trust_remote_code=True)
    raw = json.loads((view / "config.json").read_text())
    assert config.model_type == "deepseek" and raw["auto_map"]
    for field in ("n_routed_experts", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                  "num_experts_per_tok", "hidden_size", "rms_norm_eps"):
        assert getattr(config, field) == raw[field], field
    assert (view / "model.safetensors").resolve() == (__import__("pathlib").Path(tiny_model) / "model.safetensors").resolve()


def test_decode_rate_measures_again_instead_of_going_negative():
    """A 1-token run slower than the N-token one (a preempted prefill) is noise, not a rate: the pair is
    measured again; a machine that never gives a positive difference is an error that says so."""
    import pytest

    from cluster.bench.engine import decode_rate

    times = iter([1.0, 2.0, 3.0, 1.0])  # seconds of: N tokens, 1 token (slower), N tokens, 1 token
    assert decode_rate(lambda n: next(times), batch=2, tokens=5) == 2 * 4 / 2.0
    with pytest.raises(RuntimeError, match="took no longer than 1 token"):
        decode_rate(lambda n: 1.0, batch=1, tokens=5, attempts=3)
