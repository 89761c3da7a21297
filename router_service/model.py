"""The router's part of the model: embeddings, attention, norms, gates, shared experts, LM head.

Routed experts are not here: each MoE layer hands the gate's choices to an
`ExpertDispatcher` (local or cluster) and adds what comes back. The forward
pass runs on a flat batch of tokens from many sequences (continuous batching):
everything but attention is per token; attention batches all single-token
(decode) sequences together and runs each prefill chunk on its own.

Attention is Llama-style (MHA/GQA: keys and values cached per kv head) or
DeepSeek's multi-head latent attention (MLA, `spec.mla`: the cache holds one
compressed latent plus a shared rope key per token; each step up-projects the
cached latents of the attended positions into per-head keys and values with
`kv_b_proj`, the simple form rather than absorbing `kv_b_proj` into the query).

Decoder norms are RMSNorm or, where `spec.norm` is "layer" (Phi-3.5-MoE), LayerNorm with a
bias; optional biases on the attention output and the LM head come from the spec as well.

Routing (`CausalLM.route`, the one gate code path) follows the spec's `MoESpec`, unless the
serving-time Switch option is on (`switch_capacity_factor`, see `switch_capacity_keep`).

Two-micro-batch overlap (`micro_batches` 2, as DeepSeek serves): a step's sequences split into two
micro-batches that take turns per layer, so that one's attention, gate and shared experts run while
the other's routed tokens are on the expert workers (`CausalLM.forward`).

Shape legend:
    T tokens in the step      S sequences in the step   B decode sequences
    H hidden                  Q query heads             N kv heads        D head dim
    E routed experts          K experts per token       V vocabulary      G expert groups
    MLA: R kv_lora_rank, Dn / Dr qk nope / rope head dim, Dv v_head_dim, L attended positions
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from expert_workers import kernels
from expert_workers.checkpoint import Checkpoint
from expert_workers.experts import swiglu
from expert_workers.kernels import linear
from expert_workers.spec import LongRopeScaling, MoESpec, ModelSpec
from router_service.dispatch import ExpertDispatcher, PendingExperts
from router_service.kv_cache import KVCache
from router_service.profiling import StepProfile
from router_service.telemetry import LoadWindow


@dataclass
class SeqChunk:
    """One sequence's tokens in this step: positions start .. start+n-1 of KV slot `slot`."""

    slot: int
    start: int
    n: int


@dataclass
class ForwardBatch:
    """A step's flat token batch plus what attention needs, built once per step."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] KV slot of each token
    chunks: list[SeqChunk]  # in token order
    last_index: torch.Tensor  # [S] row of each sequence's last token
    decode_rows: torch.Tensor | None = None  # [B] rows of single-token sequences
    decode_slots: list[int] = field(default_factory=list)
    decode_slot_ids: torch.Tensor | None = None  # [B] the same, as a tensor
    decode_lens: torch.Tensor | None = None  # [B] positions each decode sequence attends
    decode_len: int = 0  # longest decode context this step
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, decode_len] True where attended
    prefill: list[tuple[int, SeqChunk]] = field(default_factory=list)  # (first row, chunk)

    @classmethod
    def build(cls, chunks: list[SeqChunk], token_ids: list[int] | torch.Tensor, device: torch.device
              ) -> "ForwardBatch":
        positions, slots, last = [], [], []
        decode_rows, decode_slots, decode_lens, prefill = [], [], [], []
        row = 0
        for c in chunks:
            positions.extend(range(c.start, c.start + c.n))
            slots.extend([c.slot] * c.n)
            if c.n == 1:
                decode_rows.append(row)
                decode_slots.append(c.slot)
                decode_lens.append(c.start + 1)
            else:
                prefill.append((row, c))
            row += c.n
            last.append(row - 1)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        ids = token_ids.to(device) if isinstance(token_ids, torch.Tensor) else as_long(token_ids)
        batch = cls(ids, as_long(positions), as_long(slots), chunks, as_long(last), prefill=prefill)
        if decode_rows:
            batch.decode_rows = as_long(decode_rows)
            batch.decode_slots = decode_slots
            batch.decode_len = max(decode_lens)
            lens = as_long(decode_lens)
            batch.decode_slot_ids, batch.decode_lens = as_long(decode_slots), lens
            batch.decode_mask = (torch.arange(batch.decode_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return batch

    def select(self, indices: list[int]) -> "ForwardBatch":
        """The batch of only these chunks (indices into `chunks`, kept in the order given): a micro-batch."""
        starts = [0]
        for c in self.chunks:
            starts.append(starts[-1] + c.n)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in indices]).to(self.token_ids.device)  # [T']
        return ForwardBatch.build([self.chunks[i] for i in indices], self.token_ids[rows], self.token_ids.device)


# Fewest tokens in a step worth splitting into two micro-batches. Below it, a second round of
# messages per MoE layer has little router work to hide behind (a judgement, not a measured optimum).
MICRO_BATCH_MIN_TOKENS = 8


def split_micro_batches(chunks: list[SeqChunk], min_tokens: int = MICRO_BATCH_MIN_TOKENS
                        ) -> tuple[list[int], list[int]] | None:
    """Two micro-batches of whole chunks (indices into `chunks`, each in step order) with token counts as
    even as whole chunks allow, or None where the step should run unsplit (one sequence, < min_tokens tokens).

    Largest chunk first, each to the micro-batch with fewer tokens so far (ties: the first): e.g.
    chunk sizes 1 5 1 1 3 -> ([1, 3], [0, 2, 4]), 6 tokens against 5.
    """
    if len(chunks) < 2 or sum(c.n for c in chunks) < min_tokens:
        return None
    groups: tuple[list[int], list[int]] = ([], [])
    tokens = [0, 0]
    for i in sorted(range(len(chunks)), key=lambda i: -chunks[i].n):  # stable: equal sizes keep step order
        g = 0 if tokens[0] <= tokens[1] else 1
        groups[g].append(i)
        tokens[g] += chunks[i].n
    return sorted(groups[0]), sorted(groups[1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Variance in fp32 whatever the compute dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def decoder_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The decoder's norm: LayerNorm when it has a bias (spec.norm "layer"), else RMSNorm."""
    if bias is not None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return rms_norm(x, weight, eps)


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's gate in eval mode (transformers' `sparsemixer`, training=False): ids and weights [T, 2].

    Each pick is the best remaining logit; its weight is its softmax over the remaining experts
    whose logits are within the jitter band of it: (pick - logit) / max(|logit|, pick) <= 2 * eps.
    """
    picks, weights = [], []
    remaining = logits  # [T, E]; the first pick is set to -inf for the second
    for _ in range(2):
        best, best_id = remaining.max(dim=-1, keepdim=True)  # [T, 1]
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps  # [T, E], as the reference
        weights.append(remaining.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, best_id))
        picks.append(best_id)
        remaining = remaining.scatter(-1, best_id, float("-inf"))
    return torch.cat(picks, dim=-1), torch.cat(weights, dim=-1)


def switch_capacity_keep(expert: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Switch Transformer's expert capacity: which tokens [T] keep their top-1 expert `expert` [T].

    Each expert takes at most capacity = ceil(capacity_factor * T / E) of the T tokens dispatched
    together (a step, or a micro-batch); the earlier tokens of the flat batch keep their slot.
    E.g. T=6, E=2, factor 1.0: capacity 3;
    experts 0 0 0 0 1 0 -> keep T T T F T F (tokens 3 and 5 are the fourth and fifth for expert 0).
    """
    T = expert.shape[0]
    capacity = math.ceil(capacity_factor * T / num_experts)
    one_hot = F.one_hot(expert, num_experts)  # [T, E]
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # [T]: earlier tokens with the same expert
    return rank < capacity


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] of the rotated dims, and the factor on cos and sin (YaRN's attention factor).

    D is `spec.rope_dim` (MLA: only the Dr rope part of each head rotates). With YaRN the
    frequencies are blended as transformers' `_compute_yarn_parameters` does; with LongRoPE
    (short regime) each is divided by its short factor and cos and sin scaled by short_mscale.
    """
    D, base = spec.rope_dim, spec.rope_theta
    yarn = spec.rope_scaling
    if yarn is None:
        return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)), 1.0
    if isinstance(yarn, LongRopeScaling):
        factors = torch.tensor(yarn.short_factor, dtype=torch.float32)  # [D/2]
        return 1.0 / (factors * base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)), yarn.short_mscale
    pos_freqs = base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # [D/2]

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
        return D * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(yarn.beta_fast), dim_of(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 keep .. 1 interpolate
    keep = 1 - ramp
    inv_freq = 1.0 / (yarn.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, yarn.attention_factor


def deinterleave_rope(weight: torch.Tensor, head_width: int, rope: int) -> torch.Tensor:
    """Reorder the rotated rows of each head from interleaved pairs to halves.

    weight [heads * head_width, in], whose last `rope` rows per head hold pairs (x0, x1), (x2, x3), ..;
    returns the rows with those reordered to x0, x2, .., x1, x3, .. . DeepSeek rotates interleaved
    pairs; permuting q's and k's rows alike at load leaves every q.k product unchanged and lets
    the one rotate-half rope below serve both layouts.
    """
    nope = head_width - rope
    order = torch.cat([torch.arange(nope), nope + torch.arange(0, rope, 2), nope + torch.arange(1, rope, 2)])
    return weight.view(-1, head_width, weight.shape[-1])[:, order].reshape(weight.shape)


def limit_to_groups(choice: torch.Tensor, moe: MoESpec) -> torch.Tensor:
    """Choice scores [T, E] with every expert outside each token's `topk_group` best groups set to -inf.

    Experts form `n_group` contiguous groups; a group's score is its best choice score
    ("max", DeepSeek-V2's group_limited_greedy) or the sum of its best two ("top2_sum", DeepSeek-V3).
    """
    T, E = choice.shape
    grouped = choice.view(T, moe.n_group, E // moe.n_group)  # [T, G, E/G]
    if moe.group_score == "max":
        group_scores = grouped.max(dim=-1).values  # [T, G]
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = torch.topk(group_scores, moe.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [T, G]
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)


@dataclass
class MLAWeights:
    """One layer's multi-head latent attention projections (rope rows already de-interleaved)."""

    q: torch.Tensor | None  # q_proj [Q * (Dn + Dr), H]; None when the query is compressed
    q_a: torch.Tensor | None  # q_a_proj [Rq, H]
    q_a_norm: torch.Tensor | None  # q_a_layernorm [Rq]
    q_b: torch.Tensor | None  # q_b_proj [Q * (Dn + Dr), Rq]
    kv_a: torch.Tensor  # kv_a_proj_with_mqa [R + Dr, H]
    kv_a_norm: torch.Tensor  # kv_a_layernorm [R]
    kv_b: torch.Tensor  # kv_b_proj [Q * (Dn + Dv), R]

    def prepare_kernels(self) -> None:
        """Hand each projection to the CPU kernel that will multiply it (kernels.prepare_linear)."""
        for name in ("q", "q_a", "q_b", "kv_a", "kv_b"):
            if getattr(self, name) is not None:
                setattr(self, name, kernels.prepare_linear(getattr(self, name)))


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: torch.Tensor | None  # [(Q + 2N) * D, H]: q, k, v projections fused into one matmul; None for MLA
    qkv_bias: torch.Tensor | None  # [(Q + 2N) * D]
    o: torch.Tensor  # [H, Q * D]; MLA: [H, Q * Dv]
    mla: MLAWeights | None = None
    mlp_gate_up: torch.Tensor | None = None  # dense layer: [2I, H]
    mlp_down: torch.Tensor | None = None  # dense layer: [H, I]
    router: torch.Tensor | None = None  # MoE layer: gate [E, H], fp32
    router_score_bias: torch.Tensor | None = None  # [E] fp32, DeepSeek-V3's e_score_correction_bias
    shared_gate_up: torch.Tensor | None = None  # [2I_s, H]
    shared_down: torch.Tensor | None = None  # [H, I_s]
    shared_gate: torch.Tensor | None = None  # [1, H] (Qwen2-MoE)
    input_norm_bias: torch.Tensor | None = None  # [H], LayerNorm (spec.norm "layer")
    post_norm_bias: torch.Tensor | None = None  # [H]
    o_bias: torch.Tensor | None = None  # [H] (spec.o_proj_bias)

    def prepare_kernels(self) -> None:
        """Hand each linear's weight to the CPU kernel that will multiply it (kernels.prepare_linear): prepacked
        where the kernel wants its own layout, so these fields may hold a LinearWeight instead of a tensor.
        The gate stays a plain fp32 tensor (routing is computed in fp32, as the references do)."""
        for name in ("qkv", "o", "mlp_gate_up", "mlp_down", "shared_gate_up", "shared_down", "shared_gate"):
            if getattr(self, name) is not None:
                setattr(self, name, kernels.prepare_linear(getattr(self, name)))
        if self.mla is not None:
            self.mla.prepare_kernels()


def _read_mla(spec: ModelSpec, attn: str, read) -> MLAWeights:
    """One layer's MLA projections; interleaved rope rows are reordered to halves (see deinterleave_rope)."""
    mla, H, Q = spec.mla, spec.hidden_size, spec.num_heads
    R, Dr, Dq = mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_head_dim
    fix = (lambda w, width: deinterleave_rope(w, width, Dr)) if mla.rope_interleave else (lambda w, width: w)
    q = q_a = q_a_norm = q_b = None
    if mla.q_lora_rank is None:
        q = fix(read(f"{attn}.q_proj.weight", (Q * Dq, H)), Dq)
    else:
        Rq = mla.q_lora_rank
        q_a, q_a_norm = read(f"{attn}.q_a_proj.weight", (Rq, H)), read(f"{attn}.q_a_layernorm.weight", (Rq,))
        q_b = fix(read(f"{attn}.q_b_proj.weight", (Q * Dq, Rq)), Dq)
    return MLAWeights(
        q=q, q_a=q_a, q_a_norm=q_a_norm, q_b=q_b,
        kv_a=fix(read(f"{attn}.kv_a_proj_with_mqa.weight", (R + Dr, H)), R + Dr),
        kv_a_norm=read(f"{attn}.kv_a_layernorm.weight", (R,)),
        kv_b=read(f"{attn}.kv_b_proj.weight", (Q * (mla.qk_nope_head_dim + mla.v_head_dim), R)),
    )


class CausalLM:
    """Non-expert weights and the forward pass. Not an nn.Module: inference only, no autograd."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, dispatcher: ExpertDispatcher, max_model_len: int,
                 norm_bias: torch.Tensor | None = None, lm_head_bias: torch.Tensor | None = None):
        self.spec = spec
        self.embed = embed  # [V, H]
        self.layers = layers
        for lw in layers:
            lw.prepare_kernels()
        self.norm = norm  # [H]
        self.norm_bias = norm_bias  # [H], LayerNorm only
        self.lm_head = kernels.prepare_linear(lm_head)  # [V, H]
        self.lm_head_bias = lm_head_bias  # [V]
        self.dispatcher = dispatcher
        self.load: LoadWindow | None = None  # routing telemetry, when the router keeps it
        self.profile = StepProfile()  # where step time goes, when enabled (benchmarks)
        self.routing_bias: torch.Tensor | None = None  # [E] added to gate logits (skewed-load demos)
        # Switch routing (top-1 with expert capacity) instead of the family's gate; None: off.
        self.switch_capacity_factor: float | None = None
        # 2: split each step into two micro-batches pipelined across layers (see forward); 1: off.
        self.micro_batches = 1
        self.dtype = embed.dtype
        self.device = embed.device
        longrope = spec.rope_scaling if isinstance(spec.rope_scaling, LongRopeScaling) else None
        if longrope is not None and max_model_len > longrope.original_max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the {longrope.original_max_position_embeddings} positions that "
                "this model's LongRoPE ('rope_scaling') is served for: its long_factor regime is not supported")
        inv_freq, scale = rope_frequencies(spec)  # [D/2]
        angles = torch.outer(torch.arange(max_model_len, dtype=torch.float32), inv_freq)  # [M, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [M, D]
        cos, sin = angles.cos(), angles.sin()
        if scale != 1.0:  # YaRN's attention factor, LongRoPE's mscale
            cos, sin = cos * scale, sin * scale
        self.cos = cos.to(self.dtype).to(self.device)
        self.sin = sin.to(self.dtype).to(self.device)

    @classmethod
    def load(cls, checkpoint: Checkpoint, dispatcher: ExpertDispatcher, dtype: torch.dtype,
             device: torch.device | str = "cpu", max_model_len: int | None = None) -> "CausalLM":
        """Read every non-expert tensor (never a routed expert)."""
        spec = checkpoint.spec
        H, V, D, Q, N = spec.hidden_size, spec.vocab_size, spec.head_dim, spec.num_heads, spec.num_kv_heads

        def read(name, shape, dt=dtype):
            return checkpoint.read(name, shape, dt).to(device)

        embed = read("model.embed_tokens.weight", (V, H))
        layers = []
        for i in tqdm(range(spec.num_layers), desc="loading router weights", unit="layer", delay=2.0):
            p = spec.names.layer(i)
            attn = f"{p}.self_attn"
            norms = dict(input_norm=read(f"{p}.input_layernorm.weight", (H,)),
                         post_norm=read(f"{p}.post_attention_layernorm.weight", (H,)))
            if spec.norm == "layer":
                norms.update(input_norm_bias=read(f"{p}.input_layernorm.bias", (H,)),
                             post_norm_bias=read(f"{p}.post_attention_layernorm.bias", (H,)))
            if spec.mla is not None:
                lw = LayerWeights(**norms, qkv=None, qkv_bias=None, mla=_read_mla(spec, attn, read),
                                  o=read(f"{attn}.o_proj.weight", (H, Q * spec.mla.v_head_dim)))
            else:
                qkv = torch.cat([read(f"{attn}.q_proj.weight", (Q * D, H)), read(f"{attn}.k_proj.weight", (N * D, H)),
                                 read(f"{attn}.v_proj.weight", (N * D, H))])
                bias = None
                if spec.attention_bias:
                    bias = torch.cat([read(f"{attn}.q_proj.bias", (Q * D,)), read(f"{attn}.k_proj.bias", (N * D,)),
                                      read(f"{attn}.v_proj.bias", (N * D,))])
                lw = LayerWeights(**norms, qkv=qkv, qkv_bias=bias, o=read(f"{attn}.o_proj.weight", (H, Q * D)),
                                  o_bias=read(f"{attn}.o_proj.bias", (H,)) if spec.o_proj_bias else None)
            if spec.is_moe_layer(i):
                moe, names = spec.moe, spec.names
                gates = names.router_gates(i)
                gate = next((g for g in gates if g in checkpoint), gates[0])
                lw.router = read(gate, (moe.num_experts, H), torch.float32)
                if moe.score_correction_bias:
                    biases = names.router_score_biases(i)
                    bias_name = next((b for b in biases if b in checkpoint), biases[0])
                    lw.router_score_bias = read(bias_name, (moe.num_experts,), torch.float32)
                if moe.shared_intermediate_size:
                    s, Is = f"{names.moe(i)}.{names.shared_prefix}", moe.shared_intermediate_size
                    lw.shared_gate_up = torch.cat([read(f"{s}.gate_proj.weight", (Is, H)),
                                                   read(f"{s}.up_proj.weight", (Is, H))])
                    lw.shared_down = read(f"{s}.down_proj.weight", (H, Is))
                if moe.shared_expert_gated:
                    lw.shared_gate = read(f"{names.moe(i)}.{names.shared_gate}.weight", (1, H))
            else:
                m, I = f"{p}.mlp", spec.intermediate_size
                lw.mlp_gate_up = torch.cat([read(f"{m}.gate_proj.weight", (I, H)), read(f"{m}.up_proj.weight", (I, H))])
                lw.mlp_down = read(f"{m}.down_proj.weight", (H, I))
            layers.append(lw)
        norm = read("model.norm.weight", (H,))
        norm_bias = read("model.norm.bias", (H,)) if spec.norm == "layer" else None
        if spec.tie_word_embeddings and "lm_head.weight" not in checkpoint:
            lm_head = embed
        else:
            lm_head = read("lm_head.weight", (V, H))
        lm_head_bias = read("lm_head.bias", (V,)) if spec.lm_head_bias else None
        return cls(spec, embed, layers, norm, lm_head, dispatcher, max_model_len or spec.max_position_embeddings,
                   norm_bias=norm_bias, lm_head_bias=lm_head_bias)

    # --- forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits of each sequence's last token: [S, V] in fp32, rows in chunk order.

        With `micro_batches` 2 the step's sequences split into two micro-batches (`split_micro_batches`)
        that take turns layer by layer: a micro-batch's MoE layer is finished (its routed experts waited
        for) only after the other micro-batch has run its own finish, attention, gate, dispatch and shared
        experts, so the router computes one while the other's routed tokens are on the expert workers.
        Unsplit it is the same loop over one flow: each MoE layer waits right after its shared experts.
        """
        groups = split_micro_batches(batch.chunks) if self.micro_batches == 2 else None
        flows = [self._embed(b) for b in ([batch] if groups is None else [batch.select(g) for g in groups])]
        for i, lw in enumerate(self.layers):
            for flow in flows:
                self._finish_moe(flow)  # layer i-1 (with two flows, the other one ran since its dispatch)
                self._layer(i, lw, flow, kv)
        for flow in flows:
            self._finish_moe(flow)
        with self.profile("lm_head"):
            if groups is None:
                last = flows[0].x[batch.last_index]  # [S, H]
            else:  # the micro-batches' last rows, one after the other, put back in chunk order
                rows = torch.cat([f.x[f.batch.last_index] for f in flows])  # [S, H]
                order = torch.tensor(groups[0] + groups[1], device=rows.device)  # [S] chunk of each row
                last = torch.empty_like(rows).index_copy_(0, order, rows)
            last = decoder_norm(last, self.norm, self.norm_bias, self.spec.rms_norm_eps)
            return linear(last, self.lm_head, self.lm_head_bias).float()  # [S, V]

    def _embed(self, batch: ForwardBatch) -> "_Flow":
        cos, sin = self.cos[batch.positions, None, :], self.sin[batch.positions, None, :]  # [T, 1, D]
        return _Flow(batch, self.embed[batch.token_ids], cos, sin)

    def _layer(self, layer: int, lw: LayerWeights, flow: "_Flow", kv: KVCache) -> None:
        """Layer `layer` of one flow up to its MoE dispatch and shared experts (dense layers: to the end)."""
        eps, prof = self.spec.rms_norm_eps, self.profile
        with prof("attention"):
            h = decoder_norm(flow.x, lw.input_norm, lw.input_norm_bias, eps)
            flow.x = flow.x + self._attention(layer, lw, h, flow.cos, flow.sin, flow.batch, kv)
            h = decoder_norm(flow.x, lw.post_norm, lw.post_norm_bias, eps)
        if lw.router is not None:
            flow.moe = self._moe_start(layer, lw, h)
        else:
            with prof("dense_mlp"):
                flow.x = flow.x + swiglu(h, lw.mlp_gate_up, lw.mlp_down)

    def _finish_moe(self, flow: "_Flow") -> None:
        """Add the flow's MoE layer in flight, if any, to its residual stream."""
        if flow.moe is not None:
            flow.x = flow.x + self._moe_finish(flow.moe)
            flow.moe = None

    def _attention(self, layer: int, lw: LayerWeights, h: torch.Tensor, cos, sin, batch: ForwardBatch,
                   kv: KVCache) -> torch.Tensor:
        spec = self.spec
        Q, N, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        T = h.shape[0]
        if lw.mla is not None:
            q, entry = self._mla_project(lw.mla, h, cos, sin)  # [T, Q, Dn + Dr], [T, 1, R + Dr]
            kv.write(layer, batch.slots, batch.positions, entry)
            out = self._attend(q, layer, batch, kv, lambda keys, _: self._mla_expand(lw.mla, keys),
                               dict(scale=spec.mla.softmax_scale), spec.mla.v_head_dim)  # [T, Q, Dv]
            return linear(out.view(T, Q * spec.mla.v_head_dim), lw.o)  # [T, H]
        qkv = linear(h, lw.qkv, lw.qkv_bias)  # [T, (Q + 2N) * D]
        q, k, v = qkv.split([Q * D, N * D, N * D], dim=-1)
        q = q.view(T, Q, D)
        k = k.view(T, N, D)
        q = q * cos + rotate_half(q) * sin  # [T, Q, D]
        k = k * cos + rotate_half(k) * sin  # [T, N, D]
        kv.write(layer, batch.slots, batch.positions, k, v.view(T, N, D))
        out = self._attend(q, layer, batch, kv, None, dict(enable_gqa=Q != N), D)
        return linear(out.view(T, Q * D), lw.o, lw.o_bias)  # [T, H]

    def _attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch, kv: KVCache, expand, sdpa: dict,
                value_dim: int) -> torch.Tensor:
        """Attention of every query row over its sequence's cached positions: [T, Q, value_dim].

        `expand(cached keys, cached values)` turns what the cache holds for B sequences into
        keys [B, N, L, D] and values [B, N, L, value_dim]; None where the cache holds them as they are
        (MHA/GQA), which lets decode rows attend straight from the cache with the CPU kernel.
        """
        out = q.new_empty(q.shape[0], q.shape[1], value_dim)  # [T, Q, value_dim]
        direct = expand is None
        expand = expand or (lambda keys, values: (keys, values))
        if batch.decode_rows is not None and direct and kernels.attention_runs_here(q.dtype, q.device):
            scale = sdpa.get("scale") or q.shape[-1] ** -0.5
            out[batch.decode_rows] = kernels.decode_attention(q[batch.decode_rows], kv.k[layer], kv.v[layer],
                                                              batch.decode_slot_ids, batch.decode_lens, scale)
        elif batch.decode_rows is not None:
            keys, values = expand(*kv.read(layer, batch.decode_slots, batch.decode_len))  # [B, N, len, D]
            qd = q[batch.decode_rows].unsqueeze(2)  # [B, Q, 1, D]
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_mask, **sdpa)
            out[batch.decode_rows] = o.squeeze(2)
        for row, c in batch.prefill:
            keys, values = expand(*kv.read(layer, [c.slot], c.start + c.n))  # [1, N, start+n, D]
            qp = q[row : row + c.n].transpose(0, 1).unsqueeze(0)  # [1, Q, n, D]
            if c.start == 0:
                o = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, **sdpa)
            else:  # a later chunk of a prompt: query i sees keys up to start + i
                qpos = torch.arange(c.start, c.start + c.n, device=q.device)
                mask = torch.arange(c.start + c.n, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, **sdpa)
            out[row : row + c.n] = o[0].transpose(0, 1)
        return out

    def _mla_project(self, w: MLAWeights, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [T, Q, Dn + Dr] and the cache entries latent ‖ rope key [T, 1, R + Dr] of this step's tokens."""
        mla, eps = self.spec.mla, self.spec.rms_norm_eps
        T, Q, R, Dn = h.shape[0], self.spec.num_heads, mla.kv_lora_rank, mla.qk_nope_head_dim
        if w.q is not None:
            q = linear(h, w.q)  # [T, Q * (Dn + Dr)]
        else:
            q = linear(rms_norm(linear(h, w.q_a), w.q_a_norm, eps), w.q_b)  # [T, Rq] -> [T, Q * (Dn + Dr)]
        q = q.view(T, Q, mla.qk_head_dim)
        q_nope, q_rope = q.split([Dn, mla.qk_rope_head_dim], dim=-1)
        q_rope = q_rope * cos + rotate_half(q_rope) * sin  # [T, Q, Dr]
        latent, k_rope = linear(h, w.kv_a).split([R, mla.qk_rope_head_dim], dim=-1)  # [T, R], [T, Dr]
        latent = rms_norm(latent, w.kv_a_norm, eps)
        k_rope = k_rope * cos[:, 0] + rotate_half(k_rope) * sin[:, 0]  # [T, Dr]
        return torch.cat([q_nope, q_rope], dim=-1), torch.cat([latent, k_rope], dim=-1).unsqueeze(1)

    def _mla_expand(self, w: MLAWeights, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latent ‖ rope key [B, 1, L, R + Dr] -> keys [B, Q, L, Dn + Dr] and values [B, Q, L, Dv]."""
        mla, Q = self.spec.mla, self.spec.num_heads
        B, _, L, _ = entries.shape
        latent, k_rope = entries[:, 0].split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)  # [B, L, R], [B, L, Dr]
        kv = linear(latent, w.kv_b).view(B, L, Q, -1).transpose(1, 2)  # [B, Q, L, Dn + Dv]
        k_nope, values = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, Q, L, mla.qk_rope_head_dim)], dim=-1)
        return keys, values

    def set_routing_bias(self, bias: dict[int, float]) -> None:
        E = self.spec.moe.num_experts
        bad = [e for e in bias if not 0 <= e < E]
        if bad:
            raise ValueError(f"routing_bias names experts {bad} outside 0..{E - 1}")
        self.routing_bias = torch.zeros(E, device=self.device)
        for e, b in bias.items():
            self.routing_bias[e] = b

    def set_switch_capacity(self, capacity_factor: float | None) -> None:
        """Switch routing with this capacity factor from now on (None: the family's own gate)."""
        if capacity_factor is not None:
            if self.spec.moe is None:
                raise ValueError(f"switch_capacity_factor: {self.spec.model_type} has no MoE layers to route")
            if not capacity_factor > 0:
                raise ValueError(f"switch_capacity_factor must be positive, got {capacity_factor}")
        self.switch_capacity_factor = capacity_factor

    def route(self, lw: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate: top-k experts per token and their weights, [T, K] each (see MoESpec).

        With `switch_capacity_factor` set, Switch Transformer's gate replaces the family's: K = 1,
        the expert with the highest softmax probability, weighted by that probability (no
        renormalisation, scaling, groups or choice bias), and tokens beyond an expert's capacity
        among the tokens of `h` (`switch_capacity_keep`) get weight 0: they skip the experts, the
        residual carries them. `h` is one dispatch's tokens: the step's, or with `micro_batches` 2
        its micro-batch's, so the capacity is then per micro-batch. This changes outputs (an
        approximation for throughput), and since the capacity scales with the dispatch's token
        count, a sequence's output depends on the batch it runs in.
        """
        moe = self.spec.moe
        logits = F.linear(h.float(), lw.router)  # [T, E], fp32 as the references do
        if self.routing_bias is not None:
            logits = logits + self.routing_bias
        if self.switch_capacity_factor is not None:
            weights, ids = logits.softmax(dim=-1).max(dim=-1, keepdim=True)  # [T, 1]
            keep = switch_capacity_keep(ids[:, 0], moe.num_experts, self.switch_capacity_factor)  # [T]
            return ids, (weights * keep[:, None]).to(h.dtype)
        if moe.scoring_func == "sparsemixer":
            ids, weights = sparsemixer_top2(logits, moe.jitter_eps)  # [T, 2]
            return ids, weights.to(h.dtype)
        scores = logits.softmax(dim=-1) if moe.scoring_func == "softmax" else logits.sigmoid()  # [T, E]
        if moe.n_group == 1 and lw.router_score_bias is None:  # plain top-k on the scores
            weights, ids = torch.topk(scores, moe.top_k, dim=-1)  # [T, K]
        else:  # choose by biased and/or group-limited scores, weight by the plain scores
            choice = scores if lw.router_score_bias is None else scores + lw.router_score_bias  # [T, E]
            if moe.n_group > 1:
                choice = limit_to_groups(choice, moe)
            ids = torch.topk(choice, moe.top_k, dim=-1).indices  # [T, K]
            weights = scores.gather(1, ids)  # [T, K]
        if moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if moe.routed_scaling_factor != 1.0:
            weights = weights * moe.routed_scaling_factor
        return ids, weights.to(h.dtype)

    def _moe(self, layer: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """One MoE layer start to finish: [T, H] to add to the residual stream."""
        return self._moe_finish(self._moe_start(layer, lw, h))

    def _moe_start(self, layer: int, lw: LayerWeights, h: torch.Tensor) -> "_MoEInFlight":
        """Gate, send the routed tokens, run the shared experts while they are away."""
        prof = self.profile
        with prof("gate"):
            ids, weights = self.route(lw, h)
            kept = None
            if self.switch_capacity_factor is not None:
                # Overflow tokens (weight 0; a kept token's is its top probability, >= 1/E) are not sent.
                kept = (weights[:, 0] > 0).nonzero().squeeze(1)  # [T'] rows within capacity; capacity >= 1
                ids, weights = ids[kept], weights[kept]
        with prof("routed"):
            pending = self.dispatcher.dispatch(layer, h if kept is None else h[kept], ids, weights)
        if self.load is not None:
            with prof("gate"):
                self.load.add(layer, pending.experts)
        # Shared experts run while routed tokens are away.
        out = None
        with prof("shared_experts"):
            if lw.shared_gate_up is not None:
                out = swiglu(h, lw.shared_gate_up, lw.shared_down)  # [T, H]
                if lw.shared_gate is not None:
                    out = out * torch.sigmoid(linear(h, lw.shared_gate))
        return _MoEInFlight(pending, h, out, kept)

    def _moe_finish(self, moe: "_MoEInFlight") -> torch.Tensor:
        """Wait for the routed experts and add the shared ones: [T, H]."""
        with self.profile("routed"):
            routed = moe.pending.wait()  # [T, H]; Switch: [T', H] of the kept rows
            if moe.kept is not None:
                routed = moe.h.new_zeros(moe.h.shape).index_copy_(0, moe.kept, routed)
        return routed if moe.shared is None else routed + moe.shared


@dataclass
class _MoEInFlight:
    """One flow's MoE layer whose routed tokens are away: what finishing it needs."""

    pending: PendingExperts
    h: torch.Tensor  # [T, H] the layer's input (Switch: dropped rows get zeros of its shape)
    shared: torch.Tensor | None  # [T, H] shared experts' output; None without shared experts
    kept: torch.Tensor | None  # Switch: [T'] rows sent; None: every row


@dataclass
class _Flow:
    """A step's batch, or one micro-batch of it, on its way through the layers."""

    batch: ForwardBatch
    x: torch.Tensor  # [T, H] residual stream
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D]
    moe: _MoEInFlight | None = None  # its latest MoE layer until finished
