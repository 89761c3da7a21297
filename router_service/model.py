"""The router's part of the model: embeddings, attention, norms, gates, shared experts, LM head.

Routed experts are not here: each MoE layer hands the gate's choices to an
`ExpertDispatcher` (local or cluster) and adds what comes back. The forward
pass runs on a flat batch of tokens from many sequences (continuous batching):
everything but attention is per token; attention batches all single-token
(decode) sequences together and runs each prefill chunk on its own.

Shape legend:
    T tokens in the step      S sequences in the step   B decode sequences
    H hidden                  Q query heads             N kv heads        D head dim
    E routed experts          K experts per token       V vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from expert_workers.checkpoint import Checkpoint
from expert_workers.experts import swiglu
from expert_workers.spec import ModelSpec
from router_service.dispatch import ExpertDispatcher
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
    decode_len: int = 0  # longest decode context this step
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, decode_len] True where attended
    prefill: list[tuple[int, SeqChunk]] = field(default_factory=list)  # (first row, chunk)

    @classmethod
    def build(cls, chunks: list[SeqChunk], token_ids: list[int], device: torch.device) -> "ForwardBatch":
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
        batch = cls(as_long(token_ids), as_long(positions), as_long(slots), chunks, as_long(last), prefill=prefill)
        if decode_rows:
            batch.decode_rows = as_long(decode_rows)
            batch.decode_slots = decode_slots
            batch.decode_len = max(decode_lens)
            lens = as_long(decode_lens)
            batch.decode_mask = (torch.arange(batch.decode_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return batch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Variance in fp32 whatever the compute dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(Q + 2N) * D, H]: q, k, v projections fused into one matmul
    qkv_bias: torch.Tensor | None  # [(Q + 2N) * D]
    o: torch.Tensor  # [H, Q * D]
    mlp_gate_up: torch.Tensor | None = None  # dense layer: [2I, H]
    mlp_down: torch.Tensor | None = None  # dense layer: [H, I]
    router: torch.Tensor | None = None  # MoE layer: gate [E, H], fp32
    shared_gate_up: torch.Tensor | None = None  # [2I_s, H]
    shared_down: torch.Tensor | None = None  # [H, I_s]
    shared_gate: torch.Tensor | None = None  # [1, H] (Qwen2-MoE)


class CausalLM:
    """Non-expert weights and the forward pass. Not an nn.Module: inference only, no autograd."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, dispatcher: ExpertDispatcher, max_model_len: int):
        self.spec = spec
        self.embed = embed  # [V, H]
        self.layers = layers
        self.norm = norm  # [H]
        self.lm_head = lm_head  # [V, H]
        self.dispatcher = dispatcher
        self.load: LoadWindow | None = None  # routing telemetry, when the router keeps it
        self.profile = StepProfile()  # where step time goes, when enabled (benchmarks)
        self.routing_bias: torch.Tensor | None = None  # [E] added to gate logits (skewed-load demos)
        self.dtype = embed.dtype
        self.device = embed.device
        D = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # [D/2]
        angles = torch.outer(torch.arange(max_model_len, dtype=torch.float32), inv_freq)  # [M, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [M, D]
        self.cos = angles.cos().to(self.dtype).to(self.device)
        self.sin = angles.sin().to(self.dtype).to(self.device)

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
            qkv = torch.cat([read(f"{attn}.q_proj.weight", (Q * D, H)), read(f"{attn}.k_proj.weight", (N * D, H)),
                             read(f"{attn}.v_proj.weight", (N * D, H))])
            bias = None
            if spec.attention_bias:
                bias = torch.cat([read(f"{attn}.q_proj.bias", (Q * D,)), read(f"{attn}.k_proj.bias", (N * D,)),
                                  read(f"{attn}.v_proj.bias", (N * D,))])
            lw = LayerWeights(
                input_norm=read(f"{p}.input_layernorm.weight", (H,)),
                post_norm=read(f"{p}.post_attention_layernorm.weight", (H,)),
                qkv=qkv, qkv_bias=bias, o=read(f"{attn}.o_proj.weight", (H, Q * D)),
            )
            if spec.is_moe_layer(i):
                moe, names = spec.moe, spec.names
                gates = names.router_gates(i)
                gate = next((g for g in gates if g in checkpoint), gates[0])
                lw.router = read(gate, (moe.num_experts, H), torch.float32)
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
        if spec.tie_word_embeddings and "lm_head.weight" not in checkpoint:
            lm_head = embed
        else:
            lm_head = read("lm_head.weight", (V, H))
        return cls(spec, embed, layers, norm, lm_head, dispatcher, max_model_len or spec.max_position_embeddings)

    # --- forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits of each sequence's last token: [S, V] in fp32."""
        x = self.embed[batch.token_ids]  # [T, H]
        cos, sin = self.cos[batch.positions, None, :], self.sin[batch.positions, None, :]  # [T, 1, D]
        eps, prof = self.spec.rms_norm_eps, self.profile
        for i, lw in enumerate(self.layers):
            with prof("attention"):
                h = rms_norm(x, lw.input_norm, eps)
                x = x + self._attention(i, lw, h, cos, sin, batch, kv)
                h = rms_norm(x, lw.post_norm, eps)
            if lw.router is not None:
                x = x + self._moe(i, lw, h)
            else:
                with prof("dense_mlp"):
                    x = x + swiglu(h, lw.mlp_gate_up, lw.mlp_down)
        with prof("lm_head"):
            last = rms_norm(x[batch.last_index], self.norm, eps)  # [S, H]
            return F.linear(last, self.lm_head).float()  # [S, V]

    def _attention(self, layer: int, lw: LayerWeights, h: torch.Tensor, cos, sin, batch: ForwardBatch,
                   kv: KVCache) -> torch.Tensor:
        spec = self.spec
        Q, N, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        T = h.shape[0]
        qkv = F.linear(h, lw.qkv, lw.qkv_bias)  # [T, (Q + 2N) * D]
        q, k, v = qkv.split([Q * D, N * D, N * D], dim=-1)
        q = q.view(T, Q, D)
        k = k.view(T, N, D)
        q = q * cos + rotate_half(q) * sin  # [T, Q, D]
        k = k * cos + rotate_half(k) * sin  # [T, N, D]
        kv.write(layer, batch.slots, batch.positions, k, v.view(T, N, D))
        gqa = Q != N
        out = torch.empty_like(q)  # [T, Q, D]
        if batch.decode_rows is not None:
            keys, values = kv.read(layer, batch.decode_slots, batch.decode_len)  # [B, N, len, D]
            qd = q[batch.decode_rows].unsqueeze(2)  # [B, Q, 1, D]
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_mask, enable_gqa=gqa)
            out[batch.decode_rows] = o.squeeze(2)
        for row, c in batch.prefill:
            keys, values = kv.read(layer, [c.slot], c.start + c.n)  # [1, N, start+n, D]
            qp = q[row : row + c.n].transpose(0, 1).unsqueeze(0)  # [1, Q, n, D]
            if c.start == 0:
                o = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, enable_gqa=gqa)
            else:  # a later chunk of a prompt: query i sees keys up to start + i
                qpos = torch.arange(c.start, c.start + c.n, device=h.device)
                mask = torch.arange(c.start + c.n, device=h.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, enable_gqa=gqa)
            out[row : row + c.n] = o[0].transpose(0, 1)
        return F.linear(out.view(T, Q * D), lw.o)  # [T, H]

    def set_routing_bias(self, bias: dict[int, float]) -> None:
        E = self.spec.moe.num_experts
        bad = [e for e in bias if not 0 <= e < E]
        if bad:
            raise ValueError(f"routing_bias names experts {bad} outside 0..{E - 1}")
        self.routing_bias = torch.zeros(E, device=self.device)
        for e, b in bias.items():
            self.routing_bias[e] = b

    def route(self, lw: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate: top-k experts per token and their weights, [T, K] each."""
        moe = self.spec.moe
        logits = F.linear(h.float(), lw.router)  # [T, E], fp32 as the references do
        if self.routing_bias is not None:
            logits = logits + self.routing_bias
        scores = logits.softmax(dim=-1)
        weights, ids = torch.topk(scores, moe.top_k, dim=-1)  # [T, K]
        if moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if moe.routed_scaling_factor != 1.0:
            weights = weights * moe.routed_scaling_factor
        return ids, weights.to(h.dtype)

    def _moe(self, layer: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        prof = self.profile
        with prof("gate"):
            ids, weights = self.route(lw, h)
            if self.load is not None:
                self.load.add(layer, ids.flatten())
        with prof("routed"):
            pending = self.dispatcher.dispatch(layer, h, ids, weights)
        # Shared experts run while routed tokens are away.
        out = None
        with prof("shared_experts"):
            if lw.shared_gate_up is not None:
                out = swiglu(h, lw.shared_gate_up, lw.shared_down)  # [T, H]
                if lw.shared_gate is not None:
                    out = out * torch.sigmoid(F.linear(h, lw.shared_gate))
        with prof("routed"):
            routed = pending.wait()  # [T, H]
        return routed if out is None else routed + out
