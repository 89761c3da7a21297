"""Where a step's time goes: wall-clock seconds per section, collected only when enabled.

Sections: scheduling, attention, gate, shared_experts, routed (dispatch + wait;
with local experts this is the routed compute itself), lm_head, sampling, other.
With two micro-batches (`CausalLM.micro_batches`) each section sums both, and a
micro-batch's wait comes after the other's attention, gate and shared experts, so
in a router `routed` is the part of the routed experts' time still left exposed.
Disabled, a section costs one attribute check.
"""

from __future__ import annotations

import time
from collections import defaultdict


class StepProfile:
    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._name = ""
        self._start = 0.0

    def reset(self, enabled: bool = True) -> None:
        self.enabled, self.steps = enabled, 0
        self.seconds = defaultdict(float)

    def __call__(self, name: str) -> "StepProfile":
        self._name = name
        return self

    def __enter__(self):
        if self.enabled:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.seconds[self._name] += time.perf_counter() - self._start

    def shares(self, total: float | None = None) -> dict[str, float]:
        """Each section's share of `total` (default: the sum of sections)."""
        total = total or sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
