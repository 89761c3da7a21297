"""Routed-expert compute: the one FFN that the router's local path and every worker run.

Shape legend:
    T  tokens in the batch        H  hidden size         I  expert width
    P  (token, expert) pairs       n  replicas hosted for one layer
    R  rows allocated for a layer (n and room for more)
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from expert_workers import kernels
from expert_workers.checkpoint import Checkpoint


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | kernels.LinearWeight,
           down: torch.Tensor | kernels.LinearWeight) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused. x [T, H], gate_up [2I, H], down [H, I]
    (as tensors, or prepared for a CPU kernel by `kernels.prepare_linear`)."""
    gate, up = kernels.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return kernels.linear(F.silu(gate) * up, down)  # [T, H]


# Fraction of the time a live load copies weights (the rest it pauses): the rate `moe-serve bench rebalance`
# measured before layers had free rows (p99 during a rebalance 1.5-2.1x -> 1.0-1.1x steady on 2 cores); the
# sweep since is in docs/rebalancing.md.
DEFAULT_LOAD_DUTY = 0.5
SPARE_ROWS = 0.25  # a worker's room per layer for more replicas, as a fraction of those it starts with: the
# controller's default replica budget is 1.25 x a worker's share (replica_slots_per_worker)


@dataclass(frozen=True)
class LayerExperts:
    """One layer's hosted replicas in stacked weights with room for more.

    The weight tensors are allocated once per layer (and again only when the layer outgrows them): loading
    a replica writes one free row, unloading one frees its row, and the other rows are never copied. The
    row table is immutable: a change publishes a new LayerExperts over the same tensors.
    """

    gate_up: torch.Tensor  # [R, 2I, H], R rows >= n hosted; packed per row for amx and fma (kernels.prepare_experts)
    down: torch.Tensor  # [R, H, I]; likewise
    slot: torch.Tensor  # [E] long: row of each logical expert, -1 where not hosted
    backend: str | None = None  # the CPU kernel these weights are laid out for; None: plain torch

    @property
    def experts(self) -> list[int]:
        return (self.slot >= 0).nonzero().flatten().tolist()

    @property
    def free_rows(self) -> list[int]:
        used = set(self.slot[self.slot >= 0].tolist())
        return [r for r in range(self.gate_up.shape[0]) if r not in used]


class ExpertGroup:
    """Stacked weights of a set of hosted (layer, expert) replicas, run batched per expert.

    Threads: `run` may be called from several threads while `add`/`remove` change the hosted set on
    another (one change at a time: `_changing`). Each layer is one immutable LayerExperts read once per
    call and replaced by a single dict assignment, so a call sees either the old or the new set, never a
    mix. A load writes only rows that no published LayerExperts maps, and an unloaded row is written again
    only by a later load, after the controller's protocol has stopped every router sending it tokens.
    """

    def __init__(self, num_experts: int, device: torch.device | str = "cpu", spare_rows: float = 0.0):
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.spare_rows = spare_rows  # room per layer beyond its first replicas, as a fraction (SPARE_ROWS)
        self.layers: dict[int, LayerExperts] = {}
        self._changing = threading.Lock()
        # GPU: weight copies go on their own stream, so a decode step's kernels never queue behind them.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def load(cls, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype,
             device: torch.device | str = "cpu", spare_rows: float = 0.0) -> "ExpertGroup":
        """Read only the hosted experts' tensors. `hosted` maps layer -> expert ids; `spare_rows`: room for
        more replicas per layer (an expert worker's, whose hosted set changes live; 0 for a fixed set)."""
        moe = checkpoint.spec.moe
        group = cls(moe.num_experts if moe else 0, device, spare_rows)
        group.add(checkpoint, hosted, dtype, duty=1.0)  # nothing is served from it yet: full speed
        return group

    def add(self, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype,
            duty: float = DEFAULT_LOAD_DUTY) -> int:
        """Load more replicas from the checkpoint; returns bytes read. Serving continues meanwhile.

        A live rebalance is background work that decode steps on the same machine must not wait behind:
        the reading and copying run for a fraction `duty` of the time (each layer's work followed by a
        pause, 1 - duty of the time), since copying weights competes with decode for cores, memory
        bandwidth and the GIL. At normal CPU priority: a nice-19 loader stalled decoding outright in 4 of 9
        `moe-serve bench rebalance` runs (it holds the GIL between torch calls while every other thread on
        the machine runs ahead of it, and the serving thread waits for the GIL), against 0 of 7 without
        (docs/rebalancing.md).
        """
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        return self._add(checkpoint, hosted, dtype, duty)

    def _add(self, checkpoint: Checkpoint, hosted: dict[int, list[int]], dtype: torch.dtype, duty: float) -> int:
        read = 0
        with self._changing:
            for layer, experts in tqdm(hosted.items(), desc="loading experts", unit="layer", delay=2.0):
                started = time.perf_counter()
                current = self.layers.get(layer)
                new = sorted(set(experts) - set(current.experts if current else []))
                if not new:
                    continue
                gate_up, down = checkpoint.read_experts(layer, new, dtype)
                read += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
                gate_up, down, backend = kernels.prepare_experts(gate_up.to(self.device), down.to(self.device))
                self.layers[layer] = self._with_replicas(current, new, gate_up, down, backend)
                if duty < 1:
                    time.sleep((time.perf_counter() - started) * (1 - duty) / duty)
        return read

    def _rows(self, replicas: int) -> int:
        """Rows to allocate for a layer that is to host `replicas`: those, and the spare room."""
        return replicas + (math.ceil(replicas * self.spare_rows) if self.spare_rows > 0 else 0)

    def _with_replicas(self, current: LayerExperts | None, new: list[int], gate_up: torch.Tensor,
                       down: torch.Tensor, backend: str | None) -> LayerExperts:
        """`current` (None: an empty layer) plus the replicas `new`, whose weights are gate_up [k, 2I, H] and
        down [k, H, I] in `backend`'s layout: written into free rows. Only a layer without k free rows is
        copied into bigger tensors first, its replicas keeping their rows (off the serving path: the copy
        is published only when complete)."""
        k = len(new)
        if current is not None and current.backend != backend:
            raise ValueError(f"layer weights in {current.backend!r} layout cannot take replicas in {backend!r}")
        if current is None or len(current.free_rows) < k:
            hosted = len(current.experts) if current is not None else 0
            old = current.gate_up.shape[0] if current is not None else 0
            rows = max(self._rows(hosted + k), old + k)
            # Zeros, not empty: the batched path multiplies every row, hit or not.
            big_gate_up = gate_up.new_zeros((rows, *gate_up.shape[1:]))  # [R, ...]
            big_down = down.new_zeros((rows, *down.shape[1:]))
            slot = torch.full((self.num_experts,), -1, dtype=torch.long, device=self.device)
            if current is not None:
                big_gate_up[:old], big_down[:old] = current.gate_up, current.down
                slot = current.slot
            current = LayerExperts(big_gate_up, big_down, slot, backend)
        rows = torch.tensor(current.free_rows[:k], dtype=torch.long, device=self.device)  # [k]
        with torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext():
            current.gate_up.index_copy_(0, rows, gate_up)
            current.down.index_copy_(0, rows, down)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # the rows are complete before any step can map them
        slot = current.slot.clone()
        slot[torch.tensor(new, dtype=torch.long, device=self.device)] = rows
        return LayerExperts(current.gate_up, current.down, slot, backend)

    def remove(self, hosted: dict[int, list[int]]) -> None:
        """Unload replicas (after every router stopped sending them tokens): their rows become free for the
        next load; nothing is copied. A layer left with no replica frees its memory."""
        with self._changing:
            for layer, experts in hosted.items():
                current = self.layers.get(layer)
                if current is None:
                    continue
                slot = current.slot.clone()
                slot[torch.tensor(experts, dtype=torch.long, device=self.device)] = -1
                if not bool((slot >= 0).any()):
                    del self.layers[layer]
                    continue
                self.layers[layer] = LayerExperts(current.gate_up, current.down, slot, current.backend)

    def _set(self, layer: int, experts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
             backend: str | None = None) -> None:
        """Host exactly `experts` in rows 0..n-1 of these weights (tests build groups this way)."""
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
        if le.backend in kernels.PACKED:  # packed weights: the fused kernel, at any row count
            return kernels.moe(hidden, le.gate_up, le.down, le.backend, rows, token, weight)
        counts = torch.bincount(rows, minlength=le.gate_up.shape[0])  # [n] pairs per hosted row
        if le.backend == "dot" and int(counts.max()) <= kernels.MOE_DOT_MAX_ROWS:  # fused: decode
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
