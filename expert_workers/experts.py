"""Routed-expert compute: the one FFN that the router's local path and every worker run.

Shape legend:
    T  tokens in the batch        H  hidden size         I  expert width
    P  (token, expert) pairs       n  replicas hosted for one layer
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expert_workers.checkpoint import Checkpoint


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused. x [T, H], gate_up [2I, H], down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return F.linear(F.silu(gate) * up, down)  # [T, H]


class ExpertGroup:
    """Stacked weights of a set of hosted (layer, expert) replicas, run batched per expert.

    Per layer the hosted experts sit in one [n, 2I, H] and one [n, H, I] tensor;
    `slot` maps a logical expert id to its row there.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.gate_up: dict[int, torch.Tensor] = {}  # layer -> [n, 2I, H]
        self.down: dict[int, torch.Tensor] = {}  # layer -> [n, H, I]
        self.slot: dict[int, torch.Tensor] = {}  # layer -> [E] long, -1 where not hosted

    @classmethod
    def load(cls, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> "ExpertGroup":
        """Read only the hosted experts' tensors. `hosted` maps layer -> expert ids."""
        group = cls(device)
        for layer, experts in hosted.items():
            gate_up, down = checkpoint.read_experts(layer, sorted(experts), dtype)
            group.add(layer, sorted(experts), gate_up, down, checkpoint.spec.moe.num_experts)
        return group

    def add(self, layer: int, experts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
            num_experts: int) -> None:
        self.gate_up[layer] = gate_up.to(self.device).contiguous()
        self.down[layer] = down.to(self.device).contiguous()
        slot = torch.full((num_experts,), -1, dtype=torch.long)
        slot[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        self.slot[layer] = slot.to(self.device)

    def hosted(self) -> dict[int, list[int]]:
        return {l: (s >= 0).nonzero().flatten().tolist() for l, s in self.slot.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gate_up, self.down) for t in d.values())

    def run(self, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
            weight: torch.Tensor) -> torch.Tensor:
        """Weighted sum of expert outputs per token.

        hidden [T, H]; token, expert, weight [P]: pair p sends hidden[token[p]] through
        logical expert expert[p] and adds weight[p] times the result to out[token[p]].
        Returns out [T, H]; tokens with no pair get zeros.
        """
        out = torch.zeros_like(hidden)  # [T, H]
        if token.numel() == 0:
            return out
        rows = self.slot[layer][expert]  # [P] row in the stacked weights
        if bool((rows < 0).any()):
            missing = sorted(set(expert[rows < 0].tolist()))
            raise KeyError(f"layer {layer}: experts {missing} are not hosted here")
        order = torch.argsort(rows, stable=True)  # pairs grouped by expert
        counts = torch.bincount(rows, minlength=self.gate_up[layer].shape[0]).tolist()
        token, weight = token[order], weight[order]
        start = 0
        for r, n in enumerate(counts):
            if n == 0:
                continue
            idx = token[start : start + n]  # [n_e]
            y = swiglu(hidden[idx], self.gate_up[layer][r], self.down[layer][r])  # [n_e, H]
            out.index_add_(0, idx, y * weight[start : start + n, None].to(y.dtype))
            start += n
        return out
