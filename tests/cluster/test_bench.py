"""`moe-serve bench serving` end to end on the tiny model: every figure group, the JSON, the plots.

Runs in the session's shared Ray instance (the suite must neither shut it down nor leave a cluster
running), with the smallest settings that still exercise every path.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

pytestmark = pytest.mark.cluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _parse(argv: list[str]) -> argparse.Namespace:
    from cluster.bench import serving

    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_serving_quick_run(ray_session, tiny_model, tmp_path, capsys):
    from cluster.bench import serving
    from cluster.settings import CONTROLLER_NAME, NAMESPACE

    args = _parse(["--model", tiny_model, "--batch", "1,2", "--tokens", "10", "--rounds", "1", "--streams", "3",
                   "--stagger-ms", "5", "--no-reference", "--micro-batches", "1,2", "--out-dir", str(tmp_path)])
    assert serving.run(args) == 0
    out = capsys.readouterr().out

    # The caller's Ray is still up and no cluster is left behind.
    assert ray_session.is_initialized()
    with pytest.raises(ValueError):
        ray_session.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)

    record = json.loads((tmp_path / "serving.json").read_text())
    assert record["suite"] == "serving" and record["machine"]["cpus"] >= 1
    for group in ("throughput", "latency", "dispatch", "memory", "breakdown"):
        assert record[group], group

    # 1. tokens/s of the engine and both clusters at every batch, with ratios; no transformers.
    rows = record["throughput"]["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        for s in ("engine", "cluster-ray", "cluster-socket", "cluster-socket-mb2"):
            assert _positive(r["tokens_per_s"][s]), (r["batch"], s, r)
        for s in ("cluster-ray", "cluster-socket", "cluster-socket-mb2"):
            assert _positive(r["ratio_to_engine"][s])
        assert "transformers" not in r["tokens_per_s"]
        # --micro-batches 1,2: the overlap's ratio to the unsplit socket cluster, plain and through the engine.
        assert set(r["overlap"]) == {"cluster-socket-mb2"}
        assert all(_positive(v) for v in r["overlap"]["cluster-socket-mb2"].values())
    assert record["systems"] == ["engine", "cluster-ray", "cluster-socket", "cluster-socket-mb2", "transformers"]

    # 2. latency percentiles, over gRPC and over the OpenAI HTTP API on the same router.
    lat = record["latency"]
    assert lat["streams"] == 3
    for protocol in ("grpc", "http"):
        assert lat[protocol]["itl_samples"] == 3 * (10 - 1), protocol
        for metric in ("ttft_ms", "itl_ms"):
            assert _positive(lat[protocol][metric]["p50"]) and _positive(lat[protocol][metric]["p99"])
            assert lat[protocol][metric]["p50"] <= lat[protocol][metric]["p99"]

    # 3. dispatch overhead per MoE layer next to the pipe floor, for both transports.
    d = record["dispatch"]
    assert d["batch"] == 2 and d["moe_layers"] == 3 and d["payload_bytes"] == 2 * 64 * 4
    assert set(d["transports"]) == {"ray", "socket", "socket-mb2"}
    for name, t in d["transports"].items():
        for k in ("routed_us", "worker_compute_us", "overhead_us", "floor_us", "overhead_over_floor"):
            # with two micro-batches the compute can hide behind the other's attention: overhead may be < 0
            assert _positive(t[k]) or (name == "socket-mb2" and math.isfinite(t[k])), (k, t)
        assert _positive(t["direct_round_trip_us"]) and math.isfinite(t["direct_overhead_us"])
        assert math.isfinite(t["client_side_overhead_us"])

    # 4. peak RSS of this process, the router and both workers of each cluster.
    processes = {m["process"]: m["peak_rss_bytes"] for m in record["memory"]["processes"]}
    assert all(_positive(v) for v in processes.values())
    for cluster in ("ray transport", "socket transport", "socket transport, 2 micro-batches"):
        for name in ("router-0", "expert-worker-0", "expert-worker-1"):
            assert f"{name} ({cluster})" in processes, processes
    assert any(p.startswith("bench") for p in processes)

    # 5. step breakdown: shares of each system sum to one; the clusters' routed time is split.
    bd = record["breakdown"]["systems"]
    assert set(bd) == {"engine", "cluster-ray", "cluster-socket", "cluster-socket-mb2"}
    for system, b in bd.items():
        assert _positive(b["step_ms"])
        assert all(v >= 0 and math.isfinite(v) for v in b["shares"].values())
        assert sum(b["shares"].values()) == pytest.approx(1.0)
        assert _positive(b["shares"]["attention"]) and _positive(b["shares"]["LM head"])
    for system in ("cluster-ray", "cluster-socket"):
        assert _positive(bd[system]["shares"]["routed dispatch"])
        assert len(bd[system]["worker_compute_ms_per_step"]) == 2
    assert bd["engine"]["shares"]["routed dispatch"] == 0 and _positive(bd["engine"]["shares"]["routed compute"])

    # Plots are real PNGs.
    for name in ("serving-throughput.png", "serving-breakdown.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name

    # The printed tables name the systems and every figure group.
    for s in ("engine", "cluster-ray", "cluster-socket", "cluster-socket-mb2", "transformers"):
        assert s in out
    for heading in ("decode tokens/s", "latency", "HTTP/gRPC", "dispatch per MoE layer", "peak memory",
                    "decode step goes"):
        assert heading in out
