"""Phi-3.5-MoE (`phimoe`) against transformers, and Switch routing with a capacity factor.

References are transformers' PhimoeForCausalLM on small configs, re-initialised at unit scale
(`reinit_`, as in test_reference_equivalence, whose tolerances and greedy-margin rule apply
here unchanged: LOGIT_ATOL 1e-4 in fp32) and written with `save_pretrained`:

    phimoe         as Phi-3.5-MoE ships (LayerNorms with bias, q/k/v/o and LM head biases, GQA,
                   sparsemixer top-2 with router_jitter_noise 0.01), plain RoPE
    phimoe-wide    router_jitter_noise 0.25: each pick's softmax runs over every logit within half
                   of it, so the jitter mask decides the weights (at 0.01 most weights are ~1)
    phimoe-longrope  LongRoPE as Phi-3.5-MoE ships it (`rope_scaling` type "longrope"), served in
                   its short regime: every context fits original_max_position_embeddings (64, our
                   MAX_MODEL_LEN), where transformers uses short_factor and short_mscale; a longer
                   max_model_len is refused (long_mscale differs here so that a mix-up shows)

Switch routing (`EngineSettings.switch_capacity_factor`) is checked on hand-computed batches
through `CausalLM._moe` with a dispatcher whose expert e returns (e + 1) * x.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PhimoeConfig, PhimoeForCausalLM
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from cluster.make_model import PRESETS, make_model
from expert_workers.checkpoint import Checkpoint
from expert_workers.spec import ConfigError, load_spec, spec_from_config
from router_service.dispatch import ExpertDispatcher, PendingExperts
from router_service.engine import EngineSettings, load_engine
from router_service.model import CausalLM, LayerWeights, sparsemixer_top2, switch_capacity_keep
from router_service.sampling import SamplingParams
from tests.router_service.test_reference_equivalence import (
    assert_greedy_batch_matches,
    BATCH_MAX_TOKENS,
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
    our_logits,
    record_steps,
    reinit_,
)

# "Changes the output": far above LOGIT_ATOL, so a feature that silently does nothing fails.
MATTERS = 100 * LOGIT_ATOL

# --- references -------------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True, lm_head_bias=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2)


def _build(tmp: Path, name: str, seed: int, **change) -> Reference:
    torch.manual_seed(seed)
    model = reinit_(PhimoeForCausalLM(PhimoeConfig(**(COMMON | change))), seed)
    with torch.no_grad():  # reinit_ knows the gate as `mlp.gate`; transformers 5 keeps it as `mlp.router`
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(2.0)  # logits of std ~2: clear first picks
    model.eval().save_pretrained(tmp)
    return Reference(name, model, tmp)


# head_dim 16: 8 rotated frequencies
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": MAX_MODEL_LEN,
            "short_factor": [1.0, 1.3, 1.9, 2.6, 3.7, 5.1, 7.4, 9.8], "long_factor": [2.0, 4.0, 8.0, 16.0, 32.0, 32.0,
                                                                                 64.0, 64.0],
            "short_mscale": 1.2, "long_mscale": 1.5}

BUILDERS = {
    "phimoe": lambda tmp: _build(tmp, "phimoe", seed=31),
    "phimoe-wide": lambda tmp: _build(tmp, "phimoe-wide", seed=32, router_jitter_noise=0.25),
    "phimoe-longrope": lambda tmp: _build(tmp, "phimoe-longrope", seed=33, rope_parameters=dict(LONGROPE)),
}
FAMILIES = ["phimoe", "phimoe-wide"]  # every test
EXTRA_FAMILIES = ["phimoe-longrope"]  # logits and greedy only


@pytest.fixture(scope="module")
def get_ref(tmp_path_factory):
    refs: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in refs:
            refs[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return refs[name]

    return get


# --- 1. logits and greedy tokens ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefixes", "decode", "chunked"])
@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_logits_match_reference(get_ref, family, mode):
    ref = get_ref(family)
    eng = engine(ref.ckpt)
    spec = eng.spec
    assert (spec.norm, spec.o_proj_bias, spec.lm_head_bias, spec.moe.scoring_func) == ("layer", True, True,
                                                                                       "sparsemixer")
    assert spec.moe_layers == (0, 1) and spec.moe.jitter_eps == ref.model.config.router_jitter_noise
    positions, ours = our_logits(eng, LONG_PROMPT, mode)
    want = ref.logits(LONG_PROMPT)[positions]
    diff = (ours - want).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{family}/{mode}: max |logit diff| {diff:.3g} > {LOGIT_ATOL}"


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_greedy_batch_matches_reference_alone(get_ref, family):
    """Prompts of lengths 1, 7, 13, 20 batched through our engine = transformers' greedy on each alone."""
    assert_greedy_batch_matches(get_ref(family), family)


@pytest.mark.parametrize("strip", ["norm_bias", "o_bias", "lm_head_bias", "jitter_mask", "longrope"])
def test_what_phimoe_adds_changes_the_output(get_ref, strip):
    """Dropping any one Phi-3.5-MoE specific moves our logits far from the reference."""
    family = {"jitter_mask": "phimoe-wide", "longrope": "phimoe-longrope"}.get(strip, "phimoe")
    ref = get_ref(family)
    eng = engine(ref.ckpt)
    model = eng.model
    if strip == "norm_bias":  # RMSNorm with the same weights instead of LayerNorm
        model.norm_bias = None
        for lw in model.layers:
            lw.input_norm_bias = lw.post_norm_bias = None
    elif strip == "o_bias":
        for lw in model.layers:
            lw.o_bias = None
    elif strip == "lm_head_bias":
        model.lm_head_bias = None
    elif strip == "longrope":  # plain RoPE of the same theta
        model = eng.model = CausalLM(dataclasses.replace(model.spec, rope_scaling=None), model.embed, model.layers,
                                     model.norm, model.lm_head, model.dispatcher, MAX_MODEL_LEN,
                                     norm_bias=model.norm_bias, lm_head_bias=model.lm_head_bias)
    else:  # a band so wide that every logit takes part: plain softmax weights
        model.spec = dataclasses.replace(model.spec, moe=dataclasses.replace(model.spec.moe, jitter_eps=1e9))
    _, ours = our_logits(eng, LONG_PROMPT, "prefixes")
    diff = (ours - ref.logits(LONG_PROMPT)).abs().max().item()
    assert diff > MATTERS, f"{family} without {strip}: logits moved only {diff:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_native_fused_layout(get_ref, tmp_path, family):
    """`save_pretrained(save_original_format=False)`: `mlp.router.weight` and fused experts."""
    ref = get_ref(family)
    ref.model.save_pretrained(tmp_path, save_original_format=False)
    ck = Checkpoint(tmp_path)
    assert "model.layers.0.mlp.router.weight" in ck and ck.expert_layout(0) == "fused"
    _, ours = our_logits(engine(tmp_path), LONG_PROMPT, "prefixes")
    assert (ours - ref.logits(LONG_PROMPT)).abs().max().item() <= LOGIT_ATOL


# --- 2. continuous batching -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_continuous_batching_matches_alone(get_ref, scenario):
    ref = get_ref("phimoe")
    alone_engine = engine(ref.ckpt, max_num_seqs=1)
    params = [greedy_params(n) for n in BATCH_MAX_TOKENS]
    alone = [alone_engine.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    eng = engine(ref.ckpt, **SCENARIOS[scenario])
    steps = record_steps(eng)
    assert [c.token_ids for c in eng.generate(PROMPTS, params)] == alone
    facts = _schedule_facts(steps)
    assert facts["prefills"] == len(PROMPTS)
    if "chunked" in scenario:
        assert facts["chunked_prefill"], steps
    if "two-slots" in scenario:
        assert facts["slots"] == 2 and facts["joined_running_batch"], steps


# --- 3. the sparsemixer gate ---------------------------------------------------------------------------


def test_sparsemixer_hand_computed():
    """jitter_eps 0.25: a pick's softmax runs over logits l with (pick - l) / max(|l|, pick) <= 0.5.

    logits       2.0  1.5  0.9  -1.0
    first pick   expert 0 (2.0); band: 1.5 (.25 <= .5) in, 0.9 (.55) out, -1.0 (1.5) out
                 weight e^2 / (e^2 + e^1.5) = 1 / (1 + e^-0.5) = .6225
    second pick  expert 1 (1.5) among the rest; band: 0.9 (.4) in, -1.0 (1.67) out
                 weight e^1.5 / (e^1.5 + e^0.9) = 1 / (1 + e^-0.6) = .6457
    """
    ids, weights = sparsemixer_top2(torch.tensor([[2.0, 1.5, 0.9, -1.0]]), 0.25)
    assert ids.tolist() == [[0, 1]]
    assert weights[0].tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-0.6))], abs=1e-6)


@pytest.mark.parametrize("jitter", [0.0, 0.01, 0.25])
def test_sparsemixer_matches_transformers(jitter):
    """Our gate and transformers' sparsemixer (eval) on random logits, near-ties and negatives included."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 16, generator=g) * 2
    logits[:50, 1] = logits[:50, 0] * (1 - 0.005)  # ties within the narrow band
    logits[50:100] = -logits[50:100].abs()  # every logit negative
    want_w, want_ids = sparsemixer(logits, jitter_eps=jitter, training=False)
    ids, weights = sparsemixer_top2(logits, jitter)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, atol=1e-7, rtol=1e-6)


# --- 4. config parsing ----------------------------------------------------------------------------------


def _config(**change) -> dict:
    raw = PhimoeConfig(**COMMON).to_dict() | {"model_type": "phimoe"}
    return raw | change


@pytest.mark.parametrize("change, field", [
    (dict(rope_parameters=LONGROPE | {"short_factor": [1.0] * 7}), "rope_scaling"),  # head_dim 16: 8 factors
    (dict(rope_parameters=LONGROPE | {"short_mscale": None}), "rope_scaling"),
    (dict(rope_parameters={k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"}),
     "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_scaling"),
    (dict(num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(num_local_experts=1), "num_local_experts"),
    (dict(router_jitter_noise=-0.1), "router_jitter_noise"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        spec_from_config(_config(**change))


def test_longrope_in_the_legacy_rope_scaling_form_and_its_context_limit(get_ref):
    """Phi-3.5-MoE's config.json spelling (`rope_scaling` with `type`, top-level `rope_theta`) = transformers 5's."""
    legacy = {k: v for k, v in LONGROPE.items() if k not in ("rope_type", "rope_theta")}
    spec = spec_from_config(_config(rope_parameters=None, rope_theta=10000.0,
                                    rope_scaling={"type": "longrope", **legacy}))
    assert spec == spec_from_config(_config(rope_parameters=dict(LONGROPE)))
    assert spec.rope_scaling.short_factor == tuple(LONGROPE["short_factor"]) and spec.rope_scaling.short_mscale == 1.2
    with pytest.raises(ValueError, match="rope_scaling"):  # the long_factor regime is not served
        engine(get_ref("phimoe-longrope").ckpt, max_model_len=MAX_MODEL_LEN + 1)


def test_parsed_spec():
    spec = spec_from_config(_config(attention_bias=False, lm_head_bias=False))
    assert (spec.norm, spec.attention_bias, spec.o_proj_bias, spec.lm_head_bias) == ("layer", False, False, False)
    assert spec.names.expert(1, 3) == tuple(f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"
                                            for w in ("w1", "w3", "w2"))
    assert spec.names.router_gates(1)[0] == "model.layers.1.block_sparse_moe.gate.weight"
    assert (spec.moe.top_k, spec.moe.expert_intermediate_size, spec.rms_norm_eps) == (2, 48, 1e-5)


# --- 5. the preset, through load_engine --------------------------------------------------------------------


def test_preset_loads_in_transformers_and_generates(tmp_path):
    out = make_model("phimoe-tiny", tmp_path / "phimoe-tiny")
    spec = load_spec(out)
    assert spec.model_type == "phimoe" and spec.moe_layers == (0, 1, 2, 3) and spec.norm == "layer"
    reference, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(reference).__name__ == "PhimoeForCausalLM"
    eng = load_engine(out, EngineSettings(max_model_len=64, max_num_seqs=2, device="cpu", dtype="float32"))
    prompt = [spec.bos_token_id, 19923, 2058, 14, 566, 344]
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].float()
    _, ours = our_logits(eng, prompt, "prefixes")
    assert (ours - want).abs().max().item() <= LOGIT_ATOL
    done = eng.generate([prompt, prompt[:3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [4, 4] and all(c.finish_reason == "length" for c in done)


# --- 6. Switch routing with a capacity factor ---------------------------------------------------------------


class ScaleByExpert(ExpertDispatcher):
    """Expert e returns (e + 1) * x; records what each dispatch carried."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        self.calls.append((hidden, topk_ids, topk_weights))
        out = ((topk_ids + 1).to(hidden.dtype) * topk_weights)[..., None] * hidden[:, None, :]  # [T, K, H]

        class Done(PendingExperts):
            def wait(self):
                return out.sum(dim=1)

        return Done()


def _switch_model(E: int, capacity_factor: float | None):
    """A CausalLM holding only what `_moe` reads, with an identity gate: hidden state = gate logits."""
    spec = PRESETS["mixtral-tiny"].spec()
    spec = dataclasses.replace(spec, hidden_size=E, moe=dataclasses.replace(spec.moe, num_experts=E))
    model = CausalLM(spec, torch.zeros(1, E), [], torch.ones(E), torch.zeros(1, E), dispatcher=ScaleByExpert(),
                     max_model_len=4)
    model.set_switch_capacity(capacity_factor)
    lw = LayerWeights(input_norm=torch.ones(E), post_norm=torch.ones(E), qkv=None, qkv_bias=None,
                      o=torch.zeros(E, E), router=torch.eye(E))
    return model, lw


# Six tokens, two experts, capacity_factor 1.0: capacity = ceil(1.0 * 6 / 2) = 3 tokens per expert.
#   token            0     1     2     3     4     5
#   logits (x)     [2,0] [1,0] [3,0] [.5,0] [0,1] [4,0]
#   top-1 expert     0     0     0     0     1     0
#   rank at expert   0     1     2     3     0     4      -> tokens 3 and 5 overflow expert 0
#   probability    sigmoid(2), sigmoid(1), sigmoid(3), -, sigmoid(1), -
#   routed output  p * (e + 1) * x for kept tokens, exactly 0 for tokens 3 and 5
SWITCH_X = torch.tensor([[2.0, 0], [1, 0], [3, 0], [.5, 0], [0, 1], [4, 0]])


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_switch_capacity_drops_overflow_tokens_in_token_order():
    assert switch_capacity_keep(torch.tensor([0, 0, 0, 0, 1, 0]), 2, 1.0).tolist() == [1, 1, 1, 0, 1, 0]
    model, lw = _switch_model(2, 1.0)
    ids, weights = model.route(lw, SWITCH_X)
    assert ids[:, 0].tolist() == [0, 0, 0, 0, 1, 0]
    want_w = [_sigmoid(2), _sigmoid(1), _sigmoid(3), 0.0, _sigmoid(1), 0.0]
    assert weights[:, 0].tolist() == pytest.approx(want_w, abs=1e-6)
    out = model._moe(0, lw, SWITCH_X)
    want = torch.tensor(want_w)[:, None] * (ids + 1) * SWITCH_X
    torch.testing.assert_close(out, want)
    assert out[3].abs().max() == 0 and out[5].abs().max() == 0
    # overflow tokens never reach a worker: the dispatcher saw tokens 0, 1, 2 and 4 only
    hidden, sent_ids, _ = model.dispatcher.calls[-1]
    assert torch.equal(hidden, SWITCH_X[[0, 1, 2, 4]]) and sent_ids[:, 0].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("factor, capacity, kept", [
    pytest.param(0.5, 2, [1, 1, 0, 0, 1, 0], id="factor-0.5"),  # ceil(0.5 * 6 / 2) = 2
    pytest.param(1.25, 4, [1, 1, 1, 1, 1, 0], id="factor-1.25"),  # ceil(1.25 * 6 / 2) = ceil(3.75) = 4
    pytest.param(2.0, 6, [1, 1, 1, 1, 1, 1], id="factor-2-no-drops"),
])
def test_switch_capacity_rounds_up(factor, capacity, kept):
    assert math.ceil(factor * 6 / 2) == capacity
    assert switch_capacity_keep(torch.tensor([0, 0, 0, 0, 1, 0]), 2, factor).tolist() == kept


def test_large_capacity_factor_is_plain_top1():
    """With room for every token, Switch = softmax top-1 weighted by its probability."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    switch, lw = _switch_model(8, 8.0)  # capacity = T: nothing can overflow
    plain, _ = _switch_model(8, None)
    plain.spec = dataclasses.replace(plain.spec, moe=dataclasses.replace(plain.spec.moe, top_k=1, norm_topk_prob=False))
    ids, weights = switch.route(lw, x)
    want_ids, want_w = plain.route(lw, x)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    torch.testing.assert_close(switch._moe(0, lw, x), plain._moe(0, lw, x))


def test_switch_is_off_by_default_and_changes_outputs_when_on(get_ref):
    ref = get_ref("phimoe")
    assert EngineSettings().switch_capacity_factor is None
    default = engine(ref.ckpt)
    assert default.model.switch_capacity_factor is None
    _, off = our_logits(default, LONG_PROMPT, "prefixes")
    assert (off - ref.logits(LONG_PROMPT)).abs().max().item() <= LOGIT_ATOL  # unchanged: the reference's
    on = engine(ref.ckpt, switch_capacity_factor=1.0)
    assert on.model.switch_capacity_factor == 1.0
    _, switched = our_logits(on, LONG_PROMPT, "prefixes")
    assert (switched - off).abs().max().item() > MATTERS
    # the same engine with room for every token: plain top-1 (the phimoe router's softmax)
    big = engine(ref.ckpt, switch_capacity_factor=8.0)
    _, roomy = our_logits(big, LONG_PROMPT, "prefixes")
    top1 = engine(ref.ckpt)
    top1.model.spec = dataclasses.replace(top1.spec, moe=dataclasses.replace(
        top1.spec.moe, scoring_func="softmax", top_k=1, norm_topk_prob=False))
    _, plain = our_logits(top1, LONG_PROMPT, "prefixes")
    torch.testing.assert_close(roomy, plain, atol=1e-5, rtol=0)


def test_switch_setting_is_validated(get_ref):
    with pytest.raises(ValueError):
        EngineSettings(switch_capacity_factor=0)
    model, _ = _switch_model(2, None)
    with pytest.raises(ValueError, match="positive"):
        model.set_switch_capacity(-1.0)
