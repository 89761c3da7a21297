"""The normalised model spec: one description of a checkpoint that every process reads.

Each supported family maps its Hugging Face `config.json` to a `ModelSpec`
(attention shape, which layers are MoE, how the router scores and picks
experts, shared experts, weight names). Nothing else in the project looks at
`model_type` or raw config keys; a new family is one parser function here.

Glossary (used the same way in code, metrics, proto and README):
    logical expert  one (layer, expert) pair of the checkpoint, e.g. (3, 17)
    routed expert   a logical expert picked per token by the gate (top-k)
    shared expert   an always-on FFN of an MoE layer; stays on the router
    replica         one loaded copy of a logical expert on one worker
    worker          one expert-worker process (Ray actor) hosting replicas
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config.json that cannot be served; the message names the field."""


@dataclass(frozen=True)
class MoESpec:
    """How an MoE layer routes tokens. Fields follow DeepSeek's terms.

    The gate turns logits [T, E] into scores (`scoring_func`), picks `top_k` experts per
    token by a choice score (the score, plus a per-layer bias when `score_correction_bias`),
    optionally only among the `topk_group` best of `n_group` contiguous expert groups, and
    weights each pick by its score (renormalised if `norm_topk_prob`, then times
    `routed_scaling_factor`).

    Phi-3.5-MoE's "sparsemixer" (`scoring_func`, eval mode) is a top-2 of its own: the first
    pick is the best logit, weighted by its softmax over the experts whose logits lie within a
    relative `jitter_eps` band of it ((best - logit) / max(|logit|, best) <= 2 * jitter_eps);
    the second is the best of the rest, weighted the same way among the rest. No renormalisation.

    Worked example of group-limited selection, E=8 in n_group=4
    groups {0,1} {2,3} {4,5} {6,7}, topk_group=2, top_k=4, group_score "max":
        scores          .30 .25 | .01 .01 | .20 .01 | .18 .04
        group scores    .30       .01       .20       .18      -> keep groups 0 and 2
        picks           experts 0, 1, 4, 5 (plain top-4 would take 6 at .18 instead of 5 at .01)
    """

    num_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    expert_intermediate_size: int  # width I of one routed expert's FFN
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies routed weights after selection
    shared_intermediate_size: int = 0  # width of the fused shared-expert FFN; 0 = none
    shared_expert_gated: bool = False  # Qwen2-MoE: shared output times sigmoid(gate(x))
    # "softmax" over experts | "sigmoid" per expert (DeepSeek-V3) | "sparsemixer" top-2 (Phi-3.5-MoE)
    scoring_func: str = "softmax"
    n_group: int = 1  # > 1: group-limited selection over this many contiguous expert groups
    topk_group: int = 1  # groups a token may pick experts from (when n_group > 1)
    group_score: str = "max"  # how a group is ranked: "max" choice score (V2) | "top2_sum" (V3)
    score_correction_bias: bool = False  # DeepSeek-V3: a per-layer bias [E] added to scores for the choice only
    jitter_eps: float = 0.0  # sparsemixer: relative width of the band of logits each pick's softmax runs over


@dataclass(frozen=True)
class WeightNames:
    """Where a family keeps each tensor in a checkpoint (templates take `layer`, `expert`)."""

    moe_prefix: str  # e.g. "model.layers.{layer}.mlp" or "...block_sparse_moe"
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_prefix: str | None = None  # relative to moe_prefix, e.g. "shared_experts"
    shared_gate: str | None = None  # relative to moe_prefix, e.g. "shared_expert_gate"

    def layer(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def moe(self, layer: int) -> str:
        return self.moe_prefix.format(layer=layer)

    def _moe_prefixes(self, layer: int) -> list[str]:
        # transformers 5 keeps every family's MoE block at `mlp` in memory and may save it there.
        return list(dict.fromkeys([self.moe(layer), f"model.layers.{layer}.mlp"]))

    def router_gates(self, layer: int) -> list[str]:
        """Candidates for the gate weight [E, H]; the first is the family's own name.

        transformers 5 keeps Phi-3.5-MoE's gate in memory as `mlp.router` (the last candidate).
        """
        return [f"{p}.gate.weight" for p in self._moe_prefixes(layer)] + [f"model.layers.{layer}.mlp.router.weight"]

    def router_score_biases(self, layer: int) -> list[str]:
        """Candidates for DeepSeek-V3's per-layer choice bias `e_score_correction_bias` [E]."""
        return [f"{p}.gate.e_score_correction_bias" for p in self._moe_prefixes(layer)]

    def expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: names of (gate, up, down) weights of one logical expert."""
        base = f"{self.moe(layer)}.experts.{expert}"
        return tuple(f"{base}.{p}.weight" for p in self.expert_proj)  # type: ignore[return-value]

    def fused_experts(self, layer: int) -> list[tuple[str, str]]:
        """Fused layout candidates: (gate_up [E, 2I, H], down [E, H, I]) as transformers 5 keeps them."""
        return [(f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj") for p in self._moe_prefixes(layer)]


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling, as DeepSeek-V2/V3 checkpoints ship (transformers' `rope_parameters` names).

    Frequencies of dims that turn fewer than `beta_slow` times over the original context are
    divided by `factor`, those turning more than `beta_fast` times are kept, with a linear ramp
    between; cos and sin are multiplied by `attention_factor`.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    attention_factor: float
    truncate: bool  # round the ramp's ends outwards to whole dims


@dataclass(frozen=True)
class LongRopeScaling:
    """Phi-3.5-MoE's LongRoPE, in its short regime: contexts up to `original_max_position_embeddings`.

    Each frequency is divided by its `short_factor` and cos and sin are multiplied by `short_mscale`,
    as transformers' PhimoeRotaryEmbedding does while the sequence fits the original context. Past
    it the reference switches to `long_factor`/`long_mscale` depending on the length of the whole
    forward call, which a continuous batch does not have; serving longer contexts is refused.
    """

    short_factor: tuple[float, ...]  # [D/2], one per rotated frequency
    short_mscale: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): only a compressed latent is cached.

    Per token (Q heads; weight names under `model.layers.N.self_attn`):
        q            q_proj(x), or q_b_proj(q_a_layernorm(q_a_proj(x)))      [Q, Dn + Dr]
        latent, kr   kv_a_proj_with_mqa(x) split into [R] and [Dr]; latent = kv_a_layernorm(latent)
        k_j, v_j     kv_b_proj(latent) per head j: nope key [Dn] and value [Dv]; key_j = nope key ‖ rope(kr)
    The KV cache holds latent ‖ rope(kr), R + Dr numbers per token and layer, instead of
    2 * Q * (Dn + Dv) for the expanded keys and values (DeepSeek-V3: 576 vs 32768).
    """

    q_lora_rank: int | None  # Rq; None: a single q_proj [Q * (Dn + Dr), H] (DeepSeek-V2-Lite)
    kv_lora_rank: int  # R: width of the cached latent
    qk_nope_head_dim: int  # Dn: the part of q and k without position
    qk_rope_head_dim: int  # Dr: the rotated part; one rope key shared by every head
    v_head_dim: int  # Dv
    rope_interleave: bool  # rope rotates pairs (x0, x1), (x2, x3), ... rather than the two halves
    softmax_scale: float  # 1 / sqrt(Dn + Dr), times YaRN's mscale(factor, mscale_all_dim)**2 when set

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the serving code needs to know about a model, family-independent."""

    model_type: str
    vocab_size: int
    hidden_size: int  # H
    num_layers: int
    num_heads: int
    num_kv_heads: int  # MLA: num_heads (keys and values are expanded per head)
    head_dim: int  # MLA: the query/key head dim Dn + Dr (values have mla.v_head_dim)
    intermediate_size: int  # width of the dense (non-MoE) MLP
    rms_norm_eps: float  # eps of every norm, RMSNorm or LayerNorm (`norm`)
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # q, k, v projections carry a bias (Qwen2, Phi-3.5-MoE)
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    moe: MoESpec | None
    moe_layers: tuple[int, ...]  # indices of MoE layers; the rest are dense
    names: WeightNames
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    mla: MLASpec | None = None  # multi-head latent attention; None: Llama-style MHA/GQA
    rope_scaling: YarnScaling | LongRopeScaling | None = None  # None: plain RoPE
    norm: str = "rms"  # decoder norms: "rms" RMSNorm (weight) | "layer" LayerNorm (weight and bias, Phi-3.5-MoE)
    o_proj_bias: bool = False  # the attention output projection carries a bias (Phi-3.5-MoE)
    lm_head_bias: bool = False  # the LM head carries a bias [V] (Phi-3.5-MoE's `lm_head_bias`)

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query and key head."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def logical_experts(self) -> list[tuple[int, int]]:
        """All (layer, expert) pairs, in layer-major order."""
        if self.moe is None:
            return []
        return [(l, e) for l in self.moe_layers for e in range(self.moe.num_experts)]

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def expert_bytes(self, element_size: int = 2) -> int:
        """Bytes of one routed expert's weights (gate, up, down)."""
        assert self.moe is not None
        return 3 * self.hidden_size * self.moe.expert_intermediate_size * element_size

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# --- config parsing -------------------------------------------------------------------


class _Config:
    """Typed reads from a config dict; every error names the field."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def get(self, key: str, kind: type, default: Any = ..., *, minimum: float | None = None):
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise ConfigError(f"config.json: required field '{key}' is missing")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config.json: field '{key}' must be {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"config.json: field '{key}' must be >= {minimum}, got {value!r}")
        return value


def _rope_parameters(cfg: _Config) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; older configs a top-level `rope_theta` and `rope_scaling`.
    params = {**(cfg.raw.get("rope_scaling") or {}), **(cfg.raw.get("rope_parameters") or {})}
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_theta(cfg: _Config, *, yarn: bool = False, longrope: bool = False) -> float:
    params = _rope_parameters(cfg)
    supported = ("default",) + (("yarn",) if yarn else ()) + (("longrope",) if longrope else ())
    if params["rope_type"] not in supported:
        raise ConfigError(f"config.json: field 'rope_scaling' type {params['rope_type']!r} is not supported "
                          f"for {cfg.raw.get('model_type')} (only {' or '.join(supported)} RoPE)")
    theta = params.get("rope_theta", cfg.raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def _longrope(cfg: _Config, head_dim: int) -> LongRopeScaling | None:
    """Phi-3.5-MoE's LongRoPE (short regime, see LongRopeScaling), or None for plain RoPE."""
    params = _rope_parameters(cfg)
    if params["rope_type"] != "longrope":
        return None
    short = params.get("short_factor")
    if (not isinstance(short, list) or len(short) != head_dim // 2
            or not all(isinstance(f, (int, float)) and f > 0 for f in short)):
        raise ConfigError(f"config.json: field 'rope_scaling' short_factor must be {head_dim // 2} positive numbers "
                          f"(one per rotated frequency), got {short!r}")
    mscale = params.get("short_mscale")
    if not isinstance(mscale, (int, float)) or mscale <= 0:
        raise ConfigError(f"config.json: field 'rope_scaling' short_mscale must be a positive number, got {mscale!r}")
    original = params.get("original_max_position_embeddings", cfg.raw.get("original_max_position_embeddings"))
    if not isinstance(original, int) or original < 1:
        raise ConfigError("config.json: field 'rope_scaling' needs original_max_position_embeddings, "
                          f"a positive integer, got {original!r}")
    return LongRopeScaling(short_factor=tuple(float(f) for f in short), short_mscale=float(mscale),
                           original_max_position_embeddings=original)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: _Config) -> tuple[YarnScaling | None, float]:
    """(YaRN scaling or None, the factor on the softmax scale), as transformers' DeepSeek-V2/V3 compute them."""
    params = _rope_parameters(cfg)
    if params["rope_type"] != "yarn":
        return None, 1.0
    sub = _Config(params)
    max_pos = cfg.get("max_position_embeddings", int, 4096, minimum=1)
    original = sub.get("original_max_position_embeddings", int, max_pos, minimum=1)
    factor = sub.get("factor", float, max_pos / original)
    if factor <= 0:
        raise ConfigError(f"config.json: field 'rope_scaling' factor must be positive, got {factor}")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    yarn = YarnScaling(factor=factor, original_max_position_embeddings=original,
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       attention_factor=float(attention_factor), truncate=bool(params.get("truncate", True)))
    return yarn, (_yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0)


def _eos_ids(cfg: _Config) -> tuple[int, ...]:
    eos = cfg.raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: _Config, names: WeightNames, *, attention_bias: bool = False,
            mla: MLASpec | None = None, longrope: bool = False) -> dict[str, Any]:
    """Fields shared by every decoder: Llama-style attention, or MLA when `mla` is given."""
    hidden = cfg.get("hidden_size", int, minimum=1)
    heads = cfg.get("num_attention_heads", int, minimum=1)
    if mla is not None:
        # MLA expands keys and values per head; `num_key_value_heads` and `head_dim` in its
        # configs describe nothing we use (transformers writes head_dim = qk_rope_head_dim).
        kv_heads, head_dim = heads, mla.qk_head_dim
    else:
        kv_heads = cfg.get("num_key_value_heads", int, heads, minimum=1)
        head_dim = cfg.get("head_dim", int, 0) or 0
    if not head_dim:
        if hidden % heads:
            raise ConfigError(
                f"config.json: field 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads})"
            )
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ConfigError(
            f"config.json: field 'num_attention_heads' ({heads}) is not a multiple of 'num_key_value_heads' ({kv_heads})"
        )
    act = cfg.raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: field 'hidden_act' {act!r} is not supported (only 'silu')")
    window = cfg.raw.get("sliding_window") if cfg.raw.get("use_sliding_window", True) else None
    return dict(
        model_type=cfg.get("model_type", str),
        vocab_size=cfg.get("vocab_size", int, minimum=1),
        hidden_size=hidden,
        num_layers=cfg.get("num_hidden_layers", int, minimum=1),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", int, minimum=1),
        rms_norm_eps=cfg.get("rms_norm_eps", float, 1e-6),
        rope_theta=_rope_theta(cfg, yarn=mla is not None, longrope=longrope),
        max_position_embeddings=cfg.get("max_position_embeddings", int, 4096, minimum=1),
        attention_bias=attention_bias,
        tie_word_embeddings=bool(cfg.raw.get("tie_word_embeddings", False)),
        dtype=str(cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "bfloat16"),
        bos_token_id=cfg.raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        sliding_window=window if window else None,
        names=names,
        mla=mla,
        rope_scaling=_yarn(cfg)[0] if mla is not None else _longrope(cfg, head_dim) if longrope else None,
    )


def _check_top_k(top_k: int, num_experts: int, top_k_field: str, experts_field: str) -> None:
    if top_k > num_experts:
        raise ConfigError(
            f"config.json: field '{top_k_field}' ({top_k}) exceeds '{experts_field}' ({num_experts})"
        )


def _llama(cfg: _Config) -> ModelSpec:
    base = _common(cfg, WeightNames(moe_prefix="model.layers.{layer}.mlp"),
                   attention_bias=bool(cfg.raw.get("attention_bias", False)))
    return ModelSpec(moe=None, moe_layers=(), **base)


def _deepseek_moe_layers(cfg: _Config, layers: int) -> tuple[int, ...]:
    """DeepSeek's rule (every generation): layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    first_dense = cfg.get("first_k_dense_replace", int, 0, minimum=0)
    freq = cfg.get("moe_layer_freq", int, 1, minimum=1)
    if first_dense > layers:
        raise ConfigError(
            f"config.json: field 'first_k_dense_replace' ({first_dense}) exceeds 'num_hidden_layers' ({layers})"
        )
    return tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)


def _deepseek_experts(cfg: _Config) -> tuple[int, int, int, int]:
    """(routed experts, top-k, expert width, shared width) as every DeepSeek generation names them."""
    experts = cfg.get("n_routed_experts", int, minimum=1)
    top_k = cfg.get("num_experts_per_tok", int, minimum=1)
    _check_top_k(top_k, experts, "num_experts_per_tok", "n_routed_experts")
    width = cfg.get("moe_intermediate_size", int, minimum=1)
    shared = cfg.get("n_shared_experts", int, 0, minimum=0)
    return experts, top_k, width, width * shared


def _deepseek(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.mlp", shared_prefix="shared_experts")
    base = _common(cfg, names)
    experts, top_k, width, shared = _deepseek_experts(cfg)
    scoring = cfg.raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"config.json: field 'scoring_func' {scoring!r} is not supported for deepseek (softmax)")
    moe = MoESpec(
        num_experts=experts,
        top_k=top_k,
        expert_intermediate_size=width,
        norm_topk_prob=bool(cfg.raw.get("norm_topk_prob", False)),
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 1.0),
        shared_intermediate_size=shared,
    )
    return ModelSpec(moe=moe, moe_layers=_deepseek_moe_layers(cfg, base["num_layers"]), **base)


def _mla(cfg: _Config, *, rope_interleave: bool) -> MLASpec:
    if cfg.raw.get("attention_bias"):
        raise ConfigError("config.json: field 'attention_bias' true is not supported with multi-head latent attention")
    if "q_lora_rank" not in cfg.raw:  # transformers would silently assume 1536
        raise ConfigError("config.json: required field 'q_lora_rank' is missing (null: no query compression)")
    rope = cfg.get("qk_rope_head_dim", int, minimum=2)
    if rope % 2:
        raise ConfigError(f"config.json: field 'qk_rope_head_dim' must be even (rope rotates pairs), got {rope}")
    nope = cfg.get("qk_nope_head_dim", int, minimum=1)
    return MLASpec(
        q_lora_rank=cfg.get("q_lora_rank", int, None, minimum=1),
        kv_lora_rank=cfg.get("kv_lora_rank", int, minimum=1),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=cfg.get("v_head_dim", int, minimum=1),
        rope_interleave=rope_interleave,
        softmax_scale=(nope + rope) ** -0.5 * _yarn(cfg)[1],
    )


def _expert_groups(cfg: _Config, experts: int, top_k: int, *, min_size: int, defaults: tuple[Any, Any] = (..., ...)
                   ) -> tuple[int, int]:
    """(n_group, topk_group), checked against the expert count and top-k."""
    n_group = cfg.get("n_group", int, defaults[0], minimum=1)
    topk_group = cfg.get("topk_group", int, defaults[1], minimum=1)
    if experts % n_group:
        raise ConfigError(f"config.json: field 'n_routed_experts' ({experts}) is not a multiple of 'n_group' ({n_group})")
    if topk_group > n_group:
        raise ConfigError(f"config.json: field 'topk_group' ({topk_group}) exceeds 'n_group' ({n_group})")
    size = experts // n_group
    if size < min_size:
        raise ConfigError(
            f"config.json: field 'n_group' ({n_group}) leaves {size} expert(s) per group; group scores need {min_size}")
    if top_k > topk_group * size:
        raise ConfigError(
            f"config.json: field 'num_experts_per_tok' ({top_k}) exceeds the {topk_group * size} experts "
            f"of 'topk_group' ({topk_group}) groups")
    return n_group, topk_group


def _deepseek_v2(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.mlp", shared_prefix="shared_experts")
    # DeepSeek-V2 always rotates interleaved pairs (transformers' V2 has no rope_interleave switch).
    base = _common(cfg, names, mla=_mla(cfg, rope_interleave=True))
    experts, top_k, width, shared = _deepseek_experts(cfg)
    scoring = cfg.raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"config.json: field 'scoring_func' {scoring!r} is not supported for deepseek_v2 (softmax)")
    method = cfg.raw.get("topk_method", "greedy")
    if method == "greedy":
        n_group = topk_group = 1
    elif method == "group_limited_greedy":
        n_group, topk_group = _expert_groups(cfg, experts, top_k, min_size=1)
    else:
        raise ConfigError(
            f"config.json: field 'topk_method' {method!r} is not supported for deepseek_v2 "
            "('greedy' or 'group_limited_greedy')")
    scale = cfg.get("routed_scaling_factor", float, 1.0)
    # DeepSeek-V2's gate renormalises the top-k weights *instead of* scaling them
    # (modeling_deepseek.py: `if top_k > 1 and norm_topk_prob: w /= w.sum() else: w *= scale`).
    # transformers' V2 ignores norm_topk_prob; released V2 checkpoints all set it false,
    # where the two agree.
    norm = bool(cfg.raw.get("norm_topk_prob", False)) and top_k > 1
    moe = MoESpec(
        num_experts=experts, top_k=top_k, expert_intermediate_size=width, norm_topk_prob=norm,
        routed_scaling_factor=1.0 if norm else scale, shared_intermediate_size=shared,
        n_group=n_group, topk_group=topk_group, group_score="max",
    )
    return ModelSpec(moe=moe, moe_layers=_deepseek_moe_layers(cfg, base["num_layers"]), **base)


def _deepseek_v3(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.mlp", shared_prefix="shared_experts")
    base = _common(cfg, names, mla=_mla(cfg, rope_interleave=bool(cfg.raw.get("rope_interleave", True))))
    experts, top_k, width, shared = _deepseek_experts(cfg)
    # DeepSeek-V3's configs spell out the one method it has; transformers reads neither field.
    for key, only in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        value = cfg.raw.get(key, only)
        if value != only:
            raise ConfigError(f"config.json: field '{key}' {value!r} is not supported for deepseek_v3 ({only!r})")
    # Defaults are transformers' (DeepseekV3Config); top-2 group scores need groups of two or more.
    n_group, topk_group = _expert_groups(cfg, experts, top_k, min_size=2, defaults=(8, 4))
    moe = MoESpec(
        num_experts=experts, top_k=top_k, expert_intermediate_size=width,
        norm_topk_prob=bool(cfg.raw.get("norm_topk_prob", True)),
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 2.5), shared_intermediate_size=shared,
        scoring_func="sigmoid", n_group=n_group, topk_group=topk_group, group_score="top2_sum",
        score_correction_bias=True,
    )
    return ModelSpec(moe=moe, moe_layers=_deepseek_moe_layers(cfg, base["num_layers"]), **base)


def _mixtral(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.block_sparse_moe", expert_proj=("w1", "w3", "w2"))
    base = _common(cfg, names)
    experts = cfg.get("num_local_experts", int, minimum=1)
    top_k = cfg.get("num_experts_per_tok", int, minimum=1)
    _check_top_k(top_k, experts, "num_experts_per_tok", "num_local_experts")
    # Mixtral's experts have the model's intermediate size and there is no dense MLP.
    moe = MoESpec(num_experts=experts, top_k=top_k, expert_intermediate_size=base["intermediate_size"],
                  norm_topk_prob=True)
    return ModelSpec(moe=moe, moe_layers=tuple(range(base["num_layers"])), **base)


def _phimoe(cfg: _Config) -> ModelSpec:
    """Phi-3.5-MoE: Mixtral's layout and weight names, LayerNorms with bias, sparsemixer top-2 routing."""
    names = WeightNames(moe_prefix="model.layers.{layer}.block_sparse_moe", expert_proj=("w1", "w3", "w2"))
    bias = bool(cfg.raw.get("attention_bias", False))
    base = _common(cfg, names, attention_bias=bias, longrope=True)
    base["rms_norm_eps"] = cfg.get("rms_norm_eps", float, 1e-5)  # PhimoeConfig's default, not Llama's
    experts = cfg.get("num_local_experts", int, minimum=2)
    # sparsemixer always picks two experts (transformers ignores num_experts_per_tok); refuse any other count
    top_k = cfg.get("num_experts_per_tok", int, 2)
    if top_k != 2:
        raise ConfigError(
            f"config.json: field 'num_experts_per_tok' must be 2 for phimoe (sparsemixer top-2), got {top_k}")
    moe = MoESpec(num_experts=experts, top_k=2, expert_intermediate_size=base["intermediate_size"],
                  norm_topk_prob=False, scoring_func="sparsemixer",
                  jitter_eps=cfg.get("router_jitter_noise", float, 0.01, minimum=0.0))
    return ModelSpec(moe=moe, moe_layers=tuple(range(base["num_layers"])), norm="layer", o_proj_bias=bias,
                     lm_head_bias=bool(cfg.raw.get("lm_head_bias", False)), **base)


def _qwen2_moe(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.mlp", shared_prefix="shared_expert",
                        shared_gate="shared_expert_gate")
    base = _common(cfg, names, attention_bias=bool(cfg.raw.get("qkv_bias", True)))
    experts = cfg.get("num_experts", int, minimum=1)
    top_k = cfg.get("num_experts_per_tok", int, minimum=1)
    _check_top_k(top_k, experts, "num_experts_per_tok", "num_experts")
    step = cfg.get("decoder_sparse_step", int, 1, minimum=1)
    dense_only = set(cfg.raw.get("mlp_only_layers") or [])
    layers = base["num_layers"]
    bad = sorted(i for i in dense_only if not (isinstance(i, int) and 0 <= i < layers))
    if bad:
        raise ConfigError(f"config.json: field 'mlp_only_layers' names layers {bad} outside 0..{layers - 1}")
    moe = MoESpec(
        num_experts=experts,
        top_k=top_k,
        expert_intermediate_size=cfg.get("moe_intermediate_size", int, minimum=1),
        norm_topk_prob=bool(cfg.raw.get("norm_topk_prob", False)),
        shared_intermediate_size=cfg.get("shared_expert_intermediate_size", int, 0, minimum=0),
        shared_expert_gated=True,
    )
    moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return ModelSpec(moe=moe, moe_layers=moe_layers, **base)


FAMILIES: dict[str, Callable[[_Config], ModelSpec]] = {
    "llama": _llama,
    "deepseek": _deepseek,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "phimoe": _phimoe,
}


def spec_from_config(raw: dict[str, Any]) -> ModelSpec:
    """Map a Hugging Face config dict to the normalised spec, or raise ConfigError naming the field."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"config.json: field 'model_type' {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    spec = FAMILIES[model_type](_Config(raw))
    if not math.isfinite(spec.rms_norm_eps) or spec.rms_norm_eps <= 0:
        raise ConfigError(f"config.json: field 'rms_norm_eps' must be positive, got {spec.rms_norm_eps}")
    return spec


def load_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    return spec_from_config(raw)
