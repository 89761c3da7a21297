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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config.json that cannot be served; the message names the field."""


@dataclass(frozen=True)
class MoESpec:
    """How an MoE layer routes tokens. Fields follow DeepSeek-MoE's terms."""

    num_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    expert_intermediate_size: int  # width I of one routed expert's FFN
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies routed weights after selection
    shared_intermediate_size: int = 0  # width of the fused shared-expert FFN; 0 = none
    shared_expert_gated: bool = False  # Qwen2-MoE: shared output times sigmoid(gate(x))


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
        """Candidates for the gate weight [E, H]; the first is the family's own name."""
        return [f"{p}.gate.weight" for p in self._moe_prefixes(layer)]

    def expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: names of (gate, up, down) weights of one logical expert."""
        base = f"{self.moe(layer)}.experts.{expert}"
        return tuple(f"{base}.{p}.weight" for p in self.expert_proj)  # type: ignore[return-value]

    def fused_experts(self, layer: int) -> list[tuple[str, str]]:
        """Fused layout candidates: (gate_up [E, 2I, H], down [E, H, I]) as transformers 5 keeps them."""
        return [(f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj") for p in self._moe_prefixes(layer)]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the serving code needs to know about a model, family-independent."""

    model_type: str
    vocab_size: int
    hidden_size: int  # H
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of the dense (non-MoE) MLP
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # q, k, v projections carry a bias (Qwen2)
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    moe: MoESpec | None
    moe_layers: tuple[int, ...]  # indices of MoE layers; the rest are dense
    names: WeightNames
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

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


def _rope_theta(cfg: _Config) -> float:
    # transformers 5 writes `rope_parameters`; older configs a top-level `rope_theta`.
    params = cfg.raw.get("rope_parameters") or {}
    scaling = cfg.raw.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"config.json: field 'rope_scaling' type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", cfg.raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def _eos_ids(cfg: _Config) -> tuple[int, ...]:
    eos = cfg.raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: _Config, names: WeightNames, *, attention_bias: bool = False) -> dict[str, Any]:
    """Fields shared by every Llama-style decoder."""
    hidden = cfg.get("hidden_size", int, minimum=1)
    heads = cfg.get("num_attention_heads", int, minimum=1)
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
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", int, 4096, minimum=1),
        attention_bias=attention_bias,
        tie_word_embeddings=bool(cfg.raw.get("tie_word_embeddings", False)),
        dtype=str(cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "bfloat16"),
        bos_token_id=cfg.raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        sliding_window=window if window else None,
        names=names,
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


def _deepseek(cfg: _Config) -> ModelSpec:
    names = WeightNames(moe_prefix="model.layers.{layer}.mlp", shared_prefix="shared_experts")
    base = _common(cfg, names)
    experts = cfg.get("n_routed_experts", int, minimum=1)
    top_k = cfg.get("num_experts_per_tok", int, minimum=1)
    _check_top_k(top_k, experts, "num_experts_per_tok", "n_routed_experts")
    scoring = cfg.raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"config.json: field 'scoring_func' {scoring!r} is not supported for deepseek (softmax)")
    first_dense = cfg.get("first_k_dense_replace", int, 0, minimum=0)
    freq = cfg.get("moe_layer_freq", int, 1, minimum=1)
    layers = base["num_layers"]
    if first_dense > layers:
        raise ConfigError(
            f"config.json: field 'first_k_dense_replace' ({first_dense}) exceeds 'num_hidden_layers' ({layers})"
        )
    width = cfg.get("moe_intermediate_size", int, minimum=1)
    shared = cfg.get("n_shared_experts", int, 0, minimum=0)
    moe = MoESpec(
        num_experts=experts,
        top_k=top_k,
        expert_intermediate_size=width,
        norm_topk_prob=bool(cfg.raw.get("norm_topk_prob", False)),
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 1.0),
        shared_intermediate_size=width * shared,
    )
    moe_layers = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
    return ModelSpec(moe=moe, moe_layers=moe_layers, **base)


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
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
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
