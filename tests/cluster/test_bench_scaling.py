"""`moe-serve bench scaling` on a small DeepSeek-V3-family shape: the whole run and its JSON, and the pieces
docs/scaling.md's figures rest on, checked against what they count (no Ray, no model)."""

from __future__ import annotations

import argparse
import json

import torch

SMALL = ["--moe-layers", "3", "--dense-layers", "1", "--experts", "16", "--top-k", "4", "--n-group", "4",
         "--topk-group", "2", "--hidden", "64", "--expert-width", "32", "--workers", "4", "--routers", "2",
         "--batches", "1,8", "--steps", "2", "--windows", "3", "--tokens", "256", "--wire-reps", "5",
         "--workers-per-node", "2", "--context", "16"]


def _args(extra: list[str]) -> argparse.Namespace:
    from cluster.bench import scaling

    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    return parser.parse_args(SMALL + extra)


def test_bench_scaling_quick_run(tmp_path, capsys):
    from cluster.bench import scaling

    threads = torch.get_num_threads()
    assert scaling.run(_args(["--out", str(tmp_path / "scaling.json")])) == 0
    assert torch.get_num_threads() == threads  # the gate's thread count is put back
    out = capsys.readouterr().out
    assert "messages and bytes per decode step" in out and "floors of one decode step" in out
    record = json.loads((tmp_path / "scaling.json").read_text())
    assert record["shape"]["slots"] == 15  # the controller's default: ceil(1.25 * 48 / 4)
    rows = record["messages"]["replanned"]
    assert [(r["batch"], r["micro_batches"]) for r in rows] == [(1, 1), (1, 2), (8, 1), (8, 2)]
    for r in rows:
        assert 1 <= r["messages_per_layer"] <= 4 * r["micro_batches"]  # one per worker per dispatch at most
        assert r["messages_per_step_cluster"] == r["messages_per_step_router"] * 2
        assert r["request_bytes_per_layer"] > r["rows_per_message"] * r["messages_per_layer"] * 64 * 2
    by = {(r["batch"], r["micro_batches"]): r for r in rows}
    assert by[(1, 2)]["messages_per_layer"] == by[(1, 1)]["messages_per_layer"]  # one sequence: never split
    assert by[(8, 2)]["messages_per_layer"] > by[(8, 1)]["messages_per_layer"]  # two dispatches per layer
    for r in record["messages"]["replanned_per_node"]:
        assert r["messages_per_layer"] <= 2  # 4 workers on 2 nodes
    s = record["planner"]["summary"]
    assert s["planner_ms"] > 0 and s["eplb_ms"] > 0 and 0 < s["balancedness_after"] <= 1
    assert s["telemetry_reply_bytes"] > 0 and s["plan_push_bytes"] > 0 and s["expert_load_admin_bytes"] > 0
    assert record["wire"] and all(w["us_median"] > 0 for w in record["wire"])
    tier = record["attention_tier"]
    assert tier["routed_expert_bytes"] == 3 * 16 * 3 * 64 * 32 * 2
    assert tier["kv_bytes_per_token"] == 4 * (512 + 64) * 2  # MLA: latent and rope key per layer, bf16
    assert [f["batch"] for f in record["floors"]] == [1, 8]


def test_wire_bytes_match_the_format():
    from cluster.bench.scaling import collective_bytes, reply_bytes, request_bytes
    from expert_workers.wire import REQ, RSP

    # header | token [P] i32 | expert [P] i32 | hidden [T, H] bf16 | weight [P] bf16
    assert request_bytes(3, 5, 7168) == REQ.size + 5 * 4 * 2 + 3 * 7168 * 2 + 5 * 2
    assert reply_bytes(3, 7168) == RSP.size + 3 * 7168 * 2
    assert collective_bytes(3, 5, 7168) == (6 * 8 + 3 * 7168 * 2 + 2 * 5 * 4 + 5 * 2, 4 * 8 + 3 * 7168 * 2)


def test_one_token_sends_a_message_per_worker_it_visits():
    """With one replica per logical expert, a batch of one token sends exactly one message per worker its
    experts sit on: the dispatch plan's count equals the planner's workers_visited_per_token."""
    from cluster.bench import scaling
    from cluster.planner import initial_plan

    args = _args([])
    spec = scaling.make_spec(args)
    plan = initial_plan(spec, 4)
    routing = scaling.Routing(spec, zipf=1.0, hot=2, seed=3)
    rows = scaling.count_messages(spec, plan, routing, [1], routers=2, steps=3, micro_batches=[1])
    assert rows[0]["messages_per_layer"] == rows[0]["workers_visited_per_token"]
    assert rows[0]["rows_per_message"] == 1.0


def test_controller_gathers_every_routers_counts():
    from cluster.bench import scaling
    from cluster.planner import initial_plan

    args = _args([])
    spec = scaling.make_spec(args)
    routing = scaling.Routing(spec, zipf=1.0, hot=2, seed=0)
    ids, load, per_router = routing.window(64, routers=2)
    assert sum(load.values()) == 64 * 4 * 3  # top-4 pairs of 64 tokens in 3 MoE layers
    # The group-limited gate: every token's experts lie in at most topk_group groups.
    for x in ids:
        assert max(len(set((t // 4).tolist())) for t in x) <= 2
    out = scaling.controller_gather(initial_plan(spec, 4), per_router)
    assert out["load_gather_ms"] >= 0 and out["telemetry_reply_bytes"] > 0

    import asyncio

    from cluster.controller import Controller

    ctl = scaling.stand_in_controller(initial_plan(spec, 4), per_router)
    assert asyncio.run(Controller.load(ctl)) == load


def test_per_node_plan_merges_consecutive_workers():
    from cluster.bench.scaling import per_node_plan
    from cluster.planner import round_robin_plan

    plan = round_robin_plan((1, 2), 8, 4)
    nodes = per_node_plan(plan, 2)
    assert [w.worker_id for w in nodes.workers] == [0, 1]
    assert set(nodes.workers[0].replicas) == set(plan.workers[0].replicas) | set(plan.workers[1].replicas)
    nodes.validate()
