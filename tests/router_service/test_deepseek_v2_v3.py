"""DeepSeek-V2 and -V3: multi-head latent attention and their routing, against transformers.

References are transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on small configs,
re-initialised at unit scale (`reinit_`, as in test_reference_equivalence, whose tolerances and
greedy-margin rule apply here unchanged) and written with `save_pretrained`:

    v2-lite    V2, no q_lora_rank (q_proj), greedy top-2, routed_scaling_factor 1.5
    v2-group   V2, q_lora_rank, group_limited_greedy: top-3 within the best 2 of 4 groups
    v3         V3, q_lora_rank, sigmoid + non-zero e_score_correction_bias, best 2 of 4 groups by
               top-2 sum, renormalised weights times 2.5
    v3-halves  V3 without q_lora_rank and with rope_interleave false (rotate-half rope)
    v2-yarn    v2-lite with YaRN rope scaling as DeepSeek-V2-Lite ships it (mscale = mscale_all_dim)
    v3-yarn    v3 with YaRN, mscale != mscale_all_dim (an attention factor on cos/sin besides the softmax scale)

Each family also checks that what it is here to exercise changes the output: without the groups
(v2-group) or without the bias (v3) our logits leave the reference by far more than the tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from cluster.make_model import PRESETS, make_model
from expert_workers.checkpoint import Checkpoint
from expert_workers.spec import ConfigError, MoESpec, load_spec, spec_from_config
from router_service.engine import Engine, EngineSettings, load_engine
from router_service.kv_cache import KVCache
from router_service.model import CausalLM, ForwardBatch, LayerWeights, SeqChunk
from router_service.sampling import SamplingParams
from tests.router_service.test_reference_equivalence import (
    assert_greedy_batch_matches,
    BATCH_MAX_TOKENS,
    BF16_COMPUTE_RTOL,
    HIDDEN,
    LOGIT_ATOL,
    LONG_PROMPT,
    MAX_MODEL_LEN,
    PROMPTS,
    SCENARIOS,
    VOCAB,
    Reference,
    _schedule_facts,
    engine,
    greedy_params,
    record_steps,
    reinit_,
)

CPU = torch.device("cpu")
# "Changes the output": far above LOGIT_ATOL, so a feature that silently does nothing fails.
MATTERS = 100 * LOGIT_ATOL

# --- references -------------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
              n_routed_experts=8, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _build(tmp: Path, name: str, cls, config, seed: int, score_bias_std: float = 0.0) -> Reference:
    torch.manual_seed(seed)
    model = reinit_(cls(config), seed)
    if score_bias_std:  # a buffer, so reinit_ leaves it at zero; a trained model's is not
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * score_bias_std)
    model.eval().save_pretrained(tmp)
    return Reference(name, model, tmp)


def build_v2_lite(tmp: Path) -> Reference:
    cfg = DeepseekV2Config(**COMMON, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=2,
                           topk_method="greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _build(tmp, "v2-lite", DeepseekV2ForCausalLM, cfg, seed=21)


def build_v2_group(tmp: Path) -> Reference:
    cfg = DeepseekV2Config(**COMMON, q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=3,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.0,
                           rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    return _build(tmp, "v2-group", DeepseekV2ForCausalLM, cfg, seed=22)


def build_v3(tmp: Path) -> Reference:
    cfg = DeepseekV3Config(**COMMON, q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _build(tmp, "v3", DeepseekV3ForCausalLM, cfg, seed=23, score_bias_std=0.3)


def build_v3_halves(tmp: Path) -> Reference:
    cfg = DeepseekV3Config(**COMMON, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=2, n_group=2,
                           topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _build(tmp, "v3-halves", DeepseekV3ForCausalLM, cfg, seed=24, score_bias_std=0.3)


# YaRN with a 16x (V2) and 8x (V3) longer context than pre-training; with qk_rope_head_dim 8 the
# ramp keeps the fastest of the 4 frequencies and divides the others by the factor.
V2_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 16,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
V3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def build_v2_yarn(tmp: Path) -> Reference:
    cfg = DeepseekV2Config(**COMMON, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=2,
                           topk_method="greedy", rope_parameters=dict(V2_YARN))
    return _build(tmp, "v2-yarn", DeepseekV2ForCausalLM, cfg, seed=25)


def build_v3_yarn(tmp: Path) -> Reference:
    cfg = DeepseekV3Config(**COMMON, q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                           topk_group=2, rope_parameters=dict(V3_YARN))
    return _build(tmp, "v3-yarn", DeepseekV3ForCausalLM, cfg, seed=26, score_bias_std=0.3)


BUILDERS = {"v2-lite": build_v2_lite, "v2-group": build_v2_group, "v3": build_v3, "v3-halves": build_v3_halves,
            "v2-yarn": build_v2_yarn, "v3-yarn": build_v3_yarn}
FAMILIES = ["v2-lite", "v2-group", "v3"]  # every test
EXTRA_FAMILIES = ["v3-halves", "v2-yarn", "v3-yarn"]  # logits and greedy only


@pytest.fixture(scope="module")
def get_ref(tmp_path_factory):
    refs: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in refs:
            refs[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return refs[name]

    return get


def our_logits(eng: Engine, ids: list[int], mode: str) -> tuple[list[int], torch.Tensor]:
    """Our logits at positions of `ids` through the raw forward: (positions, [P, V]); a cache in the model's layout."""
    model, L = eng.model, len(ids)
    kv = KVCache.for_spec(eng.spec, L, MAX_MODEL_LEN, model.dtype, CPU)
    if mode == "prefixes":  # one step: every prefix its own sequence
        chunks = [SeqChunk(i, 0, i + 1) for i in range(L)]
        tokens = [t for i in range(L) for t in ids[: i + 1]]
        return list(range(L)), model.forward(ForwardBatch.build(chunks, tokens, CPU), kv)
    if mode == "decode":  # one token per step through the cached latents
        return list(range(L)), torch.cat(
            [model.forward(ForwardBatch.build([SeqChunk(0, i, 1)], [ids[i]], CPU), kv) for i in range(L)])
    assert mode == "chunked"  # prefill in chunks of 6: later chunks attend to cached latents
    positions, rows = [], []
    for start in range(0, L, 6):
        n = min(6, L - start)
        rows.append(model.forward(ForwardBatch.build([SeqChunk(0, start, n)], ids[start : start + n], CPU), kv))
        positions.append(start + n - 1)
    return positions, torch.cat(rows)


# --- 1. logits and greedy tokens ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefixes", "decode", "chunked"])
@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_logits_match_reference(get_ref, family, mode):
    ref = get_ref(family)
    eng = engine(ref.ckpt)
    hf_moe = {i for i, layer in enumerate(ref.model.model.layers) if hasattr(layer.mlp, "experts")}
    assert set(eng.spec.moe_layers) == hf_moe == {1, 2}
    positions, ours = our_logits(eng, LONG_PROMPT, mode)
    want = ref.logits(LONG_PROMPT)[positions]
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    diff = (ours - want).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{family}/{mode}: max |logit diff| {diff:.3g} > {LOGIT_ATOL}"


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_greedy_batch_matches_reference_alone(get_ref, family):
    """Prompts of lengths 1..20 batched through our engine = transformers' greedy on each alone."""
    assert_greedy_batch_matches(get_ref(family), family)


def test_group_limits_and_score_bias_change_the_output(get_ref):
    """Dropping what v2-group and v3 exist to exercise moves our logits far from the reference."""
    for family, strip in [
        ("v2-group", "groups"), ("v3", "groups"), ("v3", "bias"),
    ]:
        ref = get_ref(family)
        eng = engine(ref.ckpt)
        model = eng.model
        if strip == "groups":
            model.spec = dataclasses.replace(model.spec, moe=dataclasses.replace(model.spec.moe, n_group=1))
        else:
            for lw in model.layers:
                lw.router_score_bias = None
        _, ours = our_logits(eng, LONG_PROMPT, "prefixes")
        diff = (ours - ref.logits(LONG_PROMPT)).abs().max().item()
        assert diff > MATTERS, f"{family} without {strip}: logits moved only {diff:.3g}"


def test_checkpoint_holds_v3_score_bias(get_ref):
    ref = get_ref("v3")
    ck = Checkpoint(ref.ckpt)
    bias = ck.read("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.shape == (8,) and bias.abs().min() > 0
    assert torch.equal(engine(ref.ckpt).model.layers[1].router_score_bias, bias)


# --- 2. continuous batching -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_alone(get_ref, family, scenario):
    ref = get_ref(family)
    alone_engine = engine(ref.ckpt, max_num_seqs=1)
    params = [greedy_params(n) for n in BATCH_MAX_TOKENS]
    alone = [alone_engine.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    kw = SCENARIOS[scenario]
    eng = engine(ref.ckpt, **kw)
    steps = record_steps(eng)
    assert [c.token_ids for c in eng.generate(PROMPTS, params)] == alone
    facts = _schedule_facts(steps)
    assert facts["prefills"] == len(PROMPTS)
    if "chunked" in scenario:
        assert facts["chunked_prefill"], steps
    if "two-slots" in scenario:
        assert facts["slots"] == 2 and facts["joined_running_batch"], steps


# --- 3. the compressed KV cache -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v3", "v3-halves"])
def test_kv_cache_holds_the_latent(get_ref, family):
    """One key-only entry per token and layer: exactly the latent and rope key transformers' MLA caches."""
    ref = get_ref(family)
    spec = load_spec(ref.ckpt)
    kv = KVCache.for_spec(spec, 3, MAX_MODEL_LEN, torch.float32)
    assert kv.k.shape == (3, 3, 1, MAX_MODEL_LEN, 32 + 8) and kv.v is None
    # 3 layers * 64 positions * (32 + 8) numbers * 4 bytes; expanded keys and values would take
    # 4 heads * (24 + 16) = 160 numbers per token and layer instead of 40.
    assert KVCache.slot_bytes(spec, MAX_MODEL_LEN, 4) == 3 * 64 * 40 * 4 == 30720
    eng = engine(ref.ckpt, kv_cache_bytes=3 * 30720 + 100)
    assert eng.kv.num_slots == 3 and eng.kv.k.shape == (3, 3, 1, MAX_MODEL_LEN, 40)

    prompt = PROMPTS[2]
    eng.generate([prompt], greedy_params(1))  # prefill caches every prompt position
    with torch.no_grad():
        cache = ref.model(torch.tensor([prompt]), use_cache=True).cache
    for layer in range(3):
        want = torch.cat([cache.layers[layer].keys, cache.layers[layer].values], dim=-1)[0, 0]  # [L, 32 + 8]
        # transformers' interleaved rope also emits the rotated pairs as halves, as our reordered weights do
        got = eng.kv.k[layer, 0, 0, : len(prompt)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute(get_ref, family):
    """Computing (and caching latents) in bf16, against transformers computing in bf16 too.

    Against the fp32 reference v3 is off by 0.4 of its largest logit, and so is transformers'
    own bf16 run: sigmoid scores plus the bias leave near-ties that bf16 flips (18 of 210 token
    choices in layer 2), so the fp32 comparison would only measure that. Both sides in bf16
    differ by 0.003..0.012 of the largest logit here; the bound is the other families' bf16 one.
    """
    ref = get_ref(family)
    eng = engine(ref.ckpt, dtype="bfloat16")
    assert eng.kv.k.dtype == torch.bfloat16 and eng.model.layers[1].router.dtype == torch.float32
    _, ours = our_logits(eng, LONG_PROMPT, "decode")
    bf16 = copy.deepcopy(ref.model).to(torch.bfloat16)
    want = ref.logits(LONG_PROMPT, bf16)
    scale = want.abs().max().item()
    diff = (ours - want).abs().max().item()
    assert 0 < diff <= BF16_COMPUTE_RTOL * scale, (diff, scale)


# --- 4. checkpoint layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v2-group", "v3"])
def test_transformers_native_fused_layout(get_ref, tmp_path, family):
    ref = get_ref(family)
    ref.model.save_pretrained(tmp_path, save_original_format=False)
    ck = Checkpoint(tmp_path)
    assert ck.expert_layout(1) == "fused" and ck.expert_layout(2) == "fused"
    _, ours = our_logits(engine(tmp_path), LONG_PROMPT, "prefixes")
    assert (ours - ref.logits(LONG_PROMPT)).abs().max().item() <= LOGIT_ATOL


# --- 5. routing: hand-computed group-limited selection -------------------------------------------------


def _router(moe: MoESpec, score_bias: list[float] | None = None):
    """A CausalLM holding only what `route` reads, with an identity gate: hidden state = gate logits."""
    spec = dataclasses.replace(PRESETS["deepseek-v3-tiny"].spec(), hidden_size=moe.num_experts, moe=moe)
    E = moe.num_experts
    model = CausalLM(spec, torch.zeros(1, E), [], torch.ones(E), torch.zeros(1, E), dispatcher=None, max_model_len=4)
    lw = LayerWeights(input_norm=torch.ones(E), post_norm=torch.ones(E), qkv=None, qkv_bias=None, o=torch.zeros(E, E),
                      router=torch.eye(E),
                      router_score_bias=None if score_bias is None else torch.tensor(score_bias))
    return model, lw


def _route(moe: MoESpec, logits: list[float], score_bias: list[float] | None = None):
    model, lw = _router(moe, score_bias)
    ids, weights = model.route(lw, torch.tensor([logits]))
    order = ids[0].argsort()
    return ids[0][order].tolist(), weights[0][order].tolist()


# DeepSeek-V2, softmax scores (logits are their logs; they sum to 1):
#   scores        .30 .25 | .01 .01 | .20 .01 | .18 .04
#   group max     .30       .01       .20       .18       -> best 2 groups: 0 and 2
#   top-4 within  experts 0 .30, 1 .25, 4 .20, 5 .01      (plain top-4: 0, 1, 4 and 6 .18)
#   weights       scores times routed_scaling_factor 2: .60 .50 .40 .02
V2_SCORES = [.30, .25, .01, .01, .20, .01, .18, .04]
V2_MOE = MoESpec(num_experts=8, top_k=4, expert_intermediate_size=1, norm_topk_prob=False, routed_scaling_factor=2.0,
                 n_group=4, topk_group=2, group_score="max")


@pytest.mark.parametrize("groups, want_ids, want_weights", [
    pytest.param(4, [0, 1, 4, 5], [.60, .50, .40, .02], id="group_limited_greedy"),
    pytest.param(1, [0, 1, 4, 6], [.60, .50, .40, .36], id="greedy"),
])
def test_v2_group_limited_selection(groups, want_ids, want_weights):
    moe = dataclasses.replace(V2_MOE, n_group=groups, topk_group=min(2, groups))
    ids, weights = _route(moe, [math.log(s) for s in V2_SCORES])
    assert ids == want_ids
    assert weights == pytest.approx(want_weights, abs=1e-6)


# DeepSeek-V3, sigmoid scores s (logits are logit(s)) and choice score s + bias:
#   s             .90 .10 | .60 .55 | .50 .40 | .70 .05
#   bias           0   0  |  0   0  | .15 .22 |  0   0
#   choice        .90 .10 | .60 .55 | .65 .62 | .70 .05
#   top-2 sums    1.00      1.15      1.27      .75       -> groups 2 and 1
#   top-2 within  experts 4 (.65) and 5 (.62)
#   weights       unbiased s .50 .40, renormalised .5556 .4444, times 2.5: 1.3889 1.1111
# Every simpler rule picks differently: plain top-2 on s or on the choice takes 0 and 6; groups ranked
# by their best choice (V2's rule) keep groups 0 and 3, so 0 and 6 again; and without the bias the
# top-2 sums are 1.00 1.15 .90 .75, keeping groups 1 and 0, so 0 and 2.
V3_SCORES = [.90, .10, .60, .55, .50, .40, .70, .05]
V3_BIAS = [0, 0, 0, 0, .15, .22, 0, 0]
V3_MOE = MoESpec(num_experts=8, top_k=2, expert_intermediate_size=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                 scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", score_correction_bias=True)


@pytest.mark.parametrize("moe, bias, want_ids, want_weights", [
    pytest.param(V3_MOE, V3_BIAS, [4, 5], [2.5 * .5 / .9, 2.5 * .4 / .9], id="v3"),
    pytest.param(dataclasses.replace(V3_MOE, n_group=1), V3_BIAS, [0, 6], [2.5 * .9 / 1.6, 2.5 * .7 / 1.6],
                 id="v3-without-groups"),
    pytest.param(dataclasses.replace(V3_MOE, group_score="max"), V3_BIAS, [0, 6], [2.5 * .9 / 1.6, 2.5 * .7 / 1.6],
                 id="v3-groups-by-max"),
    pytest.param(V3_MOE, None, [0, 2], [2.5 * .9 / 1.5, 2.5 * .6 / 1.5], id="v3-without-bias"),
])
def test_v3_top2_sum_groups_with_bias(moe, bias, want_ids, want_weights):
    ids, weights = _route(moe, [math.log(s / (1 - s)) for s in V3_SCORES], bias)
    assert ids == want_ids
    assert weights == pytest.approx(want_weights, abs=1e-6)


def test_route_matches_transformers_gates():
    """Our route and transformers' V2/V3 routers on random logits (token-level top-k sets and weights)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    g = torch.Generator().manual_seed(0)
    E, H, T = 16, 32, 200
    h = torch.randn(T, H, generator=g)
    cases = [
        (DeepseekV2TopkRouter, DeepseekV2Config(**dict(COMMON, n_routed_experts=E, hidden_size=H), num_experts_per_tok=6,
                                                topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                routed_scaling_factor=16.0, q_lora_rank=None)),
        (DeepseekV3TopkRouter, DeepseekV3Config(**dict(COMMON, n_routed_experts=E, hidden_size=H), num_experts_per_tok=4,
                                                n_group=4, topk_group=2, q_lora_rank=None)),
    ]
    for cls, cfg in cases:
        gate = cls(cfg)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(E, H, generator=g) * 2 / math.sqrt(H))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.2)
            _, want_w, want_ids = gate(h)
        raw = cfg.to_dict() | {"model_type": cfg.model_type, "n_routed_experts": E, "hidden_size": H}
        spec = spec_from_config(raw)
        model, lw = _router(spec.moe, None)
        lw.router = gate.weight.detach().float()
        lw.router_score_bias = getattr(gate, "e_score_correction_bias", None)
        ids, weights = model.route(lw, h)
        want_order, order = want_ids.argsort(-1), ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order)), cls.__name__
        torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order), atol=1e-6, rtol=1e-6)


# --- 6. config parsing ----------------------------------------------------------------------------------


def _config(model_type: str, **change) -> dict:
    cfg = (DeepseekV2Config if model_type == "deepseek_v2" else DeepseekV3Config)(**COMMON, q_lora_rank=None,
                                                                                num_experts_per_tok=2)
    raw = cfg.to_dict() | {"model_type": model_type}
    if model_type == "deepseek_v2":
        raw |= {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    else:
        raw |= {"n_group": 4, "topk_group": 2}
    for key, value in change.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("model_type, change, field", [
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func"),
    ("deepseek_v2", dict(n_group=3), "n_routed_experts"),
    ("deepseek_v2", dict(topk_group=5), "topk_group"),
    ("deepseek_v2", dict(topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    ("deepseek_v2", dict(n_group=...), "n_group"),
    ("deepseek_v2", dict(q_lora_rank=...), "q_lora_rank"),
    ("deepseek_v2", dict(kv_lora_rank=...), "kv_lora_rank"),
    ("deepseek_v2", dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ("deepseek_v2", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v2", dict(first_k_dense_replace=4), "first_k_dense_replace"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek_v3", dict(n_group=8), "n_group"),  # groups of one expert have no top-2
    ("deepseek_v3", dict(v_head_dim=0), "v_head_dim"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}), "rope_scaling"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": -1.0}), "rope_scaling"),
])
def test_bad_configs_name_the_field(model_type, change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        spec_from_config(_config(model_type, **change))


def test_parsed_specs():
    v2 = spec_from_config(_config("deepseek_v2", moe_layer_freq=2, routed_scaling_factor=16.0))
    assert v2.moe_layers == (2,)  # i >= first_k_dense_replace (1) and i % moe_layer_freq (2) == 0
    assert (v2.moe.n_group, v2.moe.topk_group, v2.moe.group_score, v2.moe.scoring_func) == (4, 2, "max", "softmax")
    assert (v2.moe.norm_topk_prob, v2.moe.routed_scaling_factor) == (False, 16.0)
    assert (v2.num_heads, v2.num_kv_heads, v2.head_dim, v2.rope_dim) == (4, 4, 24, 8)
    assert v2.mla.q_lora_rank is None and v2.mla.rope_interleave and v2.mla.softmax_scale == 24 ** -0.5
    # DeepSeek-V2's own gate renormalises instead of scaling (transformers' V2 ignores norm_topk_prob).
    norm = spec_from_config(_config("deepseek_v2", norm_topk_prob=True, routed_scaling_factor=16.0))
    assert (norm.moe.norm_topk_prob, norm.moe.routed_scaling_factor) == (True, 1.0)
    v3 = spec_from_config(_config("deepseek_v3", num_key_value_heads=128, rope_interleave=False))
    assert (v3.moe.scoring_func, v3.moe.group_score, v3.moe.score_correction_bias) == ("sigmoid", "top2_sum", True)
    assert v3.num_kv_heads == 4 and not v3.mla.rope_interleave  # num_key_value_heads means nothing to MLA


def test_yarn_in_the_legacy_rope_scaling_form():
    """DeepSeek-V2-Lite's config.json spelling (`rope_scaling` with `type`, top-level `rope_theta`) = transformers 5's."""
    scaling = {k: v for k, v in V2_YARN.items() if k not in ("rope_type", "rope_theta")}
    legacy = _config("deepseek_v2", rope_parameters=..., rope_theta=10000.0, rope_scaling={"type": "yarn", **scaling})
    modern = _config("deepseek_v2", rope_parameters=dict(V2_YARN))
    assert spec_from_config(legacy) == spec_from_config(modern)
    spec = spec_from_config(modern)
    yarn = spec.rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.attention_factor) == (16.0, 16, 1.0)
    # softmax scale: 1/sqrt(24) * (0.1 * 0.707 * ln 16 + 1)**2
    assert spec.mla.softmax_scale == pytest.approx(24 ** -0.5 * (0.1 * 0.707 * math.log(16) + 1) ** 2)
    plain = spec_from_config(_config("deepseek_v2"))
    assert plain.rope_scaling is None and plain.mla.softmax_scale == 24 ** -0.5


# --- 7. presets, through load_engine (the path every cluster router takes) ------------------------------


@pytest.mark.parametrize("name", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
def test_preset_loads_in_transformers_and_generates(tmp_path, name):
    out = make_model(name, tmp_path / name)
    spec = load_spec(out)
    assert spec.mla is not None and (spec.mla.q_lora_rank is None) == (name == "deepseek-v2-tiny")
    assert spec.moe.n_group == 4 and spec.moe.topk_group == 2 and spec.moe_layers == (1, 2, 3)
    reference, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    eng = load_engine(out, EngineSettings(max_model_len=64, max_num_seqs=2, device="cpu", dtype="float32"))
    prompt = [spec.bos_token_id, 19923, 2058, 14, 566, 344]
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].float()
    _, ours = our_logits(eng, prompt, "prefixes")
    assert (ours - want).abs().max().item() <= LOGIT_ATOL
    done = eng.generate([prompt, prompt[:3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [4, 4] and all(c.finish_reason == "length" for c in done)
    fused = make_model(name, tmp_path / "fused", layout="fused")  # transformers 5's in-memory expert names
    _, ours_fused = our_logits(engine(fused), prompt, "prefixes")
    assert Checkpoint(fused).expert_layout(1) == "fused"
    # Both layouts load into equal values, but not into equally aligned memory, and a BLAS may pick another
    # kernel (another summation order) for other alignment on some CPUs: equal up to fp32 rounding.
    torch.testing.assert_close(ours_fused, ours, rtol=1e-5, atol=1e-5)
    if name == "deepseek-v3-tiny":
        # The preset's e_score_correction_bias is non-zero and changes which experts some tokens get.
        lw = eng.model.layers[1]
        assert lw.router_score_bias.abs().min() > 0
        h = torch.randn(256, spec.hidden_size, generator=torch.Generator().manual_seed(0))
        with_bias, _ = eng.model.route(lw, h)
        without = eng.model.route(dataclasses.replace(lw, router_score_bias=None), h)[0]
        changed = (with_bias.sort(-1).values != without.sort(-1).values).any(-1).float().mean().item()
        assert changed > 0.05, changed
