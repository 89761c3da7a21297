"""`moe-serve serve`: start (or join) Ray, bring the cluster up, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from cluster.settings import NAMESPACE, ClusterSettings

log = logging.getLogger("moe-serve")


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    overrides = {"model": args.model, "num_workers": args.workers, "num_routers": args.routers, "port": args.port,
                 "host": args.host}
    if args.config:
        return ClusterSettings.from_file(args.config, **overrides)
    return ClusterSettings(**{k: v for k, v in overrides.items() if v is not None})


def serve(args: argparse.Namespace) -> int:
    import ray

    from cluster.controller import start_cluster, stop_cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    controller, ports = start_cluster(settings)
    targets = [f"{settings.host}:{p}" for p in ports]
    print(f"moe-serve: {settings.num_workers} expert workers, routers serving gRPC on {', '.join(targets)}",
          flush=True)
    if args.demo_prompt:
        from cluster.client import generate_remote

        demo = argparse.Namespace(target=targets[0], prompt=[args.demo_prompt], prompt_ids=[], json=False,
                                  timeout=300.0, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                                  max_tokens=args.max_tokens, stop=[], stop_token_ids=[], ignore_eos=True,
                                  logprobs=False)
        print(f"> {args.demo_prompt}", flush=True)
        generate_remote(demo)
    print("serving; Ctrl-C to stop", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("moe-serve: stopping", flush=True)
    stop_cluster(controller)
    ray.shutdown()
    return 0
