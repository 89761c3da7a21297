"""`moe-serve bench placement` on small shapes: both planners over the drifting trace, the budget
comparison, the plan-time table and the group trace, and the JSON they write (no Ray, no model)."""

from __future__ import annotations

import argparse
import json


def test_bench_placement_quick_run(tmp_path, capsys):
    from cluster.bench import placement

    parser = argparse.ArgumentParser()
    placement.add_arguments(parser)
    args = parser.parse_args(["--layers", "3", "--experts", "16", "--workers", "4", "--windows", "6",
                              "--tokens", "512", "--scale-windows", "0", "--group-layers", "2",
                              "--group-experts", "16", "--n-group", "4", "--topk-group", "2", "--group-top-k", "4",
                              "--group-workers", "4", "--group-windows", "3", "--group-tokens", "128",
                              "--out", str(tmp_path / "placement.json")])
    assert placement.run(args) == 0
    out = capsys.readouterr().out
    assert "quality at equal replica budgets" in out and "workers visited per token" in out
    record = json.loads((tmp_path / "placement.json").read_text())
    budgets = record["budgets"]["budgets"]
    assert [b["slots"] for b in budgets.values()] == [12, 15, 18]  # 48 logical experts on 4 workers, +3 layers
    for b in [record["summary"], *budgets.values()]:
        assert 0 < b["balancedness_ours"] <= 1 and 0 < b["balancedness_eplb"] <= 1
        assert b["moves_ratio"] >= 0 and b["planner_ms_ours"] > 0
    args.scale_windows = 3
    scale = placement.run_scale(args, shapes=(("2 x 8, 2 workers", 2, 8, 2, 2),))
    s = scale["shapes"]["2 x 8, 2 workers"]
    assert s["slots"] == 10 and s["planner_ms_eplb"] > 0 and s["controller_ms"] >= 0
    assert "plan time against shape" in capsys.readouterr().out
