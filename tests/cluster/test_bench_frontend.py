"""`moe-serve bench frontend` end to end on the tiny model: a real grpc.aio server in this process, its
client in another, offline and served steps timed on the engine thread, and the JSON."""

from __future__ import annotations

import argparse
import json
import math


def test_bench_frontend_quick_run(tiny_model, tmp_path, capsys):
    from cluster.bench import frontend

    parser = argparse.ArgumentParser()
    frontend.add_arguments(parser)
    args = parser.parse_args(["--model", tiny_model, "--batch", "3", "--tokens", "6", "--rounds", "2",
                              "--out", str(tmp_path / "frontend.json")])
    assert frontend.run(args) == 0
    assert "for the GIL or a core" in capsys.readouterr().out
    record = json.loads((tmp_path / "frontend.json").read_text())
    for mode in ("offline", "served"):
        r = record["result"][mode]
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0
        # CPU time of the engine thread cannot exceed the step's wall time (beyond clock granularity)
        assert r["engine_thread_cpu_ms"] <= r["step_ms"] + 1.0
    assert -0.05 < record["served_not_running_share"] < 1  # thread_time and perf_counter tick differently
