"""The worker-autoscaling decision, with an injected clock (no Ray, no sleeping), and its unit: routed tokens
(tokens through the model) per worker per second, from the (token, expert) pairs routers count."""

import pytest
from pydantic import ValidationError

from cluster.autoscaler import AutoscalingPolicy, PlanChangeReason, ScalingState, desired_workers, routed_tokens
from expert_workers.spec import load_spec

POLICY = AutoscalingPolicy(enabled=True, min_workers=1, max_workers=6, high_watermark=1000, low_watermark=200,
                           sustain_seconds=10, cooldown_seconds=30)
# midpoint = (1000 + 200) / 2 = 600 routed tokens/s per worker


def run(policy, workers, loads_at):
    """Evaluate at each (time, load); returns the worker count after each evaluation."""
    state, counts = ScalingState(), []
    for now, load in loads_at:
        d = desired_workers(policy, workers, load, state, now)
        workers, state = d.workers, d.state
        counts.append(workers)
    return counts


def test_hot_load_scales_out_only_after_sustain():
    # 2 workers at 3000 tokens/s = 1500 per worker > 1000; target ceil(3000 / 600) = 5
    assert run(POLICY, 2, [(0, 3000), (5, 3000), (9.9, 3000), (10, 3000)]) == [2, 2, 2, 5]


def test_a_blip_does_not_scale():
    # above at t=0, back inside at t=5: the sustain timer restarts at t=6
    assert run(POLICY, 2, [(0, 3000), (5, 1000), (6, 3000), (15, 3000), (16, 3000)]) == [2, 2, 2, 2, 5]


def test_cold_load_scales_in_by_at_least_one_and_never_below_min():
    # 4 workers at 400 tokens/s = 100 per worker < 200; target ceil(400 / 600) = 1
    assert run(POLICY, 4, [(0, 400), (10, 400)]) == [4, 1]
    # with min 2 the same load stops at 2
    assert run(POLICY.model_copy(update={"min_workers": 2}), 4, [(0, 400), (10, 400)]) == [4, 2]


def test_cooldown_holds_after_a_change():
    # scale out at t=10 to 5; load per worker still high (8000 / 5 = 1600) but the cooldown runs to t=40
    counts = run(POLICY, 2, [(0, 8000), (10, 8000), (20, 8000), (39, 8000), (40, 8000), (50, 8000)])
    assert counts == [2, 6, 6, 6, 6, 6]  # ceil(8000 / 600) = 14, clamped to max 6


def test_inside_the_watermarks_holds():
    assert run(POLICY, 3, [(t, 1500) for t in range(0, 100, 10)]) == [3] * 10  # 500 per worker


def test_disabled_policy_never_scales_but_enforces_bounds():
    off = POLICY.model_copy(update={"enabled": False})
    assert run(off, 2, [(0, 9000), (20, 9000)]) == [2, 2]
    assert run(off.model_copy(update={"max_workers": 2}), 4, [(0, 0)]) == [2]


def test_policy_validation_names_the_fields():
    with pytest.raises(ValidationError, match="min_workers"):
        AutoscalingPolicy(min_workers=5, max_workers=2)
    with pytest.raises(ValidationError, match="low_watermark"):
        AutoscalingPolicy(low_watermark=5000, high_watermark=100)


def test_a_change_names_its_reason_and_keeps_the_detail_apart():
    out = desired_workers(POLICY, 2, 3000, ScalingState(above_since=0), 10)
    assert (out.workers, out.reason, out.detail) == (5, PlanChangeReason.SCALE_OUT, "1500.0 tokens/s per worker")
    back = desired_workers(POLICY, 4, 400, ScalingState(below_since=0), 10)
    assert (back.workers, back.reason, back.detail) == (1, PlanChangeReason.SCALE_IN, "100.0 tokens/s per worker")
    bounds = desired_workers(POLICY.model_copy(update={"min_workers": 3}), 2, 0, ScalingState(), 0)
    assert (bounds.workers, bounds.reason, bounds.detail) == (3, PlanChangeReason.BOUNDS, "2 workers outside [3, 6]")
    hold = desired_workers(POLICY, 3, 1500, ScalingState(), 0)
    assert (hold.workers, hold.reason, hold.detail) == (3, None, "")
    # the metric label is the enum's value; a free-text reason is no member
    assert PlanChangeReason("scale-out") is PlanChangeReason.SCALE_OUT
    with pytest.raises(ValueError, match="PlanChangeReason"):
        PlanChangeReason("scale-out: 1500 pairs/s")


def test_routed_tokens_count_each_token_once(tiny_model):
    spec = load_spec(tiny_model)  # 3 MoE layers, top-2: a token is 6 (token, expert) pairs
    assert (spec.moe.top_k, len(spec.moe_layers)) == (2, 3)
    assert routed_tokens(6000, spec.moe.top_k, len(spec.moe_layers)) == 1000
    assert routed_tokens(162, 6, 27) == 1  # DeepSeek-MoE-16B: 27 MoE layers, top-6
    with pytest.raises(ValueError, match="top_k"):
        routed_tokens(10, 0, 3)


def test_default_watermarks_mean_about_what_they_did_in_pairs(tiny_model):
    """The defaults were 2000 and 200 (token, expert) pairs per worker per second; on the default (tiny) model
    that is 333 and 33 tokens."""
    spec = load_spec(tiny_model)
    pairs_per_token = spec.moe.top_k * len(spec.moe_layers)
    policy = AutoscalingPolicy()
    assert policy.high_watermark == pytest.approx(2000 / pairs_per_token, rel=0.15)
    assert policy.low_watermark == pytest.approx(200 / pairs_per_token, rel=0.15)
