"""Routing-load telemetry: tokens per logical expert over a sliding time window.

The window is a ring of one-second buckets; the engine thread adds counts at
every MoE layer (one bincount), readers sum the buckets younger than the window.

Shape legend: B buckets, L MoE layers, E routed experts.
"""

from __future__ import annotations

import math
import threading
import time

import torch


class LoadWindow:
    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, window_seconds: float = 60.0,
                 clock=time.monotonic):
        self.moe_layers = moe_layers
        self.layer_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self.window_seconds = window_seconds
        self.clock = clock
        self.num_buckets = max(1, math.ceil(window_seconds))
        self.counts = torch.zeros(self.num_buckets, len(moe_layers), num_experts, dtype=torch.long)  # [B, L, E]
        self.stamps = [-1] * self.num_buckets  # whole second each bucket holds
        self.total = torch.zeros(len(moe_layers), num_experts, dtype=torch.long)  # [L, E] since start
        self._lock = threading.Lock()  # the engine thread writes; gRPC/Ray threads read

    def _bucket(self) -> int:
        second = int(self.clock())
        b = second % self.num_buckets
        if self.stamps[b] != second:
            self.counts[b].zero_()
            self.stamps[b] = second
        return b

    def add(self, layer: int, expert: torch.Tensor) -> None:
        """Count the routed pairs of one layer's step; expert [P] logical ids, on any device (counted there:
        only the [E] counts come to the host)."""
        counts = torch.bincount(expert, minlength=self.num_experts).cpu()
        with self._lock:
            self.counts[self._bucket(), self.layer_index[layer]] += counts
            self.total[self.layer_index[layer]] += counts

    def cumulative(self) -> torch.Tensor:
        """Tokens per (MoE layer, expert) since start: [L, E] (monotonic, for counters)."""
        with self._lock:
            return self.total.clone()

    def totals(self, seconds: float | None = None) -> torch.Tensor:
        """Tokens per (MoE layer, expert) in the window, or in its last `seconds`: [L, E]."""
        now = int(self.clock())
        span = min(seconds or self.window_seconds, self.window_seconds)
        with self._lock:
            live = [b for b, s in enumerate(self.stamps) if s >= 0 and now - s < span]
            return self.counts[live].sum(dim=0) if live else torch.zeros_like(self.counts[0])
