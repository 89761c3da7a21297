"""Our forward pass and engine against reference implementations.

References:
    mixtral, qwen2_moe, llama   transformers' *ForCausalLM, saved with `save_pretrained`
    deepseek                    transformers' `DeepseekOcr2TextModel` (Llama-style MHA plus DeepSeek's MoE;
                                with topk_method="greedy", routed_scaling_factor=1 and no top-k
                                renormalisation it is DeepSeek-MoE's decoder) with an LM head applied
                                by hand; the checkpoint is written here in the `deepseek` layout.

Weights are re-initialised with unit-scale statistics (transformers' std 0.02 gives nearly tied
logits, so greedy argmax would flip on fp32 noise); the greedy tests check that every compared
step is decided by a margin far above the logit tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2TextMLP,
    DeepseekOcr2TextModel,
    DeepseekOcr2TextMoe,
)

from expert_workers.checkpoint import Checkpoint
from expert_workers.spec import load_spec
from router_service.engine import Engine, EngineSettings, load_engine
from router_service.kv_cache import KVCache
from router_service.model import ForwardBatch, SeqChunk
from router_service.sampling import SamplingParams

# --- tolerances ----------------------------------------------------------------------------

# fp32 vs fp32, same weights: the two sides differ only in summation order (fused qkv, SDPA
# kernels, expert grouping). Measured max |diff| is ~5e-6 on logits of std ~3 and |max| ~12;
# 1e-4 leaves 20x headroom and still catches any real mistake (a wrong rope theta, a missed
# norm weight or a swapped gate/up moves logits by O(0.1..1)).
LOGIT_ATOL = 1e-4
# A greedy step is only a fair comparison if the reference's top-2 logit gap is far above the
# noise both sides may have; every compared step must clear 10x the logit tolerance.
MIN_GREEDY_MARGIN = 10 * LOGIT_ATOL
# log_softmax of fp32 logits: as tight as the logits themselves (the normaliser is shared).
LOGPROB_ATOL = 2 * LOGIT_ATOL
# bf16 tolerances are relative to the largest |logit| of the fp32 reference (the error scales with it).
# A bf16 checkpoint computed in fp32 against the fp32 original: bf16 keeps 8 mantissa bits (relative
# rounding <= 2**-9 per weight); measured max |diff| / max |logit| is 0.004..0.009 over the families
# here. This only guards against garbage (a missed cast, wrong tensors); that the dtype conversion is
# exact is checked at LOGIT_ATOL against a reference holding the same bf16-rounded weights.
BF16_WEIGHTS_RTOL = 0.025
# Computing in bf16 as well (activations rounded at every op): measured 0.006..0.053.
BF16_COMPUTE_RTOL = 0.15

# --- shapes shared by every model ------------------------------------------------------------

VOCAB, HIDDEN = 320, 64
MAX_MODEL_LEN = 64
MAX_NEW = 8
CPU = torch.device("cpu")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 13, 20)]


PROMPTS = _prompts()  # lengths 1, 7, 13, 20
LONG_PROMPT = PROMPTS[-1]


def reinit_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale weights: activations O(1), logits of std ~3, routers that clearly prefer experts."""
    g = torch.Generator().manual_seed(seed)
    H = HIDDEN
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                if "embed_tokens" in name:
                    std = 1.0
                elif "lm_head" in name:
                    std = 3.0 / math.sqrt(H)
                elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                    std = 2.0 / math.sqrt(H)  # router: softmax over clearly separated scores
                else:
                    std = 1.0 / math.sqrt(p.shape[-1])  # [.., out, in]: fan-in scaling
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # RMSNorm weights: not all ones, so a dropped norm weight shows
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    return model


# --- references -------------------------------------------------------------------------------


@dataclass
class Reference:
    """One reference model and our checkpoint of the same weights."""

    name: str
    model: torch.nn.Module  # fp32, eval mode
    ckpt: Path  # our checkpoint of these weights (fp32)
    lm_head: torch.Tensor | None = None  # deepseek: the LM head we apply to the decoder's output
    hf_causal_lm: bool = True  # has .generate and .logits
    deepseek_fields: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, ids: list[int], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits at every position: [L, V] fp32."""
        m = model or self.model
        x = torch.tensor([ids])
        if self.hf_causal_lm:
            return m(x).logits[0].float()
        return F.linear(m(x).last_hidden_state[0], self.lm_head).float()

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
        """n greedy tokens after `ids`, and the logits each was chosen from [n, V]."""
        if not self.hf_causal_lm:
            # No KV cache: recompute the whole sequence each step (simple and obviously correct).
            seq, steps = list(ids), []
            for _ in range(n):
                last = self.logits(seq)[-1]
                steps.append(last)
                seq.append(int(last.argmax()))
            return seq[len(ids):], torch.stack(steps)
        # eos_token_id=[] switches EOS handling off entirely: with the model's EOS set,
        # min_new_tokens would mask the EOS logit (not plain greedy), and without min_new_tokens
        # EOS would end the reference early, while ours runs with ignore_eos.
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=[],
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(torch.tensor([ids]), generation_config=gc)
        tokens = out.sequences[0, len(ids):].tolist()
        logits = torch.cat(out.logits).float()  # raw logits, before any processor
        assert len(tokens) == n
        assert tokens == logits.argmax(-1).tolist(), "a logits processor changed transformers' greedy choice"
        return tokens, logits


def _hf_reference(name: str, tmp: Path, cls, config, seed: int) -> Reference:
    torch.manual_seed(seed)
    model = reinit_(cls(config), seed).eval()
    model.save_pretrained(tmp)
    return Reference(name, model, tmp)


def _qwen_moe_layers(cfg: Qwen2MoeConfig) -> set[int]:
    return {i for i in range(cfg.num_hidden_layers)
            if i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0}


def build_mixtral(tmp: Path) -> Reference:
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                        bos_token_id=1, eos_token_id=2)
    return _hf_reference("mixtral", tmp, MixtralForCausalLM, cfg, seed=1)


def build_qwen2_moe(tmp: Path) -> Reference:
    # 3 layers, MoE every layer except mlp_only_layers=[1]: MoE, dense, MoE.
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                         mlp_only_layers=[1], norm_topk_prob=False, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                         bos_token_id=1, eos_token_id=2)
    assert _qwen_moe_layers(cfg) == {0, 2}
    return _hf_reference("qwen2_moe", tmp, Qwen2MoeForCausalLM, cfg, seed=2)


def build_qwen2_moe_sparse_step(tmp: Path) -> Reference:
    # 4 layers, decoder_sparse_step=2 (layers 1, 3) minus mlp_only_layers=[3]: only layer 1 is MoE;
    # and top-k renormalisation on.
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2,
                         mlp_only_layers=[3], norm_topk_prob=True, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    assert _qwen_moe_layers(cfg) == {1}
    return _hf_reference("qwen2_moe-sparse_step-norm_topk", tmp, Qwen2MoeForCausalLM, cfg, seed=3)


def build_llama(tmp: Path, tied: bool = False) -> Reference:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    ref = _hf_reference("llama-tied" if tied else "llama", tmp, LlamaForCausalLM, cfg, seed=4 + tied)
    if tied:  # the tied path is only exercised if the checkpoint really has no lm_head
        assert "lm_head.weight" not in Checkpoint(tmp)
        assert ref.model.lm_head.weight.data_ptr() == ref.model.model.embed_tokens.weight.data_ptr()
    return ref


# --- DeepSeek-MoE: reference decoder + our checkpoint writer ----------------------------------------

DEEPSEEK_MOE_I = 32


def deepseek_is_moe(i: int, first_k_dense_replace: int, moe_layer_freq: int) -> bool:
    """DeepSeek-MoE's rule (modeling_deepseek.py): MoE iff i >= first_k_dense_replace and i % freq == 0."""
    return i >= first_k_dense_replace and i % moe_layer_freq == 0


def build_deepseek(tmp: Path, *, layers: int = 3, first_k_dense_replace: int = 1, moe_layer_freq: int = 1,
                   name: str = "deepseek", seed: int = 6) -> Reference:
    layer_types = ["sparse" if deepseek_is_moe(i, first_k_dense_replace, moe_layer_freq) else "dense"
                   for i in range(layers)]
    rope_theta = 5000.0
    cfg = DeepseekOcr2TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4,  # DeepSeek-MoE is MHA
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=DEEPSEEK_MOE_I,
        mlp_layer_types=layer_types, topk_method="greedy", routed_scaling_factor=1.0,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = reinit_(DeepseekOcr2TextModel(cfg), seed).eval()
    for i, layer in enumerate(model.layers):
        want = DeepseekOcr2TextMoe if layer_types[i] == "sparse" else DeepseekOcr2TextMLP
        assert type(layer.mlp) is want, f"layer {i}: mlp_layer_types not honoured"
    g = torch.Generator().manual_seed(seed + 100)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=g) * (3.0 / math.sqrt(HIDDEN))
    fields = dict(
        model_type="deepseek", architectures=["DeepseekForCausalLM"],
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=DEEPSEEK_MOE_I, num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=first_k_dense_replace,
        moe_layer_freq=moe_layer_freq, norm_topk_prob=False, scoring_func="softmax",
        aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", max_position_embeddings=256,
        initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=None,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rope_theta=rope_theta,
        rope_scaling=None, attention_bias=False, attention_dropout=0.0, torch_dtype="float32",
    )
    ref = Reference(name, model, tmp, lm_head=lm_head, hf_causal_lm=False, deepseek_fields=fields)
    write_deepseek_checkpoint(ref, tmp)
    return ref


def deepseek_tensors(ref: Reference, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference's weights under DeepSeek-MoE checkpoint names, per-expert or fused."""
    I = DEEPSEEK_MOE_I
    out: dict[str, torch.Tensor] = {}
    for key, value in ref.model.state_dict().items():
        name = f"model.{key}"
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m and layout == "per_expert":
            base = f"model.layers.{m.group(1)}.mlp.experts"
            for e in range(value.shape[0]):
                if m.group(2) == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up rows
                    out[f"{base}.{e}.gate_proj.weight"] = value[e, :I]
                    out[f"{base}.{e}.up_proj.weight"] = value[e, I:]
                else:  # [E, H, I]
                    out[f"{base}.{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    out["lm_head.weight"] = ref.lm_head
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def write_deepseek_checkpoint(ref: Reference, directory: Path, *, layout: str = "per_expert", shards: int = 1,
                              dtype: torch.dtype = torch.float32) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = deepseek_tensors(ref, layout, dtype)
    fields = dict(ref.deepseek_fields, torch_dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(fields, indent=2))
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    # Round-robin, so that one layer's (and one expert's) tensors land in different shards.
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(sorted(tensors))}
    for f in files:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == f}, directory / f, metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


# --- fixtures ---------------------------------------------------------------------------------

BUILDERS = {
    "mixtral": build_mixtral,
    "qwen2_moe": build_qwen2_moe,
    "llama": build_llama,
    "llama-tied": lambda tmp: build_llama(tmp, tied=True),
    "deepseek": build_deepseek,
    # 4 layers, first_k_dense_replace=1, moe_layer_freq=2: dense, dense, MoE, dense.
    "deepseek-freq2": lambda tmp: build_deepseek(tmp, layers=4, moe_layer_freq=2, name="deepseek-freq2", seed=7),
    "qwen2_moe-sparse_step-norm_topk": build_qwen2_moe_sparse_step,
}
FAMILIES = ["mixtral", "qwen2_moe", "llama", "llama-tied", "deepseek"]  # every test
EXTRA_FAMILIES = ["deepseek-freq2", "qwen2_moe-sparse_step-norm_topk"]  # logits and greedy only

_refs: dict[str, Reference] = {}


@pytest.fixture(scope="module")
def get_ref(tmp_path_factory):
    def get(name: str) -> Reference:
        if name not in _refs:
            _refs[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return _refs[name]

    yield get
    _refs.clear()


def settings(**kw) -> EngineSettings:
    base = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_batched_tokens=2048, device="cpu", dtype="float32")
    return EngineSettings(**(base | kw))


def engine(ckpt: Path, **kw) -> Engine:
    return load_engine(ckpt, settings(**kw))


def greedy_params(n: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def our_logits(eng: Engine, ids: list[int], mode: str) -> tuple[list[int], torch.Tensor]:
    """Our logits at some positions of `ids` via the raw forward: (positions, [P, V])."""
    spec, model = eng.spec, eng.model
    L = len(ids)
    kv = KVCache(spec.num_layers, L, spec.num_kv_heads, MAX_MODEL_LEN, spec.head_dim, model.dtype, CPU)
    if mode == "prefixes":  # one step: every prefix is its own sequence (multi-sequence prefill)
        chunks = [SeqChunk(i, 0, i + 1) for i in range(L)]
        tokens = [t for i in range(L) for t in ids[: i + 1]]
        return list(range(L)), model.forward(ForwardBatch.build(chunks, tokens, CPU), kv)
    if mode == "decode":  # one token per step through the KV cache
        rows = [model.forward(ForwardBatch.build([SeqChunk(0, i, 1)], [ids[i]], CPU), kv) for i in range(L)]
        return list(range(L)), torch.cat(rows)
    if mode == "chunked":  # prefill in chunks of 6 (later chunks attend to cached keys)
        positions, rows = [], []
        for start in range(0, L, 6):
            n = min(6, L - start)
            rows.append(model.forward(ForwardBatch.build([SeqChunk(0, start, n)], ids[start : start + n], CPU), kv))
            positions.append(start + n - 1)
        return positions, torch.cat(rows)
    raise ValueError(mode)


def record_steps(eng: Engine) -> list[list[tuple[int, int, int]]]:
    """Record (slot, start, n) of every chunk of every forward the engine runs."""
    steps: list[list[tuple[int, int, int]]] = []
    forward = eng.model.forward

    def recording(batch, kv):
        steps.append([(c.slot, c.start, c.n) for c in batch.chunks])
        return forward(batch, kv)

    eng.model.forward = recording
    return steps


# --- 1. logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefixes", "decode", "chunked"])
@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_logits_match_reference(get_ref, family, mode):
    ref = get_ref(family)
    eng = engine(ref.ckpt)
    if family.startswith("deepseek"):  # the spec reads the same dense/MoE pattern as the reference
        moe = {i for i, layer in enumerate(ref.model.layers) if isinstance(layer.mlp, DeepseekOcr2TextMoe)}
        assert set(eng.spec.moe_layers) == moe
    positions, ours = our_logits(eng, LONG_PROMPT, mode)
    want = ref.logits(LONG_PROMPT)[positions]
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    diff = (ours - want).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{family}/{mode}: max |logit diff| {diff:.3g} > {LOGIT_ATOL}"


def test_moe_layer_pattern_matches_transformers(get_ref):
    """The spec's MoE layers are the ones transformers builds as sparse blocks."""
    for family in ["qwen2_moe", "qwen2_moe-sparse_step-norm_topk", "mixtral"]:
        ref = get_ref(family)
        hf_moe = {i for i, layer in enumerate(ref.model.model.layers) if hasattr(layer.mlp, "experts")}
        assert set(load_spec(ref.ckpt).moe_layers) == hf_moe, family


# --- 2. greedy decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_greedy_batch_matches_reference_alone(get_ref, family):
    """Prompts of lengths 1..20 batched through our engine = the reference's greedy on each alone."""
    assert_greedy_batch_matches(get_ref(family), family)


def assert_greedy_batch_matches(ref, family: str) -> None:
    """PROMPTS batched through our engine give the reference's greedy tokens on each prompt alone,
    at steps whose reference top-2 margin is wide enough for a fair comparison (other families' tests use it)."""
    got = engine(ref.ckpt).generate(PROMPTS, greedy_params())
    for prompt, completion in zip(PROMPTS, got):
        want, step_logits = ref.greedy(prompt, MAX_NEW)
        top2 = step_logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin > MIN_GREEDY_MARGIN, (
            f"{family}: reference top-2 margin {margin:.2g} too small for a fair greedy comparison; reseed")
        assert completion.token_ids == want, f"{family}, prompt of {len(prompt)} tokens"
        assert completion.finish_reason == "length"


BATCH_MAX_TOKENS = [8, 3, 6, 8]  # per prompt
SCENARIOS = {
    # all four prompts prefilled in one step, then decoded together
    "all-at-once": dict(max_num_seqs=8, max_batched_tokens=2048),
    # a budget of 4 tokens: the 7/13/20-token prompts prefill over several steps, next to decodes
    "chunked-prefill": dict(max_num_seqs=8, max_batched_tokens=4),
    # two KV slots for four requests: two join only when earlier ones finish
    "two-slots": dict(max_num_seqs=2, max_batched_tokens=2048),
    "two-slots-chunked": dict(max_num_seqs=2, max_batched_tokens=5),
}


def _schedule_facts(steps: list[list[tuple[int, int, int]]]) -> dict[str, bool | int]:
    return dict(
        max_seqs=max(len(s) for s in steps),
        max_tokens=max(sum(n for _, _, n in s) for s in steps),
        # a later chunk of a prompt (start > 0, several tokens)
        chunked_prefill=any(start > 0 and n > 1 for s in steps for _, start, n in s),
        # a prompt whose first chunk runs next to a decode of an earlier request
        joined_running_batch=any(
            any(start == 0 for _, start, _ in s) and any(start > 0 and n == 1 for _, start, n in s) for s in steps),
        prefills=sum(1 for s in steps for _, start, _ in s if start == 0),
        slots=len({slot for s in steps for slot, _, _ in s}),
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_alone(get_ref, family, scenario):
    ref = get_ref(family)
    alone_engine = engine(ref.ckpt, max_num_seqs=1)
    # Different lengths, so that requests finish at different steps and others join mid-flight.
    params = [greedy_params(n) for n in BATCH_MAX_TOKENS]
    alone = [alone_engine.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    assert [len(t) for t in alone] == BATCH_MAX_TOKENS
    kw = SCENARIOS[scenario]
    eng = engine(ref.ckpt, **kw)
    steps = record_steps(eng)
    got = [c.token_ids for c in eng.generate(PROMPTS, params)]
    assert got == alone

    facts = _schedule_facts(steps)
    assert facts["max_seqs"] <= kw["max_num_seqs"] and facts["max_tokens"] <= kw["max_batched_tokens"]
    assert facts["prefills"] == len(PROMPTS)  # each prompt started once
    if scenario == "all-at-once":
        assert steps[0] == [(i, 0, len(p)) for i, p in enumerate(PROMPTS)]
        assert len(steps) == max(BATCH_MAX_TOKENS)  # the first token comes from the prefill step
        assert not facts["chunked_prefill"]
    if "chunked" in scenario:
        assert facts["chunked_prefill"], steps
    if "two-slots" in scenario:
        assert facts["slots"] == 2 and facts["joined_running_batch"], steps


# --- 3. dtype conversion -----------------------------------------------------------------------------


def _bf16_checkpoint(ref: Reference, directory: Path) -> tuple[Path, torch.nn.Module]:
    """Save the reference in bf16; return the checkpoint and the reference with bf16-rounded weights (fp32)."""
    if ref.hf_causal_lm:
        copy.deepcopy(ref.model).to(torch.bfloat16).save_pretrained(directory)
        rounded = type(ref.model).from_pretrained(directory, dtype=torch.float32).eval()
        return directory, rounded
    write_deepseek_checkpoint(ref, directory, dtype=torch.bfloat16)
    rounded = copy.deepcopy(ref.model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return directory, rounded


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_checkpoint(get_ref, family, tmp_path):
    ref = get_ref(family)
    ckpt, rounded = _bf16_checkpoint(ref, tmp_path / "bf16")
    ck = Checkpoint(ckpt)
    assert ck.spec.dtype == "bfloat16"
    stored = {ck.read(name).dtype for name in ck.weight_map}
    assert torch.bfloat16 in stored, stored  # really a bf16 checkpoint (routers may stay fp32)
    ref_rounded = copy.copy(ref)
    if not ref.hf_causal_lm:
        ref_rounded.lm_head = ref.lm_head.to(torch.bfloat16).float()

    # Loaded and computed in fp32: exactly the bf16-rounded weights.
    _, ours = our_logits(engine(ckpt, dtype="float32"), LONG_PROMPT, "prefixes")
    exact = ref_rounded.logits(LONG_PROMPT, rounded)
    assert (ours - exact).abs().max().item() <= LOGIT_ATOL
    # ... and close to the fp32 original.
    fp32 = ref.logits(LONG_PROMPT)
    scale = fp32.abs().max().item()
    diff = (ours - fp32).abs().max().item()
    assert 0 < diff <= BF16_WEIGHTS_RTOL * scale, (diff, scale)
    # Computing in bf16 as well: looser still.
    bf16_engine = engine(ckpt, dtype="bfloat16")
    assert bf16_engine.model.dtype == torch.bfloat16
    _, ours_bf16 = our_logits(bf16_engine, LONG_PROMPT, "prefixes")
    assert ours_bf16.dtype == torch.float32 and not torch.equal(ours_bf16, ours)
    diff = (ours_bf16 - fp32).abs().max().item()
    assert diff <= BF16_COMPUTE_RTOL * scale, (diff, scale)


# --- 4. DeepSeek-MoE checkpoint layouts ---------------------------------------------------------------


def test_deepseek_reference_fused_experts_are_gate_rows_first(get_ref):
    """The fused [E, 2I, H] layout our writer splits holds gate rows first, then up rows."""
    ref = get_ref("deepseek")
    moe = ref.model.layers[1].mlp
    assert isinstance(moe, DeepseekOcr2TextMoe)
    I, E = DEEPSEEK_MOE_I, moe.experts.num_experts
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    e = 3
    idx = torch.tensor([[e, (e + 1) % E]] * 5)
    w = torch.tensor([[1.0, 0.0]] * 5)
    with torch.no_grad():
        got = moe.experts(x, idx, w)
        gu, down = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
        gate_first = F.linear(F.silu(F.linear(x, gu[:I])) * F.linear(x, gu[I:]), down)
        up_first = F.linear(F.silu(F.linear(x, gu[I:])) * F.linear(x, gu[:I]), down)
    torch.testing.assert_close(got, gate_first, atol=1e-5, rtol=1e-5)
    assert (got - up_first).abs().max() > 1e-2


@pytest.mark.parametrize("layout,shards", [("fused", 1), ("per_expert", 2), ("per_expert", 3), ("fused", 2)],
                         ids=["fused", "per_expert-2shards", "per_expert-3shards", "fused-2shards"])
def test_deepseek_checkpoint_layouts_give_identical_logits(get_ref, tmp_path, layout, shards):
    ref = get_ref("deepseek")
    ckpt = write_deepseek_checkpoint(ref, tmp_path / "ckpt", layout=layout, shards=shards)
    ck = Checkpoint(ckpt)
    moe_layer = 1
    assert ck.expert_layout(moe_layer) == layout
    if shards > 1:
        assert (ckpt / "model.safetensors.index.json").exists() and not (ckpt / "model.safetensors").exists()
        assert len(set(ck.weight_map.values())) == shards
    _, base = our_logits(engine(ref.ckpt), LONG_PROMPT, "prefixes")  # per-expert, one file
    _, ours = our_logits(engine(ckpt), LONG_PROMPT, "prefixes")
    # Equal values in differently aligned memory: a BLAS may sum in another order on some CPUs (fp32 rounding).
    torch.testing.assert_close(ours, base, rtol=1e-5, atol=1e-5)
    assert (ours - ref.logits(LONG_PROMPT)).abs().max().item() <= LOGIT_ATOL


def test_deepseek_checkpoint_writer_names(get_ref):
    """Our deepseek checkpoint uses DeepSeek-MoE's names (what real checkpoints hold)."""
    ref = get_ref("deepseek")
    with safe_open(ref.ckpt / "model.safetensors", "pt") as f:
        names = set(f.keys())
    E, I, H = 8, DEEPSEEK_MOE_I, HIDDEN
    for e in range(E):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in names
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer 0
    assert not any("gate_up_proj" in n for n in names) and "lm_head.weight" in names
    spec = load_spec(ref.ckpt)
    assert spec.moe.shared_intermediate_size == 2 * I and not spec.moe.norm_topk_prob
    assert spec.moe_layers == (1, 2) and spec.hidden_size == H


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_transformers_native_fused_layout(get_ref, tmp_path, family):
    """`save_pretrained(save_original_format=False)`: transformers 5's in-memory (fused) names."""
    ref = get_ref(family)
    ref.model.save_pretrained(tmp_path, save_original_format=False)
    ck = Checkpoint(tmp_path)
    assert ck.expert_layout(ck.spec.moe_layers[0]) == "fused"
    _, ours = our_logits(engine(tmp_path), LONG_PROMPT, "prefixes")
    assert (ours - ref.logits(LONG_PROMPT)).abs().max().item() <= LOGIT_ATOL


# --- 5. sampling -----------------------------------------------------------------------------------------

SAMPLING_FAMILY = "mixtral"


@pytest.fixture(scope="module")
def sampling_engine(get_ref):
    return engine(get_ref(SAMPLING_FAMILY).ckpt)


def sampled(temperature=1.0, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def test_seeded_sampling_same_alone_and_in_batch(sampling_engine):
    a, b = PROMPTS[2], PROMPTS[1]
    alone_a = sampling_engine.generate([a], sampled(seed=11))[0].token_ids
    alone_b = sampling_engine.generate([b], sampled(temperature=0.7, top_p=0.9, seed=12))[0].token_ids
    batch = sampling_engine.generate(
        [PROMPTS[3], a, PROMPTS[0], b, a],
        [sampled(seed=99), sampled(seed=11), greedy_params(), sampled(temperature=0.7, top_p=0.9, seed=12),
         sampled(seed=None)])
    assert batch[1].token_ids == alone_a
    assert batch[3].token_ids == alone_b
    # and again, unchanged
    assert sampling_engine.generate([a], sampled(seed=11))[0].token_ids == alone_a


def test_different_seeds_give_different_samples(sampling_engine):
    p = PROMPTS[1]
    runs = [tuple(sampling_engine.generate([p], sampled(temperature=1.5, seed=s))[0].token_ids) for s in range(4)]
    assert len(set(runs)) == 4, runs
    greedy = tuple(sampling_engine.generate([p], greedy_params())[0].token_ids)
    assert any(r != greedy for r in runs)  # sampling is not silently greedy


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1, seed=5, max_tokens=MAX_NEW, ignore_eos=True),
    SamplingParams(temperature=2.0, top_k=1, seed=6, max_tokens=MAX_NEW, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=1e-6, seed=7, max_tokens=MAX_NEW, ignore_eos=True),
    SamplingParams(temperature=0.0, seed=8, max_tokens=MAX_NEW, ignore_eos=True),
], ids=["top_k=1", "top_k=1-hot", "top_p=tiny", "greedy-with-seed"])
def test_degenerate_sampling_is_greedy(sampling_engine, params):
    greedy = sampling_engine.generate(PROMPTS, greedy_params())
    got = sampling_engine.generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in greedy]


@pytest.mark.parametrize("params", [
    greedy_params(logprobs=True),
    sampled(temperature=0.7, seed=3, logprobs=True),
], ids=["greedy", "sampled-t0.7"])
def test_logprobs_match_reference(get_ref, sampling_engine, params):
    """Log-probabilities of the chosen tokens under the unscaled reference distribution."""
    ref = get_ref(SAMPLING_FAMILY)
    completions = sampling_engine.generate(PROMPTS, params)
    for prompt, c in zip(PROMPTS, completions):
        assert len(c.logprobs) == len(c.token_ids) == MAX_NEW
        assert all(lp <= 0.0 for lp in c.logprobs)
        full = prompt + c.token_ids
        # logits at the positions that predicted each generated token
        logp = torch.log_softmax(ref.logits(full)[len(prompt) - 1 : -1], dim=-1)
        want = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=LOGPROB_ATOL, rtol=0), (c.logprobs, want)
        if params.greedy:
            assert c.token_ids == logp.argmax(-1).tolist()
    if not params.greedy:  # a sampled run should not be just the argmax everywhere
        assert any(c.logprobs != pytest.approx([0.0] * MAX_NEW, abs=1e-3) for c in completions)
