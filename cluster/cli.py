"""The `moe-serve` command line: one entry point, one sub-command per job.

    moe-serve serve [--model DIR] [--workers N]      start Ray, expert workers, routers; serve gRPC and HTTP
    moe-serve generate --target HOST:PORT --prompt TEXT   stream a completion from a running cluster
    moe-serve generate [--model DIR] --prompt TEXT   offline, single-process engine
    moe-serve status --target HOST:PORT             routers, placement and routing load
    moe-serve drain-router                          drain and retire this node's routers (pod preStop)
    moe-serve rebalance --target HOST:PORT          re-plan replicas for the current load, live
    moe-serve autoscaling --target HOST:PORT [...]  show or change the worker autoscaling policy
    moe-serve make-model --preset tiny DIR          write a random-weight checkpoint
    moe-serve bench engine ...                      engine vs transformers decode throughput
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=_prompt_ids, default=[], help="comma-separated ids that end generation")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", action="store_true", help="report each generated token's log-probability")


def _sampling_params(args):
    from router_service.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop),
                          stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos,
                          logprobs=args.logprobs)


def _model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    from cluster.make_model import default_model_dir

    return default_model_dir()


def cmd_make_model(args) -> int:
    from cluster.make_model import make_model

    out = make_model(args.preset, args.out_dir, dtype=args.dtype, layout=args.layout, seed=args.seed)
    print(out)
    return 0


def cmd_generate(args) -> int:
    if args.target:
        from cluster.client import generate_remote

        return generate_remote(args)
    from router_service.engine import EngineSettings, load_engine
    from router_service.errors import InvalidRequest

    engine = load_engine(_model_dir(args), EngineSettings(max_model_len=args.max_model_len))
    prompts = list(args.prompt_ids)
    if args.prompt:
        if engine.tokenizer is None:
            print("error: this checkpoint has no tokenizer.json; use --prompt-ids", file=sys.stderr)
            return 2
        prompts += [engine.tokenizer.encode(t) for t in args.prompt]
    if not prompts:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    try:
        completions = engine.generate(prompts, _sampling_params(args))
    except InvalidRequest as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for c in completions:
        if args.json:
            record = {"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text,
                      "finish_reason": c.finish_reason}
            if args.logprobs:
                record["logprobs"] = c.logprobs
            print(json.dumps(record), flush=True)
        else:
            print(f"{c.text!s}  [{c.finish_reason}, {len(c.token_ids)} tokens]", flush=True)
    return 0


def cmd_serve(args) -> int:
    from cluster.serve import serve

    return serve(args)


def cmd_drain_router(args) -> int:
    from cluster.serve import drain_node_routers

    return drain_node_routers(args)


def cmd_status(args) -> int:
    from cluster.client import print_status

    return print_status(args)


def cmd_rebalance(args) -> int:
    from cluster.client import rebalance

    return rebalance(args)


def cmd_autoscaling(args) -> int:
    from cluster.client import autoscaling

    return autoscaling(args)


def build_parser() -> argparse.ArgumentParser:
    from cluster.client import add_connection_flags
    parser = argparse.ArgumentParser(prog="moe-serve", description="Elastic expert serving for MoE language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint in the Hugging Face layout")
    p.add_argument("--preset", default="tiny", help="preset name (tiny, deepseek-moe-mini, ...)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--layout", choices=["per_expert", "fused"], default="per_expert",
                   help="expert tensor names: one per expert (default) or fused [E, ...] tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("serve", help="start the cluster and serve the gRPC API and the OpenAI HTTP API")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model, built on first use)")
    p.add_argument("--workers", type=int, help="expert workers (default 2)")
    p.add_argument("--routers", type=int,
                   help="routers per router node, on port, port+1, ... (default 1)")
    p.add_argument("--router-resource", metavar="NAME",
                   help="Ray custom resource of router nodes: routers run on every node that has it "
                        "(default: on this node)")
    p.add_argument("--worker-resource", metavar="NAME",
                   help="Ray custom resource of expert-worker nodes: workers run only where it is")
    p.add_argument("--port", type=int, help="gRPC port of the first router (default 50051)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    http = p.add_mutually_exclusive_group()
    http.add_argument("--http-port", type=int,
                      help="port of the first router's OpenAI-compatible HTTP API (default 8000; 0: a free port)")
    http.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto); default: start a local one")
    p.add_argument("--config", help="JSON file of cluster settings; flags override it")
    p.add_argument("--demo-prompt", help="once serving, stream this prompt's completion to the terminal")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens for --demo-prompt")
    p.set_defaults(func=cmd_serve)
    from cluster.serve import add_security_flags

    add_security_flags(p)

    p = sub.add_parser("drain-router", help="drain the routers on this node and retire them (a router pod's "
                       "preStop hook): new requests go elsewhere, requests in flight finish")
    p.add_argument("--address", default="auto", help="the Ray cluster to join (default: auto, this node's)")
    p.add_argument("--grace-seconds", type=float, default=None,
                   help="how long requests in flight may finish (default: the cluster's drain_grace_seconds)")
    p.set_defaults(func=cmd_drain_router)

    p = sub.add_parser("generate", help="generate a completion (from a cluster with --target, else offline)")
    p.add_argument("--target", help="HOST:PORT of a router, several separated by commas (tried in turn when one "
                   "is unavailable), or dns:///NAME:PORT; without it the single-process engine runs here")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a --target completion")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model, built on first use)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", type=_prompt_ids, default=[],
                   help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)
    add_connection_flags(p)

    p = sub.add_parser("status", help="placement plan and routing load of a running cluster")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="HOST:PORT of a router, several separated by commas (failover), or dns:///NAME:PORT")
    p.set_defaults(func=cmd_status)
    add_connection_flags(p)

    p = sub.add_parser("rebalance", help="re-plan replicas for the current routing load, live")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="HOST:PORT of a router, several separated by commas (failover), or dns:///NAME:PORT")
    p.add_argument("--reason", default="cli", help="recorded with the plan change")
    p.set_defaults(func=cmd_rebalance)
    add_connection_flags(p)

    p = sub.add_parser("autoscaling", help="show the worker autoscaling policy, or change some of its fields")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="HOST:PORT of a router, several separated by commas (failover), or dns:///NAME:PORT")
    on_off = p.add_mutually_exclusive_group()
    on_off.add_argument("--enable", action="store_const", const=True, default=None)
    on_off.add_argument("--disable", dest="enable", action="store_const", const=False)
    p.add_argument("--min-workers", type=int)
    p.add_argument("--max-workers", type=int)
    p.add_argument("--high-watermark", type=float, help="routed tokens per worker per second to scale out above")
    p.add_argument("--low-watermark", type=float, help="routed tokens per worker per second to scale in below")
    p.add_argument("--cooldown", type=float, help="seconds between two changes of the worker count")
    p.set_defaults(func=cmd_autoscaling)
    add_connection_flags(p)

    from cluster.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the console script: restart with the allocator and OpenMP runtime preloaded
        from cluster.process_env import reexec_with_preload

        reexec_with_preload(sys.argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
