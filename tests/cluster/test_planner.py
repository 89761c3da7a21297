"""Placement policies on hand-computed cases (pure CPU, no Ray).

Notation in the comments: w0 {0, 2} = 110 means worker 0 hosts logical experts 0 and 2 of the layer
and runs 110 tokens; an expert with n replicas puts load / n on each.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.planner import (PLANNERS, PlannerInput, balancedness, eplb_plan, expert_groups, experts_on_one_domain,
                             grouped_plan,
                             initial_plan, match_workers, migration_aware_plan, plan, plan_change, plan_group_spread,
                             round_robin_plan, worker_load, workers_visited_per_token)
from router_service.placement import PlacementPlan, WorkerPlacement

EB = 1000  # expert_bytes in these tests


def layer_load(tokens: list[float], layer: int = 1) -> dict[tuple[int, int], float]:
    return {(layer, e): t for e, t in enumerate(tokens)}


def experts_on(p, worker_id: int) -> list[int]:
    return sorted(e for w in p.workers if w.worker_id == worker_id for _, e in w.replicas)


def check_valid(p, inp: PlannerInput) -> None:
    """Every logical expert has a replica, no worker is over its slots or hosts one expert twice."""
    p.validate()
    assert len(p.workers) == inp.num_workers
    for w in p.workers:
        assert len(w.replicas) <= inp.slots_per_worker, w
        assert len(set(w.replicas)) == len(w.replicas), w
        assert w.worker_id not in inp.drain


def test_round_robin_deals_without_divisibility():
    p = round_robin_plan((0,), 8, 3)
    # 8 experts on 3 workers: 0 3 6 | 1 4 7 | 2 5
    assert [experts_on(p, w) for w in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]


@pytest.mark.parametrize("policy", sorted(PLANNERS))
def test_uniform_load(policy):
    current = round_robin_plan((1, 2), 4, 2)
    load = {(l, e): 10 for l in (1, 2) for e in range(4)}
    # each layer: w0 {0, 2} = 20, w1 {1, 3} = 20 -> (20 + 20) / (20 + 20) = 1.0
    assert balancedness(current, load) == 1.0
    new = plan(policy, PlannerInput(load, 2, 4, EB, current=current))
    assert balancedness(new, load) == 1.0


def test_worked_example_from_the_glossary():
    current = round_robin_plan((1,), 4, 2)
    load = layer_load([90, 30, 20, 20])
    # w0 {0, 2} = 110, w1 {1, 3} = 50: mean 80 / max 110
    assert worker_load(current, load) == {0: 110, 1: 50}
    assert balancedness(current, load) == pytest.approx(80 / 110)
    new = eplb_plan(PlannerInput(load, 2, 3, EB, current=current))
    # 6 slots: expert 0 -> 2 replicas of 45 (a third needs a third worker), then expert 1 -> 2 of 15.
    # Pack 45 45 20 20 15 15: w0 {0, 2, 1} = 45 + 20 + 15 = 80, w1 {0, 3, 1} = 80
    assert [experts_on(new, 0), experts_on(new, 1)] == [[0, 1, 2], [0, 1, 3]]
    assert balancedness(new, load) == 1.0
    change = plan_change(current, new, EB)
    assert change.added == {0: ((1, 1),), 1: ((1, 0),)} and change.removed == {}
    assert change.bytes_moved == 2 * EB and new.version == current.version + 1


def test_eplb_no_divisibility():
    # 7 experts, 3 workers x 4 slots: 5 extra replicas, at most 3 per expert
    load = layer_load([70, 40, 30, 20, 10, 10, 10], layer=0)
    p = eplb_plan(PlannerInput(load, 3, 4, EB))
    # replication, highest load per replica first: e0 70 -> 35, e1 40 -> 20, e0 35 -> 23.3 (3 = cap),
    # e2 30 -> 15, then e3 20 ties e1 20 and goes first (fewer replicas) -> 10. counts 3 2 2 2 1 1 1.
    # packing 23.3 x3 | 20 x2 | 15 x2 | 10 x5 into the least-loaded worker with a slot and no copy:
    #   e0 -> w0 w1 w2; e1 -> w0 w1; e2 -> w2 (23.3) then w0 (43.3, ties w1: lower index);
    #   e3 -> w2 (38.3) then w1 (43.3 < w0 58.3); e4 -> w2; e5 -> w1 (53.3 < 58.3); e6 -> w0 (last slot)
    assert [experts_on(p, w) for w in range(3)] == [[0, 1, 2, 6], [0, 1, 3, 5], [0, 2, 3, 4]]
    # w0 = 23.3 + 20 + 15 + 10 = 68.3, w1 = 63.3, w2 = 58.3: mean 63.3 / max 68.3
    assert balancedness(p, load) == pytest.approx(190 / 3 / (70 / 3 + 45))


def test_skewed_expert_gets_a_replica():
    current = round_robin_plan((1,), 4, 2)
    load = layer_load([100, 20, 20, 20])
    # w0 {0, 2} = 120, w1 {1, 3} = 40: 80 / 120
    assert balancedness(current, load) == pytest.approx(2 / 3)
    new = migration_aware_plan(PlannerInput(load, 2, 3, EB, current=current, migration_weight=0.1))
    # add expert 0 on w1 (50 each): w0 {0, 2} = 70, w1 {0, 1, 3} = 90 -> 0.89; then add expert 1 on w0
    # (10 each): w0 = 80, w1 = 80 -> 1.0. Each step gains far more than 0.1 / 4 per replica moved.
    assert new.replicas_of(1, 0) == [0, 1]
    assert [experts_on(new, 0), experts_on(new, 1)] == [[0, 1, 2], [0, 1, 3]]
    assert balancedness(new, load) == 1.0
    assert plan_change(current, new, EB).bytes_moved == 2 * EB


def test_scale_out_uses_the_new_worker():
    current = round_robin_plan((1,), 6, 2)  # w0 {0, 2, 4}, w1 {1, 3, 5}
    load = layer_load([10] * 6)
    new = migration_aware_plan(PlannerInput(load, 3, 3, EB, current=current, migration_weight=0.1))
    # worker 2 joins empty: 30 30 0. Relieving w0 alone leaves w1 at 30 (a tie gains nothing), so the
    # planner moves one replica off each: 20 20 20 -> 1.0 for 2 replicas moved.
    assert [w.worker_id for w in new.workers] == [0, 1, 2]
    assert [len(experts_on(new, w)) for w in range(3)] == [2, 2, 2]
    assert balancedness(new, load) == 1.0
    change = plan_change(current, new, EB)
    assert change.bytes_moved == 2 * EB and set(change.removed) == {0, 1} and set(change.added) == {2}


@pytest.mark.parametrize("policy", sorted(PLANNERS))
def test_draining_a_worker_empties_it(policy):
    current = round_robin_plan((1,), 6, 3)  # w0 {0, 3}, w1 {1, 4}, w2 {2, 5}
    load = layer_load([10, 40, 10, 10, 10, 10])
    inp = PlannerInput(load, 2, 3, EB, current=current, drain=frozenset({1}))
    new = plan(policy, inp)
    check_valid(new, inp)
    assert [w.worker_id for w in new.workers] == [0, 2]
    assert plan_change(current, new, EB).removed.get(1) == ((1, 1), (1, 4))
    if policy == "migration_aware":
        # experts 1 (40) and 4 (10) must move, heaviest first: 40 to w0 (20 tokens, ties w2: lower
        # index), 10 to w2: w0 {0, 3, 1} = 60, w2 {2, 5, 4} = 30. All 6 slots are full and no swap
        # lowers 60 (swapping 40 for a 10 gives 30 / 60), so nothing else moves.
        assert [experts_on(new, 0), experts_on(new, 2)] == [[0, 1, 3], [2, 4, 5]]
        assert plan_change(current, new, EB).bytes_moved == 2 * EB


def test_fewer_slots_drop_spare_replicas_first():
    load = layer_load([100, 20, 20, 20])
    current = eplb_plan(PlannerInput(load, 2, 3, EB))  # w0 {0, 1, 2}, w1 {0, 1, 3}: 80 / 80
    new = migration_aware_plan(PlannerInput(load, 2, 2, EB, current=current))
    # 2 slots: w0 drops its lightest spare replica, expert 1 (10 per replica, vs 50 for expert 0);
    # then expert 1 has one replica left, so w1 drops its spare replica of expert 0.
    # w0 {0, 2} = 120, w1 {1, 3} = 40, and no swap of two of these lowers 120.
    assert [experts_on(new, 0), experts_on(new, 1)] == [[0, 2], [1, 3]]
    assert plan_change(current, new, EB).bytes_moved == 0


def test_large_migration_weight_keeps_the_plan():
    current = round_robin_plan((1,), 4, 2)
    load = layer_load([30, 20, 25, 25])
    # w0 {0, 2} = 55, w1 {1, 3} = 45: 50 / 55 = 0.909. Perfect balance gains 0.091, less than one
    # replica moved costs at weight 10 (10 / 4 logical experts = 2.5).
    assert migration_aware_plan(PlannerInput(load, 2, 2, EB, current=current, migration_weight=10)) is current
    # at weight 0 the same case is worth fixing: swap 0 and 3 -> 50 / 50
    free = migration_aware_plan(PlannerInput(load, 2, 2, EB, current=current, migration_weight=0))
    assert balancedness(free, load) == 1.0 and plan_change(current, free, EB).bytes_moved == 2 * EB


def test_zero_load_returns_the_current_plan():
    current = round_robin_plan((1, 2), 5, 3)
    assert migration_aware_plan(PlannerInput({}, 3, 4, EB, current=current)) is current
    assert migration_aware_plan(PlannerInput({(1, 0): 0}, 3, 4, EB, current=current)) is current


def test_invalid_inputs_name_the_setting():
    current = round_robin_plan((1,), 7, 3)
    with pytest.raises(ValueError, match="slots_per_worker=2 .* need at least 3"):
        eplb_plan(PlannerInput(layer_load([1] * 7), 3, 2, EB))
    with pytest.raises(ValueError, match=r"drain names workers \[5\]"):
        migration_aware_plan(PlannerInput({}, 2, 4, EB, current=current, drain=frozenset({5})))
    with pytest.raises(ValueError, match="num_workers=2 but 3 workers stay"):
        migration_aware_plan(PlannerInput({}, 2, 4, EB, current=current))
    with pytest.raises(ValueError, match=r"logical expert \(1, 9\)"):
        migration_aware_plan(PlannerInput({(1, 9): 5}, 3, 4, EB, current=current))
    with pytest.raises(ValueError, match="unknown placement policy 'lru'"):
        plan("lru", PlannerInput({}, 3, 4, EB, current=current))


def test_match_workers_renames_to_keep_replicas_in_place():
    current = round_robin_plan((1,), 4, 2)  # w0 {0, 2}, w1 {1, 3}
    load = layer_load([30, 40, 5, 5])
    moved = eplb_plan(PlannerInput(load, 2, 2, EB, current=current))
    # EPLB from scratch: 40 -> w0, 30 -> w1, 5 -> w1 (35), 5 -> w0 (w1 full): current's workers swapped
    assert [experts_on(moved, 0), experts_on(moved, 1)] == [[1, 3], [0, 2]]
    assert plan_change(current, moved, EB).bytes_moved == 4 * EB
    renamed = match_workers(moved, current)
    assert plan_change(current, renamed, EB).bytes_moved == 0
    assert balancedness(renamed, load) == balancedness(moved, load)


def zipf_load(rng: np.random.Generator, layers: int, experts: int) -> dict[tuple[int, int], int]:
    popularity = 1.0 / np.arange(1, experts + 1)
    load = {}
    for l in range(layers):
        counts = rng.multinomial(200 * experts, popularity / popularity.sum())
        load.update({(l, int(e)): int(n) for e, n in zip(rng.permutation(experts), counts)})
    return load


@pytest.mark.parametrize("seed", range(40), ids=lambda s: f"seed-{s}")
def test_random_cases_keep_every_invariant(seed):
    rng = np.random.default_rng(seed)
    layers, experts, workers = int(rng.integers(1, 4)), int(rng.integers(2, 12)), int(rng.integers(1, 6))
    need = -(-layers * experts // workers)
    slots = need + int(rng.integers(0, 4))
    current = migration_aware_plan(PlannerInput(zipf_load(rng, layers, experts), workers, slots, EB))
    # the next window: a new load, sometimes a worker drained and one added, sometimes one more worker
    load = zipf_load(rng, layers, experts) if seed % 5 else {}
    drain = frozenset({int(rng.integers(workers))}) if seed % 3 == 0 and workers > 1 else frozenset()
    num_workers = workers + (1 if seed % 2 else 0) - len(drain) + (1 if drain and seed % 4 == 0 else 0)
    need_now = -(-layers * experts // num_workers)
    for weight in (0.0, 0.05, 5.0):
        inp = PlannerInput(load, num_workers, max(slots, need_now), EB, current=current, drain=drain,
                           migration_weight=weight)
        ours, eplb = migration_aware_plan(inp), eplb_plan(inp)
        check_valid(ours, inp)
        check_valid(eplb, inp)
        if weight == 0:  # with movement free, ours is at least as balanced as EPLB
            assert balancedness(ours, load) >= balancedness(eplb, load) - 1e-12


def test_weight_zero_beats_eplb_on_skewed_layers():
    rng = np.random.default_rng(7)
    load = zipf_load(rng, 3, 16)
    current = round_robin_plan((0, 1, 2), 16, 4)
    inp = PlannerInput(load, 4, 14, EB, current=current, migration_weight=0)
    ours, eplb = migration_aware_plan(inp), eplb_plan(inp)
    assert balancedness(eplb, load) > balancedness(current, load)
    assert balancedness(ours, load) >= balancedness(eplb, load)


def plan_of(num_experts: int, moe_layers: tuple[int, ...], workers: list[list[tuple[int, int]]]) -> PlacementPlan:
    return PlacementPlan(1, num_experts, moe_layers, tuple(WorkerPlacement(i, f"expert-worker-{i}", tuple(r))
                                                           for i, r in enumerate(workers)))


def test_a_heated_expert_is_handed_a_cooled_ones_replicas():
    # One layer, 4 workers x 3 slots. Expert 0 was hot (3 replicas) and has cooled to 4 tokens; expert 1
    # has heated to 45 on its one replica:
    #   w0 {0, 2, 6} = 4/3 + 6 + 23 = 30.3, w1 {0, 3} = 18.3, w2 {0, 4} = 18.3, w3 {1, 5} = 45 + 18 = 63
    # mean 130 / 4 = 32.5, so balancedness 0.52. EPLB from scratch reaches a maximum of 34.5 (0.942), the
    # target, which expert 1's replica alone exceeds. Handing expert 1 all of expert 0's replicas but the one
    # on its busiest host w0 gives expert 1 three replicas of 15:
    #   w0 {0, 2, 6} = 33, w1 {1, 3} = 32, w2 {1, 4} = 32, w3 {1, 5} = 33 -> 32.5 / 33, for 2 replicas moved
    # (exchanging the two experts' hosts instead would put 15 on w0: 44).
    current = plan_of(7, (1,), [[(1, 0), (1, 2), (1, 6)], [(1, 0), (1, 3)], [(1, 0), (1, 4)], [(1, 1), (1, 5)]])
    load = layer_load([4, 45, 6, 17, 17, 18, 23])
    inp = PlannerInput(load, 4, 3, EB, current=current)
    new = migration_aware_plan(inp)
    assert [experts_on(new, w) for w in range(4)] == [[0, 2, 6], [1, 3], [1, 4], [1, 5]]
    assert balancedness(new, load) == pytest.approx(32.5 / 33)
    assert plan_change(current, new, EB).replicas_moved == 2
    eplb = eplb_plan(inp)
    assert balancedness(eplb, load) == pytest.approx(32.5 / 34.5)
    assert plan_change(current, match_workers(eplb, current), EB).replicas_moved == 6


def test_a_trade_relieves_two_layers_for_two_replicas_moved():
    # Two layers of 3 experts on 2 full workers of 3 slots (no spare slot, so nothing moves alone):
    #   layer 1: w0 {0, 2} = 25 + 8 = 33, w1 {1} = 17        layer 2: w0 {1} = 9, w1 {0, 2} = 14 + 14 = 28
    # balancedness (25 + 18.5) / (33 + 28) = 0.71. EPLB, packing both layers in lockstep, gets 33 and 23
    # (0.78); a swap in layer 2 gets the same. The trade moves (2, 0) from w1 to w0 and, in return, (1, 2)
    # from w0 to w1:  layer 1: w0 25, w1 25; layer 2: w0 23, w1 14 -> 43.5 / 48, for the same 2 replicas.
    current = plan_of(3, (1, 2), [[(1, 0), (1, 2), (2, 1)], [(1, 1), (2, 0), (2, 2)]])
    load = {(1, 0): 25, (1, 1): 17, (1, 2): 8, (2, 0): 14, (2, 1): 9, (2, 2): 14}
    inp = PlannerInput(load, 2, 3, EB, current=current)
    new = migration_aware_plan(inp)
    assert [sorted(w.replicas) for w in new.workers] == [[(1, 0), (2, 0), (2, 1)], [(1, 1), (1, 2), (2, 2)]]
    assert balancedness(new, load) == pytest.approx(43.5 / 48)
    assert plan_change(current, new, EB).replicas_moved == 2
    assert balancedness(eplb_plan(inp), load) == pytest.approx(43.5 / 56)


# --- expert groups (DeepSeek-V2/V3 group-limited routing) ------------------------------------------


def test_grouped_plan_keeps_groups_whole_when_workers_divide_groups():
    # 8 experts in 4 groups {0,1} {2,3} {4,5} {6,7} on 2 workers: runs of 4, so two whole groups each
    p = grouped_plan((1, 2), 8, 4, 2)
    assert [experts_on(p, w) for w in range(2)] == [[0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6, 7, 7]]
    assert plan_group_spread(p, 4) == 0
    assert plan_group_spread(round_robin_plan((1, 2), 8, 2), 4) == 8  # every group on both workers


def test_grouped_plan_without_divisibility():
    # 2 layers x 8 experts in 4 groups on 3 workers; per layer each worker gets round-robin's count:
    # layer 1 starts at worker 0 (3, 3, 2 experts): w0 {0,1,2} w1 {3,4,5} w2 {6,7}
    # layer 2 starts at worker 8 % 3 = 2 (w2 3, w0 3, w1 2): w2 {0,1,2} w0 {3,4,5} w1 {6,7}
    p = grouped_plan((1, 2), 8, 4, 3)
    hosted = [sorted(w.replicas) for w in p.workers]
    assert hosted == [[(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)],
                      [(1, 3), (1, 4), (1, 5), (2, 6), (2, 7)],
                      [(1, 6), (1, 7), (2, 0), (2, 1), (2, 2)]]
    # the same replicas per worker as round-robin by expert (6, 5, 5): the same slots suffice
    rr = round_robin_plan((1, 2), 8, 3)
    assert [len(w.replicas) for w in p.workers] == [len(w.replicas) for w in rr.workers] == [6, 5, 5]
    # groups 0, 2, 3 whole in layer 1, and 1 split (2 on w0, 3 on w1); likewise in layer 2: spread 2
    assert plan_group_spread(p, 4) == 2
    p.validate()


def test_grouped_plan_splits_groups_when_workers_outnumber_them():
    # 4 experts in 2 groups on 4 workers: one expert each, every group on 2 workers
    p = grouped_plan((0,), 4, 2, 4)
    assert [experts_on(p, w) for w in range(4)] == [[0], [1], [2], [3]]
    assert plan_group_spread(p, 2) == 2
    with pytest.raises(ValueError, match="equal groups"):
        grouped_plan((0,), 8, 3, 2)


def _spec(n_group: int):
    from types import SimpleNamespace

    from expert_workers.spec import MoESpec

    moe = MoESpec(num_experts=8, top_k=3, expert_intermediate_size=32, norm_topk_prob=False, n_group=n_group,
                  topk_group=2 if n_group > 1 else 1)
    return SimpleNamespace(model_type="deepseek_v2", moe=moe, moe_layers=(1, 2))


def test_initial_plan_is_grouped_for_group_limited_routing():
    assert initial_plan(_spec(4), 2) == grouped_plan((1, 2), 8, 4, 2)
    assert initial_plan(_spec(1), 2) == round_robin_plan((1, 2), 8, 2)  # no groups: unchanged
    assert expert_groups(_spec(4)) == 4 and expert_groups(_spec(1)) is None


# One layer of 8 experts in 4 groups, topk_group 2, top-3: each token's experts lie in 2 groups.
GROUP_ROUTED = [(1, (0, 1, 2)),  # groups 0, 1
                (1, (0, 1, 4)),  # groups 0, 2
                (1, (4, 5, 6)),  # groups 2, 3
                (1, (2, 3, 7))]  # groups 1, 3


def test_workers_visited_per_token_hand_computed():
    # round-robin by expert: w0 even experts, w1 odd; every token has both parities: 2 workers each
    assert workers_visited_per_token(round_robin_plan((1,), 8, 2), GROUP_ROUTED) == 2.0
    # grouped: w0 {0..3} (groups 0, 1), w1 {4..7} (groups 2, 3): tokens visit 1, 2, 1, 2 workers
    assert workers_visited_per_token(grouped_plan((1,), 8, 4, 2), GROUP_ROUTED) == 1.5
    assert workers_visited_per_token(grouped_plan((1,), 8, 4, 2), []) == 0.0


def test_workers_visited_follows_dispatch_over_replicas():
    # expert 1 on both workers: its n-th pair goes to replica n mod 2 (w0, then w1), as ReplicaTable.assign
    p = PlacementPlan(1, 2, (1,), (WorkerPlacement(0, "expert-worker-0", ((1, 0), (1, 1))),
                                   WorkerPlacement(1, "expert-worker-1", ((1, 1),))))
    assert workers_visited_per_token(p, [(1, (0, 1)), (1, (0, 1))]) == 1.5  # {w0}, then {w0, w1}
    with pytest.raises(ValueError, match="no replica"):
        workers_visited_per_token(round_robin_plan((1,), 2, 2), [(1, (5,))])


def test_migration_aware_pulls_groups_together_when_worth_the_moves():
    # 4 experts in groups {0,1} {2,3}, uniform load: round-robin w0 {0, 2}, w1 {1, 3} is balanced (1.0)
    # but every group spans both workers (spread 2). Swapping experts 2 and 1 keeps balancedness 1.0,
    # moves 2 replicas (-2 * 0.03 / 4) and takes 2 off the spread (+2 * 0.1 / 4): J rises by 0.035.
    current = round_robin_plan((1,), 4, 2)
    load = layer_load([10, 10, 10, 10])
    oblivious = migration_aware_plan(PlannerInput(load, 2, 2, EB, current=current))
    assert oblivious is current  # nothing to gain without groups
    inp = PlannerInput(load, 2, 2, EB, current=current, groups=2, group_weight=0.1)
    aware = migration_aware_plan(inp)
    check_valid(aware, inp)
    assert plan_group_spread(aware, 2) == 0 and balancedness(aware, load) == 1.0
    assert plan_change(current, aware, EB).replicas_moved == 2
    # a group weight below the migration weight does not pay for the moves
    assert migration_aware_plan(PlannerInput(load, 2, 2, EB, current=current, groups=2, group_weight=0.02)) is current


def test_groups_none_plans_exactly_as_before():
    rng = np.random.default_rng(3)
    load = zipf_load(rng, 2, 8)
    current = round_robin_plan((0, 1), 8, 3)
    base = migration_aware_plan(PlannerInput(load, 3, 7, EB, current=current))
    assert migration_aware_plan(PlannerInput(load, 3, 7, EB, current=current, groups=None, group_weight=9.0)) == base


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="groups=3"):
        migration_aware_plan(PlannerInput(layer_load([1] * 8), 2, 4, EB, groups=3))
    with pytest.raises(ValueError, match="group_weight"):
        migration_aware_plan(PlannerInput(layer_load([1] * 8), 2, 4, EB, groups=2, group_weight=-1))


@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed-{s}")
def test_group_aware_plans_stay_valid(seed):
    rng = np.random.default_rng(100 + seed)
    layers, groups, size = int(rng.integers(1, 4)), int(rng.choice([2, 4])), int(rng.choice([1, 2, 4]))
    experts, workers = groups * size, int(rng.integers(1, 6))
    slots = -(-layers * experts // workers) + int(rng.integers(0, 4))
    moe_layers = tuple(range(layers))
    current = grouped_plan(moe_layers, experts, groups, workers)
    for step in range(3):  # a few windows, sometimes draining a worker and adding one
        load = zipf_load(rng, layers, experts)
        drain = frozenset({current.workers[0].worker_id}) if step == 1 and workers > 1 else frozenset()
        inp = PlannerInput(load, workers, slots, EB, current=current, drain=drain, groups=groups)
        new = migration_aware_plan(inp)
        check_valid(new, inp)
        oblivious = migration_aware_plan(PlannerInput(load, workers, slots, EB, current=current, drain=drain))
        check_valid(oblivious, inp)
        current = new
    assert all(len(w.replicas) <= slots for w in current.workers)


# --- properties over random loads and plans --------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_migration_aware_never_falls_below_its_starting_plan(data):
    """Any plan, any load: every logical expert keeps a replica, no worker exceeds its slots, and
    J = balancedness - migration_weight * replicas moved / logical experts (- group_weight * spread / logical
    experts with groups) is at least the starting plan's, which has J = its balancedness."""
    layers, workers = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    groups = data.draw(st.sampled_from([None, 2, 4]))
    experts = (groups or 1) * data.draw(st.integers(1, 6 if groups else 16))
    slots = -(-layers * experts // workers) + data.draw(st.integers(0, 4))
    weight = data.draw(st.sampled_from([0.0, 0.03, 0.5]))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    moe_layers = tuple(range(1, layers + 1))
    load = {(l, e): int(n) for l in moe_layers for e, n in enumerate(rng.zipf(1.5, experts) * rng.integers(0, 3))}
    start_load = {(l, e): int(n) for l in moe_layers for e, n in enumerate(rng.integers(0, 50, experts))}
    current = eplb_plan(PlannerInput(start_load, workers, slots, EB, current=round_robin_plan(moe_layers, experts,
                                                                                              workers)))
    inp = PlannerInput(load, workers, slots, EB, current=current, migration_weight=weight, groups=groups)
    new = migration_aware_plan(inp)
    check_valid(new, inp)
    assert {(l, e) for w in new.workers for l, e in w.replicas} == set(load)
    n = layers * experts

    def J(p):
        spread = plan_group_spread(p, groups) * inp.group_weight / n if groups else 0.0
        return balancedness(p, load) - weight * plan_change(current, p, EB).replicas_moved / n - spread

    assert J(new) >= J(current) - 1e-9


def test_eplb_packing_makes_room_once_per_stuck_layer():
    # Found by the property test. 24 slots for 24 replicas; layers 1 and 2 place their last replica of
    # expert 0 when the only free slots sit on workers that already host it. Making room in layer 1 (moving
    # a replica off the full worker 2) frees a slot there, so layer 2 is no longer stuck and must not
    # make room again (it would find no full worker lacking expert 0).
    load = {(l, e): t for l, row in zip((1, 2, 3, 4), ([1, 2, 33], [1, 4, 22], [0, 0, 0], [0, 0, 0]))
            for e, t in enumerate(row)}
    inp = PlannerInput(load, 3, 8, EB)
    p = eplb_plan(inp)
    check_valid(p, inp)
    assert p.replica_count()[(1, 0)] == 3 and p.replica_count()[(2, 0)] == 3


# --- spreading replicas over failure domains (nodes) -----------------------------------------------


def test_a_replicated_expert_on_one_node_gets_a_copy_on_another():
    # nodes a = {w0, w1}, b = {w2, w3}, 2 slots each. Expert 0 (80 tokens) has both replicas on node a:
    # w0 {0, 1} = 40 + 10, w1 {0, 2} = 40 + 30, w2 {3} = 30, w3 {1} = 10 -> mean 40 / max 70.
    current = plan_of(4, (1,), [[(1, 0), (1, 1)], [(1, 0), (1, 2)], [(1, 3)], [(1, 1)]])
    load = layer_load([80, 20, 30, 30])
    nodes = {0: "a", 1: "a", 2: "b", 3: "b"}
    assert experts_on_one_domain(current, nodes) == [(1, 0)]
    # A migration weight this large keeps the plan; the spread still moves a copy of expert 0 to node b.
    # The move that raises the layer's maximum least: w1's replica into w3's free slot (w1 -> 30, w3 -> 50).
    new = plan("migration_aware", PlannerInput(load, 4, 2, EB, current=current, migration_weight=100.0,
                                               domains=nodes))
    assert new.version == 2
    assert [experts_on(new, w) for w in range(4)] == [[0, 1], [2], [3], [0, 1]]
    assert experts_on_one_domain(new, nodes) == []
    assert balancedness(new, load) == 40 / 50


def test_a_full_node_trades_the_replica_that_balances_best():
    # Every slot taken. Tokens per replica: expert 0 = 30 (x2, both on node a), 1 = 10 (x3), 2 = 20 (x2),
    # 3 = 20 (x1). w0 {0, 1} = 40, w1 {0, 2} = 50, w2 {1, 3} = 30, w3 {1, 2} = 30: mean 37.5 / max 50.
    current = plan_of(4, (1,), [[(1, 0), (1, 1)], [(1, 0), (1, 2)], [(1, 1), (1, 3)], [(1, 1), (1, 2)]])
    load = layer_load([60, 30, 40, 20])
    nodes = {0: "a", 1: "a", 2: "b", 3: "b"}
    # Trading w1's expert 0 for w2's expert 3 gives w1 {2, 3} = 40, w2 {0, 1} = 40: the maximum falls to 40.
    # (w3's expert 2 cannot come over: both its replicas would then be on node a.)
    new = plan("migration_aware", PlannerInput(load, 4, 2, EB, current=current, migration_weight=100.0,
                                               domains=nodes))
    assert [experts_on(new, w) for w in range(4)] == [[0, 1], [2, 3], [0, 1], [1, 2]]
    assert experts_on_one_domain(new, nodes) == []
    assert balancedness(new, load) == 37.5 / 40


def test_a_trade_may_take_another_layers_replica():
    # Layer 1 lives on node a's workers only (w0, w1) and its expert 0 has both replicas there; w2 on node b
    # is full of layer 2, whose single-replica experts can go anywhere: the only fix trades across layers.
    current = plan_of(2, (1, 2), [[(1, 0), (1, 1)], [(1, 0), (1, 1)], [(2, 0), (2, 1)]])
    nodes = {0: "a", 1: "a", 2: "b"}
    load = {(1, 0): 10, (1, 1): 10, (2, 0): 10, (2, 1): 10}
    assert experts_on_one_domain(current, nodes) == [(1, 0), (1, 1)]
    new = plan("eplb", PlannerInput(load, 3, 2, EB, current=current, domains=nodes))
    assert experts_on_one_domain(new, nodes) == []
    new = plan("migration_aware", PlannerInput(load, 3, 2, EB, current=current, migration_weight=100.0,
                                               domains=nodes))
    assert experts_on_one_domain(new, nodes) == []
    assert new.replica_count() == current.replica_count()


def test_one_node_or_no_domains_plans_as_the_policy_does():
    rng = np.random.default_rng(3)
    load = zipf_load(rng, 2, 8)
    current = migration_aware_plan(PlannerInput(zipf_load(rng, 2, 8), 4, 6, EB))
    for policy in sorted(PLANNERS):
        inp = PlannerInput(load, 4, 6, EB, current=current)
        alone = PLANNERS[policy](inp)
        assert plan(policy, inp) == alone
        one_node = plan(policy, PlannerInput(load, 4, 6, EB, current=current, domains={w: "a" for w in range(4)}))
        assert one_node == alone


def test_a_worker_the_domains_do_not_name_counts_as_a_node_of_its_own():
    # Scale-out from 2 workers on node a to 3: the new worker has no node yet. The controller starts it
    # with Ray's SPREAD strategy, so it is taken as a node of its own: the hot expert's copies land there.
    current = plan_of(3, (1,), [[(1, 0), (1, 1)], [(1, 0), (1, 2)]])
    load = layer_load([90, 5, 5])
    nodes = {0: "a", 1: "a"}
    assert experts_on_one_domain(current, nodes) == []  # one node: nowhere else to put a copy
    new = plan("migration_aware", PlannerInput(load, 3, 2, EB, current=current, domains=nodes))
    assert experts_on_one_domain(new, nodes) == []
    assert 0 in experts_on(new, 2)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_spread_leaves_no_replicated_expert_on_one_node(data):
    """Nodes of 2-3 workers each (as Ray's SPREAD strategy fills them), up to 2 spare slots per worker:
    after spreading, losing any one node leaves every replicated expert a copy; every plan stays valid,
    and replica counts are the policy's."""
    layers, nodes = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 3))
    workers = nodes * data.draw(st.integers(2, 3))
    experts = data.draw(st.integers(workers, 16))
    slots = -(-layers * experts // workers) + data.draw(st.integers(0, 2))
    node_of = {w: f"node-{w % nodes}" for w in range(workers)}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    moe_layers = tuple(range(1, layers + 1))
    load = {(l, e): int(n) for l in moe_layers for e, n in enumerate(rng.zipf(1.5, experts) * rng.integers(0, 3))}
    start_load = {(l, e): int(n) for l in moe_layers for e, n in enumerate(rng.integers(0, 50, experts))}
    current = eplb_plan(PlannerInput(start_load, workers, slots, EB, current=round_robin_plan(moe_layers, experts,
                                                                                              workers)))
    policy = data.draw(st.sampled_from(sorted(PLANNERS)))
    inp = PlannerInput(load, workers, slots, EB, current=current, domains=node_of)
    new = plan(policy, inp)
    check_valid(new, inp)
    assert new.replica_count() == PLANNERS[policy](inp).replica_count()
    assert experts_on_one_domain(new, node_of) == []
    for lost in set(node_of.values()):
        left = {r for w in new.workers if node_of[w.worker_id] != lost for r in w.replicas}
        assert all(r in left for r, n in new.replica_count().items() if n > 1)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_spread_never_adds_an_expert_on_one_node(data):
    """Any assignment of workers to nodes, however lopsided: the spread may not fix every expert (a node of
    one full worker cannot take a copy of each), but it never leaves more on one node than the policy did."""
    layers, workers = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 7))
    experts = data.draw(st.integers(2, 12))
    slots = -(-layers * experts // workers) + data.draw(st.integers(0, 4))
    node_of = {w: f"node-{data.draw(st.integers(0, 2))}" for w in range(workers)}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    load = zipf_load(rng, layers, experts)
    current = eplb_plan(PlannerInput(zipf_load(rng, layers, experts), workers, slots, EB))
    inp = PlannerInput(load, workers, slots, EB, current=current, domains=node_of)
    new, alone = plan("migration_aware", inp), migration_aware_plan(inp)
    check_valid(new, inp)
    assert new.replica_count() == alone.replica_count()
    assert set(experts_on_one_domain(new, node_of)) <= set(experts_on_one_domain(alone, node_of))
