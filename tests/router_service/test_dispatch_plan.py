"""The vectorised dispatch plan (`plan_pairs`): hand-checked cases, and a property test against the
per-worker grouping the dispatcher used before it (one mask, masked selects and `torch.unique` per
worker), on random routings and placements with replicated experts and dead workers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.cluster_dispatch import NO_REPLICA, plan_dispatch, plan_pairs
from router_service.placement import PlacementPlan, ReplicaTable, WorkerPlacement


def placement(layer: int, E: int, hosts: dict[int, list[int]]) -> PlacementPlan:
    return PlacementPlan(1, E, (layer,), tuple(WorkerPlacement(w, f"w{w}", tuple((layer, e) for e in experts))
                                               for w, experts in hosts.items()))


def messages(plan) -> dict[int, tuple[list, list, list, list]]:
    return {w: (r.tolist(), t.tolist(), e.tolist(), x.tolist())
            for w, r, t, e, x in zip(plan.workers, plan.rows, plan.token, plan.expert, plan.weight)}


def test_worked_example_of_the_docstring():
    table = ReplicaTable.from_plan(placement(1, 4, {7: [0, 1], 9: [2, 3]}))
    ids = torch.tensor([[0, 2], [3, 1], [1, 0]])
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    plan = plan_dispatch(table, 1, ids, weights)
    assert plan.workers == [7, 9]
    assert messages(plan) == {
        7: ([0, 1, 2], [0, 1, 2, 2], [0, 1, 1, 0], pytest.approx([0.1, 0.4, 0.5, 0.6])),
        9: ([0, 1], [0, 1], [2, 3], pytest.approx([0.2, 0.3]))}
    assert plan.all_rows.tolist() == [0, 1, 2, 0, 1] and plan.row_counts == [3, 2]
    assert [t.dtype for t in plan.token + plan.expert] == [torch.int32] * 4


def test_replicas_take_an_experts_pairs_in_turn_and_bf16_weights_keep_their_bits():
    # expert 1 on workers 0 and 1: its pairs alternate w0, w1, w0 in token order
    table = ReplicaTable.from_plan(placement(1, 2, {0: [0, 1], 1: [1]}))
    ids = torch.tensor([[1], [1], [1]])
    weights = torch.tensor([[0.3], [0.7], [0.1]], dtype=torch.bfloat16)
    plan = plan_dispatch(table, 1, ids, weights)
    assert messages(plan)[0][:3] == ([0, 2], [0, 1], [1, 1]) and messages(plan)[1][:3] == ([1], [0], [1])
    assert plan.weight[0].dtype == torch.bfloat16
    assert torch.equal(plan.weight[0], weights[[0, 2], 0]) and torch.equal(plan.weight[1], weights[[1], 0])


def test_expert_without_a_live_replica_is_its_own_message_first():
    table = ReplicaTable.from_plan(placement(1, 4, {0: [0, 1], 1: [2, 3]}), exclude={1})
    plan = plan_dispatch(table, 1, torch.tensor([[0, 3], [2, 1]]), torch.ones(2, 2))
    assert plan.workers == [NO_REPLICA, 0]
    assert messages(plan)[NO_REPLICA][:3] == ([0, 1], [0, 1], [3, 2])
    assert messages(plan)[0][:3] == ([0, 1], [0, 1], [0, 1])


def test_no_pairs_no_messages():
    table = ReplicaTable.from_plan(placement(1, 4, {0: [0, 1], 1: [2, 3]}))
    plan = plan_dispatch(table, 1, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert plan.workers == [] and plan.all_rows.numel() == 0


def per_worker_grouping(table: ReplicaTable, layer: int, topk_ids, topk_weights):
    """The grouping the dispatcher used before the vectorised plan, as it was written then: pairs
    flattened in token order, then per worker a mask, masked selects and torch.unique."""
    T, K = topk_ids.shape
    token = torch.arange(T).repeat_interleave(K)
    expert, weight = topk_ids.reshape(-1), topk_weights.reshape(-1)
    index = torch.from_numpy(table.assign(layer, expert.numpy()))  # [P] index into worker_ids, -1: none
    out = {}
    for i in torch.unique(index).tolist():
        sel = index == i
        rows, local = torch.unique(token[sel], return_inverse=True)
        w = NO_REPLICA if i < 0 else table.worker_ids[i]
        out[w] = (rows.tolist(), local.tolist(), expert[sel].tolist(), weight[sel].tolist())
    return out


@st.composite
def routings(draw):
    E = draw(st.integers(1, 12))
    W = draw(st.integers(1, 5))
    # each expert on 1..W workers (replicas), some workers possibly dead
    hosts = {w: [] for w in range(W)}
    for e in range(E):
        for w in draw(st.sets(st.integers(0, W - 1), min_size=1, max_size=W)):
            hosts[w].append(e)
    dead = draw(st.sets(st.integers(0, W - 1), max_size=W - 1))
    T = draw(st.integers(0, 40))
    K = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    return E, hosts, dead, T, K, seed


@settings(max_examples=300, deadline=None, database=None)
@given(routings())
def test_plan_equals_the_per_worker_grouping(case):
    E, hosts, dead, T, K, seed = case
    g = torch.Generator().manual_seed(seed)
    table = ReplicaTable.from_plan(placement(3, E, hosts), exclude=dead)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(T, K, generator=g)
    plan = plan_dispatch(table, 3, ids, weights)
    assert messages(plan) == per_worker_grouping(table, 3, ids, weights)
    # messages follow the table's worker order, the pairs without a live replica first
    order = [NO_REPLICA] + table.worker_ids
    assert plan.workers == sorted(plan.workers, key=order.index)
    assert torch.equal(plan.all_rows, torch.cat(plan.rows)) if plan.rows else plan.all_rows.numel() == 0


@settings(max_examples=100, deadline=None, database=None)
@given(routings())
def test_pairs_out_of_token_order_group_like_sorted_ones(case):
    """Recovery re-plans a failed message's pairs, whose tokens need not come in order: each message
    must still list its rows ascending and index them right."""
    E, hosts, dead, T, K, seed = case
    g = torch.Generator().manual_seed(seed)
    table = ReplicaTable.from_plan(placement(3, E, hosts), exclude=dead)
    P = T * K
    token = torch.randint(0, max(T, 1), (P,), generator=g)
    expert = torch.randint(0, E, (P,), generator=g)
    weight = torch.rand(P, generator=g)
    plan = plan_pairs(table, 3, token, expert, weight, T)
    seen = []
    for w, rows, t, e, x in zip(plan.workers, plan.rows, plan.token, plan.expert, plan.weight):
        assert rows.tolist() == sorted(set(rows.tolist()))
        seen += list(zip(rows[t.long()].tolist(), e.tolist(), x.tolist()))
    assert sorted(seen) == sorted(zip(token.tolist(), expert.tolist(), weight.tolist()))
