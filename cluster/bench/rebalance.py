"""Inter-token latency during a live rebalance against steady state, under skewed load.

Concurrent gRPC streams decode continuously on a cluster whose routing is
skewed toward one expert (routing_bias); after a steady phase the controller
rebalances (workers load new replicas while serving, routers switch at a step
boundary, old replicas unload). Inter-token latency is the gap between two
stream messages at the client; gaps ending inside the rebalance are compared
with gaps of the steady phase before it, p50 and p99.
"""

from __future__ import annotations

import argparse
import threading
import time

from cluster.bench.common import machine, percentile, print_table, resolve_model, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: --preset, built once and cached)")
    p.add_argument("--preset", default="deepseek-moe-mini")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--streams", type=int, default=8, help="concurrent streams decoding throughout")
    p.add_argument("--steady-seconds", type=float, default=20.0)
    p.add_argument("--after-seconds", type=float, default=10.0, help="measured after the switch")
    p.add_argument("--hot-expert", type=int, default=3)
    p.add_argument("--bias", type=float, default=4.0, help="gate-logit bonus of the hot expert")
    p.add_argument("--load-duty", type=float, default=None,
                   help="replica_load_duty: fraction of the time workers copy weights (default: the setting's)")
    p.add_argument("--out", default="bench-results/rebalance.json")


def _stream_forever(port: int, stop: threading.Event, arrivals: list[float], errors: list[str], seed: int) -> None:
    import grpc

    from router_service.api import generation_pb2 as pb2
    from router_service.api import generation_pb2_grpc as pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.GenerationStub(channel)
        i = 0
        while not stop.is_set():
            prompt = [(seed * 7919 + i * 104729 + k * 31) % 30000 + 100 for k in range(16)]
            request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=prompt),
                                          sampling=pb2.SamplingParams(max_tokens=64, ignore_eos=True))
            try:
                last = None
                for _ in stub.GenerateStream(request, timeout=600):
                    now = time.perf_counter()
                    if last is not None:  # the first message of a request includes prefill: not an ITL
                        arrivals.append((now, now - last))
                    last = now
                    if stop.is_set():
                        break
            except grpc.RpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")
            i += 1


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.autoscaler import PlanChangeReason
    from cluster.controller import start_cluster, stop_cluster
    from cluster.settings import NAMESPACE, ClusterSettings
    from router_service.engine import EngineSettings

    model_dir = resolve_model(args.model, args.preset)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    settings = ClusterSettings(model=str(model_dir), num_workers=args.workers, port=0,
                               engine=EngineSettings(max_model_len=256, max_num_seqs=max(8, args.streams),
                                                     routing_bias={args.hot_expert: args.bias}),
                               rebalance_below_balancedness=None, load_window_seconds=args.steady_seconds + 60,
                               **({} if args.load_duty is None else {"replica_load_duty": args.load_duty}))
    controller, ports = start_cluster(settings)
    stop, arrivals, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_stream_forever, args=(ports[0], stop, arrivals, errors, s), daemon=True)
               for s in range(args.streams)]
    try:
        for t in threads:
            t.start()
        time.sleep(args.steady_seconds)
        t0 = time.perf_counter()
        record = ray.get(controller.rebalance.remote(PlanChangeReason.MANUAL, "bench: skewed load"))
        t1 = time.perf_counter()
        time.sleep(args.after_seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        stop_cluster(controller)
        if own_ray:
            ray.shutdown()
    warm = args.steady_seconds / 4  # skip start-up: the first requests' prefills and cold caches
    start = min(a for a, _ in arrivals) if arrivals else t0
    steady = [gap for at, gap in arrivals if start + warm <= at < t0]
    during = [gap for at, gap in arrivals if t0 <= at <= t1]
    after = [gap for at, gap in arrivals if t1 < at]
    rows, result = [], {}
    for name, gaps in (("steady", steady), ("during rebalance", during), ("after", after)):
        p50, p99 = (percentile(gaps, 50), percentile(gaps, 99)) if gaps else (float("nan"),) * 2
        rows.append([name, len(gaps), p50 * 1000, p99 * 1000])
        result[name] = {"samples": len(gaps), "p50_s": p50, "p99_s": p99}
    ratio = result["during rebalance"]["p99_s"] / result["steady"]["p99_s"]
    ratios = {phase: {q: result[phase][f"{q}_s"] / result["steady"][f"{q}_s"] for q in ("p50", "p99")}
              for phase in ("during rebalance", "after")}
    print(f"\nrebalance v{record['old_version']} -> v{record['new_version']} in {record['seconds']:.2f} s: "
          f"balancedness {record['balancedness_before']:.3f} -> {record['balancedness_after']:.3f}, "
          f"{record['bytes_moved'] / 2**20:.1f} MiB moved at load duty {settings.replica_load_duty:g}; "
          f"{args.streams} streams; stream errors: {len(errors)}")
    table = print_table(["phase", "ITL samples", "p50 ms", "p99 ms"], rows)
    print(f"p99 during rebalance / steady: {ratio:.2f}x (target <= 1.25x)")
    for phase, r in ratios.items():
        print(f"{phase} / steady: p50 {r['p50']:.2f}x (target <= 1.1x), p99 {r['p99']:.2f}x (target <= 1.25x)")
    phases = record.get("phases", {})
    print("plan change, seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    write_json(args.out, {"suite": "rebalance", "model": str(model_dir), "machine": machine(), "rebalance": record,
                          "load_duty": settings.replica_load_duty, "itl": result, "p99_ratio": ratio, "ratios_to_steady": ratios, "errors": errors,
                          "streams": args.streams,
                          "table": table})
    return 0 if not errors else 1
