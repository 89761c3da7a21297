"""Client side of the CLI: stream a completion from a router, print cluster status."""

from __future__ import annotations

import json
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb2.FinishReason.items()}


def wait_until_serving(target: str, timeout: float = 60.0) -> None:
    """Poll the standard health service until it says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} is not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


def build_request(args, prompt) -> pb2.GenerateRequest:
    sampling = pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                                  stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
    if args.top_p != 1.0:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb2.GenerateRequest(sampling=sampling, return_logprobs=args.logprobs)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def generate_remote(args) -> int:
    prompts = [*args.prompt, *args.prompt_ids]
    if not prompts:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.target) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        for prompt in prompts:
            ids, text, logprobs, last = [], [], [], None
            try:
                for msg in stub.GenerateStream(build_request(args, prompt), timeout=args.timeout):
                    ids += msg.token_ids
                    logprobs += msg.logprobs
                    text.append(msg.text)
                    if not args.json:
                        print(msg.text, end="", flush=True)
                    last = msg
            except grpc.RpcError as err:
                print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
                return 1
            reason = FINISH_NAMES[last.finish_reason]
            if args.json:
                record = {"prompt": prompt, "token_ids": ids, "text": "".join(text), "finish_reason": reason,
                          "usage": {"prompt_tokens": last.usage.prompt_tokens,
                                    "completion_tokens": last.usage.completion_tokens}}
                if args.logprobs:
                    record["logprobs"] = logprobs
                print(json.dumps(record), flush=True)
            else:
                t = last.timings
                print(f"\n[{reason}, {len(ids)} tokens, first token {t.time_to_first_token_seconds * 1000:.0f} ms, "
                      f"total {t.total_seconds:.2f} s]", flush=True)
    return 0


def _load_grid(load: admin_pb2.ExpertLoad) -> str:
    """Tokens per (layer, expert) as a heat-map-like grid: one row per layer, one column per expert."""
    shades = " .:-=+*#%@"
    by_layer: dict[int, dict[int, tuple[int, int]]] = {}
    for e in load.experts:
        by_layer.setdefault(e.layer, {})[e.expert] = (e.tokens, e.replicas)
    peak = max((e.tokens for e in load.experts), default=0) or 1
    lines = ["layer  load per expert (shade: tokens / hottest; digit: replicas when > 1)"]
    for layer, experts in sorted(by_layer.items()):
        cells = []
        for e in sorted(experts):
            tokens, replicas = experts[e]
            cells.append(str(replicas) if replicas > 1 else shades[min(9, tokens * 9 // peak)])
        lines.append(f"{layer:>5}  {''.join(cells)}")
    return "\n".join(lines)


def print_status(args) -> int:
    with grpc.insecure_channel(args.target) as channel:
        stub = admin_grpc.ClusterAdminStub(channel)
        try:
            placement = stub.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30)
            load = stub.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=30)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    tokens = {w.worker_id: w.tokens for w in load.workers}
    print(f"plan version {placement.plan_version}   workers {len(placement.workers)}   "
          f"balancedness {load.balancedness:.3f} (mean/max tokens per worker, window {load.window_seconds:.0f} s)")
    print(f"{'worker':<18}{'state':<10}{'device':<14}{'replicas':>9}{'tokens':>10}")
    for w in placement.workers:
        state = admin_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_")
        print(f"{w.actor_name:<18}{state:<10}{w.device[:13]:<14}{len(w.replicas):>9}{tokens.get(w.worker_id, 0):>10}")
    print()
    print(_load_grid(load))
    return 0
