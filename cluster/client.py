"""Client side of the CLI: stream a completion from a router, print cluster status.

Targets: `--target` takes one router (HOST:PORT), several separated by commas, or a gRPC name such as
`dns:///moe-serve-routers.default.svc.cluster.local:50051` (a headless Service: every router's address,
balanced round-robin by the channel). A call that finds its router UNAVAILABLE before any answer came
back is sent to the next target (failover); one cut off mid-stream is not repeated, since its tokens were
already printed.

Connection security (see router_service.security): `--tls-ca FILE` makes the channel TLS, verifying the
server against that CA (`--tls-cert`/`--tls-key` add a client certificate for mutual TLS); `--token` or
the MOE_SERVE_TOKEN environment variable sends `authorization: Bearer <token>` on every call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.errors import CONTROLLER_UNAVAILABLE_METADATA
from router_service.security import SecurityConfigError, client_channel

TOKEN_ENV = "MOE_SERVE_TOKEN"
TLS_CA_ENV = "MOE_SERVE_TLS_CA"

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb2.FinishReason.items()}


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key/--token for the sub-commands that talk to a router."""
    g = p.add_argument_group("connection security")
    g.add_argument("--tls-ca", metavar="FILE", default=None,
                   help=f"PEM CA that signed the server's certificate: connect with TLS (env {TLS_CA_ENV})")
    g.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for servers that require mutual TLS")
    g.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    g.add_argument("--token", default=None,
                   help=f"bearer token for servers that require one (default: env {TOKEN_ENV}; the flag is "
                        "visible in the process list, the variable is not)")


# A name that resolves to several addresses (dns:///, a headless Service) is balanced over all of them.
ROUND_ROBIN = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]


def targets_of(target: str) -> list[str]:
    """--target's routers, in the order they are tried: 'a:1,b:2' -> ['a:1', 'b:2']."""
    targets = [t.strip() for t in target.split(",") if t.strip()]
    if not targets:
        raise SecurityConfigError(f"--target {target!r} names no router; give HOST:PORT[,HOST:PORT...]")
    return targets


def open_channel(args, target: str | None = None) -> grpc.Channel:
    """The channel to `target` (default: --target's first) with the connection-security flags (absent flags:
    plaintext, no token)."""
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    tls_ca = getattr(args, "tls_ca", None) or os.environ.get(TLS_CA_ENV) or None
    return client_channel(target or targets_of(args.target)[0], tls_ca, token, getattr(args, "tls_cert", None),
                          getattr(args, "tls_key", None), options=ROUND_ROBIN)


class Unanswered(Exception):
    """A router could not take the call (UNAVAILABLE before any answer): try the next target."""

    def __init__(self, target: str, err: grpc.RpcError):
        super().__init__(f"{target}: {err.code().name}: {err.details()}")
        self.err = err


def with_failover(args, call, start: int = 0):
    """`call(channel, target)` on --target's routers from index `start` on, moving to the next while a router
    raises Unanswered; returns (result, index of the router that answered). The last router's error is
    raised as its grpc.RpcError."""
    targets = targets_of(args.target)
    for i in range(start, start + len(targets)):
        target = targets[i % len(targets)]
        with open_channel(args, target) as channel:
            try:
                return call(channel, target), i % len(targets)
            except Unanswered as unanswered:
                if i == start + len(targets) - 1:
                    raise unanswered.err from None
                print(f"{unanswered}; trying {targets[(i + 1) % len(targets)]}", file=sys.stderr, flush=True)


def unanswered(target: str, err: grpc.RpcError) -> grpc.RpcError | Unanswered:
    """`err` as Unanswered when the router never took the call (worth another target), else `err` itself. An
    UNAVAILABLE the controller caused is the same on every router: not worth another."""
    from_controller = CONTROLLER_UNAVAILABLE_METADATA in tuple(err.trailing_metadata() or ())
    return Unanswered(target, err) if err.code() == grpc.StatusCode.UNAVAILABLE and not from_controller else err


def wait_until_serving(target: str, timeout: float = 60.0, tls_ca: str | None = None) -> None:
    """Poll the standard health service until it says SERVING (health needs no token)."""
    deadline = time.monotonic() + timeout
    with client_channel(target, tls_ca) as channel:
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
    router = 0  # the target that answered last: the next prompt starts there

    def stream(prompt):
        def call(channel, target):
            ids, text, logprobs, last = [], [], [], None
            try:
                for msg in pb2_grpc.GenerationStub(channel).GenerateStream(build_request(args, prompt),
                                                                             timeout=args.timeout):
                    ids += msg.token_ids
                    logprobs += msg.logprobs
                    text.append(msg.text)
                    if not args.json:
                        print(msg.text, end="", flush=True)
                    last = msg
            except grpc.RpcError as err:
                raise (unanswered(target, err) if last is None else err) from None
            return ids, text, logprobs, last
        return with_failover(args, call, router)

    for prompt in prompts:
        try:
            (ids, text, logprobs, last), router = stream(prompt)
        except SecurityConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
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
    """Per (layer, expert): load as a heat map (shade: tokens / hottest expert) and replicas as digits."""
    shades = " .:-=+*#%@"
    by_layer: dict[int, dict[int, tuple[int, int]]] = {}
    for e in load.experts:
        by_layer.setdefault(e.layer, {})[e.expert] = (e.tokens, e.replicas)
    peak = max((e.tokens for e in load.experts), default=0) or 1
    width = max((len(experts) for experts in by_layer.values()), default=0)
    lines = [f"layer  {'load (shade: tokens / hottest)':<{max(width, 32)}}  replicas per expert"]
    for layer, experts in sorted(by_layer.items()):
        heat = "".join(shades[min(9, experts[e][0] * 9 // peak)] for e in sorted(experts))
        replicas = "".join(str(min(experts[e][1], 9)) for e in sorted(experts))
        lines.append(f"{layer:>5}  {heat:<{max(width, 32)}}  {replicas}")
    return "\n".join(lines)


def print_status(args) -> int:
    both = _admin_call(args, lambda stub: (stub.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=30),
                                           stub.GetExpertLoad(admin_pb2.GetExpertLoadRequest(), timeout=30)))
    if both is None:
        return 1
    placement, load = both
    tokens = {w.worker_id: w.tokens for w in load.workers}
    print(f"plan version {placement.plan_version}   workers {len(placement.workers)}   "
          f"balancedness {load.balancedness:.3f} (sum over MoE layers of mean tokens per worker / sum of max; "
          f"window {load.window_seconds:.0f} s)")
    print(f"{'router':<10}{'node':<10}{'gRPC':<24}{'HTTP':<24}")
    for r in placement.routers:
        print(f"{'router-' + r.router_id:<10}{r.node_id[:8]:<10}{r.grpc_address:<24}{r.http_address or '-':<24}")
    print()
    print(f"{'worker':<18}{'state':<10}{'node':<10}{'device':<14}{'replicas':>9}{'pairs':>10}")
    for w in placement.workers:
        state = admin_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_")
        print(f"{w.actor_name:<18}{state:<10}{w.node_id[:8]:<10}{w.device[:13]:<14}{len(w.replicas):>9}"
              f"{tokens.get(w.worker_id, 0):>10}")
    print()
    print(_load_grid(load))
    return 0


def _admin_call(args, call):
    """Run `call(stub)` on the first of --target's routers that answers; print a gRPC error as one line."""
    def on(channel, target):
        try:
            return call(admin_grpc.ClusterAdminStub(channel))
        except grpc.RpcError as err:
            raise unanswered(target, err) from None

    try:
        return with_failover(args, on)[0]
    except SecurityConfigError as err:
        print(f"error: {err}", file=sys.stderr)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    return None


def rebalance(args) -> int:
    r = _admin_call(args, lambda stub: stub.Rebalance(admin_pb2.RebalanceRequest(reason=args.reason), timeout=600))
    if r is None:
        return 1
    if r.dropped:
        print(f"plan v{r.old_plan_version} kept: the new plan took longer than the plan deadline to compute and "
              f"was dropped (its load was stale); try again", file=sys.stderr)
        return 1
    if r.new_plan_version == r.old_plan_version:
        print(f"plan v{r.old_plan_version} kept: no better placement for the current load "
              f"(balancedness {r.balancedness_before:.3f})")
    else:
        print(f"plan v{r.old_plan_version} -> v{r.new_plan_version}: balancedness {r.balancedness_before:.3f} -> "
              f"{r.balancedness_after:.3f}, {r.bytes_moved / 2**20:.1f} MiB of expert weights moved")
    return 0


def autoscaling(args) -> int:
    """Print the autoscaling policy; with any setting flag, change those fields first."""
    def call(stub):
        policy = stub.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest(), timeout=30)
        changes = {"enabled": args.enable, "min_workers": args.min_workers, "max_workers": args.max_workers,
                   "high_watermark_tokens_per_worker_per_second": args.high_watermark,
                   "low_watermark_tokens_per_worker_per_second": args.low_watermark,
                   "cooldown_seconds": args.cooldown}
        changes = {k: v for k, v in changes.items() if v is not None}
        for field, value in changes.items():
            setattr(policy, field, value)
        return stub.SetAutoscalingPolicy(policy, timeout=30) if changes else policy

    policy = _admin_call(args, call)
    if policy is None:
        return 1
    print(f"autoscaling {'on' if policy.enabled else 'off'}: workers {policy.min_workers}..{policy.max_workers}, "
          f"scale out above {policy.high_watermark_tokens_per_worker_per_second:g} and in below "
          f"{policy.low_watermark_tokens_per_worker_per_second:g} routed tokens per worker per second, "
          f"cooldown {policy.cooldown_seconds:g} s")
    return 0
