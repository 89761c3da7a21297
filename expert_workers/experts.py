"""Routed-expert compute: the one FFN that the router's local path and every worker run.

Shape legend:
    T  tokens in the batch        H  hidden size         I  expert width
    P  (token, expert) pairs       n  replicas hosted for one layer
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from expert_workers import kernels
from expert_workers.checkpoint import Checkpoint

R = TypeVar("R")


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | kernels.LinearWeight,
           down: torch.Tensor | kernels.LinearWeight) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused. x [T, H], gate_up [2I, H], down [H, I]
    (as tensors, or prepared for a CPU kernel by `kernels.prepare_linear`)."""
    gate, up = kernels.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return kernels.linear(F.silu(gate) * up, down)  # [T, H]


@dataclass(frozen=True)
class LayerExperts:
    """One layer's hosted replicas, stacked. Immutable: a change builds a new one and swaps it in."""

    gate_up: torch.Tensor  # [n, 2I, H]; packed per row for the amx kernel (kernels.prepare_experts)
    down: torch.Tensor  # [n, H, I]; likewise
    slot: torch.Tensor  # [E] long: row of each logical expert, -1 where not hosted
    backend: str | None = None  # the CPU kernel these weights are laid out for; None: plain torch

    @property
    def experts(self) -> list[int]:
        return (self.slot >= 0).nonzero().flatten().tolist()


class ExpertGroup:
    """Stacked weights of a set of hosted (layer, expert) replicas, run batched per expert.

    Threads: `run` may be called from several threads while `load`/`unload`
    change the hosted set on another; each layer is one immutable LayerExperts
    read once per call and replaced by a single dict assignment, so a call sees
    either the old or the new set, never a mix.
    """

    def __init__(self, num_experts: int, device: torch.device | str = "cpu"):
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.layers: dict[int, LayerExperts] = {}

    @classmethod
    def load(cls, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> "ExpertGroup":
        """Read only the hosted experts' tensors. `hosted` maps layer -> expert ids."""
        moe = checkpoint.spec.moe
        group = cls(moe.num_experts if moe else 0, device)
        group.add(checkpoint, hosted, dtype, paced=False)  # nothing is served from it yet
        return group

    def add(self, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype,
            paced: bool = True) -> int:
        """Load more replicas from the checkpoint; returns bytes read. Serving continues meanwhile.

        A live rebalance is background work that decode steps on the same machine must not wait behind:
        the reading and re-stacking run on a thread at the lowest CPU priority and, when `paced`, at half
        duty (each layer's work followed by as long a pause), since copying weights also competes with
        decode for memory bandwidth and the GIL, which a CPU priority does not cover. Measured with
        `moe-serve bench rebalance` on 2 cores: p99 inter-token latency during a rebalance fell from
        1.5-2.1x steady state to 1.0-1.1x, while the rebalance took 1.9 s instead of 1.6 s.
        """
        return at_low_priority(lambda: self._add(checkpoint, hosted, dtype, paced))

    def _add(self, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype, paced: bool) -> int:
        read = 0
        for layer, experts in tqdm(hosted.items(), desc="loading experts", unit="layer", delay=2.0):
            started = time.perf_counter()
            current = self.layers.get(layer)
            new = sorted(set(experts) - set(current.experts if current else []))
            if not new:
                continue
            gate_up, down = checkpoint.read_experts(layer, new, dtype)
            read += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
            gate_up, down, backend = kernels.prepare_experts(gate_up.to(self.device), down.to(self.device))
            keep = current.experts if current else []
            if current is not None:
                rows = current.slot[torch.tensor(keep, dtype=torch.long, device=current.slot.device)]
                gate_up = _stack_after(current.gate_up, rows, gate_up)
                down = _stack_after(current.down, rows, down)
            self._set(layer, keep + new, gate_up, down, backend)
            if paced:
                time.sleep(time.perf_counter() - started)
        return read

    def remove(self, hosted: dict[int, list[int]]) -> None:
        """Unload replicas (after every router stopped sending them tokens); re-stacking the kept ones is
        background work too."""
        at_low_priority(lambda: self._remove(hosted))

    def _remove(self, hosted: dict[int, list[int]]) -> None:
        for layer, experts in hosted.items():
            current = self.layers.get(layer)
            if current is None:
                continue
            keep = [e for e in current.experts if e not in set(experts)]
            if not keep:
                del self.layers[layer]
                continue
            rows = current.slot[torch.tensor(keep, dtype=torch.long, device=current.slot.device)]
            self._set(layer, keep, current.gate_up[rows], current.down[rows], current.backend)

    def _set(self, layer: int, experts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
             backend: str | None = None) -> None:
        slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        self.layers[layer] = LayerExperts(gate_up.to(self.device).contiguous(), down.to(self.device).contiguous(),
                                          slot.to(self.device), backend)

    def hosted(self) -> dict[int, list[int]]:
        return {layer: le.experts for layer, le in self.layers.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for le in self.layers.values() for t in (le.gate_up, le.down))

    def run(self, layer: int, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
            weight: torch.Tensor) -> torch.Tensor:
        """Weighted sum of expert outputs per token.

        hidden [T, H]; token, expert, weight [P]: pair p sends hidden[token[p]] through
        logical expert expert[p] and adds weight[p] times the result to out[token[p]].
        Returns out [T, H]; tokens with no pair get zeros.
        """
        if token.numel() == 0:
            return torch.zeros_like(hidden)  # [T, H]
        le = self.layers.get(layer)  # read once: a concurrent load swaps in a new object
        if le is None:
            raise KeyError(f"layer {layer}: experts {sorted(set(expert.tolist()))} are not hosted here")
        if hidden.dtype != le.gate_up.dtype:  # compute in the weights' dtype
            return self.run(layer, hidden.to(le.gate_up.dtype), token, expert, weight).to(hidden.dtype)
        rows = le.slot[expert]  # [P] row in the stacked weights
        if int(rows.min()) < 0:
            missing = sorted(set(expert[rows < 0].tolist()))
            raise KeyError(f"layer {layer}: experts {missing} are not hosted here")
        if le.backend == "amx":  # the fused kernel
            return kernels.moe(hidden, le.gate_up, le.down, le.backend, rows, token, weight)
        counts = torch.bincount(rows, minlength=le.gate_up.shape[0])  # [n] pairs per hosted row
        # dot: fused while no expert gets more rows than its register tiles suit
        if le.backend == "dot" and int(counts.max()) <= kernels.DOT_MAX_ROWS:
            return kernels.moe(hidden, le.gate_up, le.down, le.backend, rows, token, weight)
        out = torch.zeros_like(hidden)  # [T, H]
        order = torch.argsort(rows, stable=True)  # pairs grouped by expert
        token, weight, rows = token[order], weight[order], rows[order]
        if _batched_pays(counts, hidden.dtype):
            y = _batched_swiglu(hidden, token, rows, counts, le)  # [P, H]
            return out.index_add_(0, token, y * weight[:, None].to(y.dtype))
        start = 0
        for r, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx = token[start : start + n]  # [n_e]
            y = swiglu(hidden[idx], le.gate_up[r], le.down[r])  # [n_e, H]
            out.index_add_(0, idx, y * weight[start : start + n, None].to(y.dtype))
            start += n
        return out


def _stack_after(stacked: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """stacked[rows] followed by new, on stacked's device, copying each byte once: [len(rows) + len(new), ...]."""
    out = stacked.new_empty((len(rows) + len(new), *stacked.shape[1:]))
    torch.index_select(stacked, 0, rows, out=out[: len(rows)])
    out[len(rows) :] = new  # copies host to device when the experts live on a GPU
    return out


def at_low_priority(fn: Callable[[], R]) -> R:
    """fn() on a new thread at nice 19, waited for. Linux keeps a nice value per thread, so only this
    work yields the CPU (a thread cannot raise its priority back without privileges, hence a new one).
    Elsewhere it simply runs at normal priority."""
    result: list = []

    def body():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux, or not permitted: load at normal priority
            pass
        try:
            result.append((True, fn()))
        except BaseException as err:  # re-raised on the caller's thread
            result.append((False, err))

    thread = threading.Thread(target=body, name="expert-loading", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _batched_pays(counts: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether one padded batched matmul over every hosted row beats a matmul per hit row.

    Measured on CPU (oneDNN, AMX): with 16-bit weights a small-m matmul streams weights at about half
    the rate of a batched one, so the batched form wins once at least half the rows are hit (it reads
    every hosted row's weights, hit or not) and padding to the busiest row wastes at most 4x the rows.
    In fp32 the two run at the same rate, so the per-row loop (no padding, no unhit rows) stays.
    On GPU the batched form is what grouped-GEMM kernels do; these thresholds were not tuned there.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    hit = int((counts > 0).sum())
    return 2 * hit >= counts.numel() and counts.numel() * int(counts.max()) <= 4 * int(counts.sum())


def _batched_swiglu(hidden: torch.Tensor, token: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                    le: LayerExperts) -> torch.Tensor:
    """swiglu of every pair in one bmm per projection: pairs sorted by row, returns y [P, H] in that order.

    Each row's tokens are packed into a zero-padded block [n, M, H], M the busiest row's count.
    """
    n, M = counts.numel(), int(counts.max())
    first = torch.cumsum(counts, 0) - counts  # [n] index of each row's first pair
    pos = torch.arange(rows.numel(), device=rows.device) - first[rows]  # [P] position within its row's block
    x = hidden.new_zeros(n, M, hidden.shape[1])  # [n, M, H]
    x[rows, pos] = hidden[token]
    gate, up = torch.bmm(x, le.gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [n, M, I] each
    y = torch.bmm(F.silu(gate) * up, le.down.transpose(1, 2))  # [n, M, H]
    return y[rows, pos]
