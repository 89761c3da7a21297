"""Worker autoscaling: how many expert workers the routing load asks for.

The decision is a pure function of the policy, the current worker count, the
measured load and a small hysteresis state, with the clock passed in, so it is
tested without Ray or sleeping. Load is routed tokens per second: tokens through
the model, each counted once however many MoE layers and experts it visits.
Routers count (token, expert) pairs; `routed_tokens` turns those into tokens
(pairs / (top-k x MoE layers)), the one conversion the controller uses for the
watermarks and for `rebalance_min_tokens`. Per worker it is that divided by the
worker count.

    above high watermark for `sustain_seconds`  -> scale out to ceil(load / midpoint), at least +1
    below low watermark for `sustain_seconds`   -> scale in to ceil(load / midpoint), at least -1
    within `cooldown_seconds` of a change       -> hold

where midpoint = (high + low) / 2: a new count lands between the watermarks,
so one change does not trigger the opposite one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Scale the number of expert workers with routing load.")
    min_workers: int = Field(1, ge=1, description="Never fewer workers than this.")
    max_workers: int = Field(8, ge=1, description="Never more workers than this.")
    # Defaults: about 2000 and 200 (token, expert) pairs per worker per second on the default model
    # (tiny: 3 MoE layers x top-2 = 6 pairs per token).
    high_watermark: float = Field(
        300.0, gt=0, description="Routed tokens (tokens through the model, each counted once) per worker per "
                                 "second above which to scale out.")
    low_watermark: float = Field(
        30.0, ge=0, description="Routed tokens (tokens through the model, each counted once) per worker per "
                                "second below which to scale in.")
    sustain_seconds: float = Field(10.0, ge=0, description="How long a watermark must stay crossed before acting.")
    cooldown_seconds: float = Field(30.0, ge=0, description="Least time between two changes of the worker count.")
    interval_seconds: float = Field(2.0, gt=0, description="How often the controller evaluates the policy.")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingPolicy":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})")
        if self.low_watermark >= self.high_watermark:
            raise ValueError(
                f"low_watermark ({self.low_watermark}) must be below high_watermark ({self.high_watermark})")
        return self


class PlanChangeReason(str, enum.Enum):
    """Why the placement plan changed: the `reason` label of moe_serve_rebalances_total and of the
    controller's plan events (free-text detail is kept beside it, never in the label)."""

    MANUAL = "manual"  # a Rebalance call
    AUTO_BALANCEDNESS = "auto-balancedness"  # balancedness fell below rebalance_below_balancedness
    SCALE_OUT = "scale-out"  # load above the high watermark
    SCALE_IN = "scale-in"  # load below the low watermark
    BOUNDS = "bounds"  # the worker count left [min_workers, max_workers] (e.g. the policy changed)
    WORKER_FAILURE = "worker-failure"  # a dead worker replaced with the same replicas


def routed_tokens(pairs: float, top_k: int, moe_layers: int) -> float:
    """Tokens through the model from routed (token, expert) pairs: each token visits `top_k` experts in each of
    `moe_layers` MoE layers (for DeepSeek-MoE-16B, 6 x 27 = 162 pairs per token)."""
    if top_k < 1 or moe_layers < 1:
        raise ValueError(f"routed_tokens needs top_k >= 1 and moe_layers >= 1, got top_k={top_k}, "
                         f"moe_layers={moe_layers}")
    return pairs / (top_k * moe_layers)


@dataclass(frozen=True)
class ScalingState:
    """Hysteresis memory between evaluations (all times from the injected clock)."""

    above_since: float | None = None
    below_since: float | None = None
    last_change: float | None = None


@dataclass(frozen=True)
class Decision:
    workers: int
    state: ScalingState
    reason: PlanChangeReason | None = None  # None when holding
    detail: str = ""  # for logs and plan events


def desired_workers(policy: AutoscalingPolicy, workers: int, load_per_second: float, state: ScalingState,
                    now: float) -> Decision:
    per_worker = load_per_second / max(workers, 1)
    above = per_worker > policy.high_watermark
    below = per_worker < policy.low_watermark
    state = replace(state, above_since=(state.above_since if state.above_since is not None else now) if above else None,
                    below_since=(state.below_since if state.below_since is not None else now) if below else None)
    clamp = lambda n: max(policy.min_workers, min(policy.max_workers, n))  # noqa: E731
    if workers != clamp(workers):  # outside the bounds (e.g. the policy changed): fix at once
        return Decision(clamp(workers), replace(state, last_change=now), PlanChangeReason.BOUNDS,
                        f"{workers} workers outside [{policy.min_workers}, {policy.max_workers}]")
    if not policy.enabled:
        return Decision(workers, state)
    if state.last_change is not None and now - state.last_change < policy.cooldown_seconds:
        return Decision(workers, state)
    midpoint = (policy.high_watermark + policy.low_watermark) / 2
    target = math.ceil(load_per_second / midpoint) if midpoint else workers
    if above and now - state.above_since >= policy.sustain_seconds:
        n = clamp(max(target, workers + 1))
        if n != workers:
            return Decision(n, ScalingState(last_change=now), PlanChangeReason.SCALE_OUT,
                            f"{per_worker:.1f} tokens/s per worker")
    if below and now - state.below_since >= policy.sustain_seconds:
        n = clamp(min(max(target, 1), workers - 1))
        if n != workers:
            return Decision(n, ScalingState(last_change=now), PlanChangeReason.SCALE_IN,
                            f"{per_worker:.1f} tokens/s per worker")
    return Decision(workers, state)
