"""`moe-serve serve`: start (or join) Ray, bring the cluster up, serve until SIGINT/SIGTERM, then drain.

Shutdown is graceful: on the first SIGTERM or SIGINT every router stops admitting (new requests get
UNAVAILABLE), reports NOT_SERVING on health, lets requests in flight finish for up to
`drain_grace_seconds` (then cancels the rest: FINISH_REASON_CANCELLED), and the cluster stops; the
process exits 0. A second signal skips what is left of the grace period.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from cluster.settings import CONTROLLER_NAME, NAMESPACE, ClusterSettings
from router_service.security import SecurityConfigError, ServerSecurity

log = logging.getLogger("moe-serve")

STOP_TIMEOUT_SECONDS = 30.0  # beyond the grace period: the last responses go out, the servers stop


def add_security_flags(p: argparse.ArgumentParser) -> None:
    """`moe-serve serve` flags for the ClusterSettings security and drain fields (each also MOE_SERVE_<FIELD>)."""
    g = p.add_argument_group("security and shutdown")
    g.add_argument("--tls-cert", dest="tls_cert_file", metavar="FILE",
                   help="PEM certificate chain: serve gRPC over TLS")
    g.add_argument("--tls-key", dest="tls_key_file", metavar="FILE", help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", dest="tls_client_ca_file", metavar="FILE",
                   help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    g.add_argument("--auth-token-file", metavar="FILE",
                   help="require 'authorization: Bearer <token>' (the file's content) on Generation and ClusterAdmin")
    g.add_argument("--drain-grace-seconds", type=float, metavar="S",
                   help="on SIGTERM, how long requests in flight may finish before they are cancelled (default 30)")


SECURITY_FLAGS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file", "drain_grace_seconds")


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    overrides = {"model": args.model, "num_workers": args.workers, "num_routers": args.routers, "port": args.port,
                 "host": args.host, "http_port": getattr(args, "http_port", None),
                 "router_resource": getattr(args, "router_resource", None),
                 "worker_resource": getattr(args, "worker_resource", None),
                 **{k: getattr(args, k, None) for k in SECURITY_FLAGS}}
    if args.config:
        settings = ClusterSettings.from_file(args.config, **overrides)
    else:
        settings = ClusterSettings(**{k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "no_http", False):
        settings = settings.model_copy(update={"http_port": None})
    return settings


def drain_node_routers(args: argparse.Namespace) -> int:
    """`moe-serve drain-router`: the controller drains and retires every router on the node this runs on."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        node = ray.get_runtime_context().get_node_id()
        drained = ray.get(controller.retire_routers.remote(node, args.grace_seconds))
    except (ValueError, ray.exceptions.RayError) as err:
        print(f"error: could not drain this node's routers: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()
    for summary in drained:
        print(f"moe-serve: router drained: {summary}", flush=True)
    if not drained:
        print("moe-serve: no router on this node", flush=True)
    return 0


def serve(args: argparse.Namespace) -> int:
    import ray

    from cluster.controller import kill_cluster, start_cluster, stop_cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    security = ServerSecurity.from_settings(settings)
    try:
        security.check()  # unreadable TLS or token files fail here, before Ray starts
    except SecurityConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        # A running controller: this Ray cluster outlived the process that started it (a head pod replaced
        # under GCS fault tolerance runs this command again). Serve that cluster as it is, with its settings.
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        print("moe-serve: a cluster is already running in this Ray cluster; serving it (its own settings "
              "apply, not this command's)", flush=True)
    except ValueError:
        controller, _ = start_cluster(settings)
    endpoints = ray.get(controller.endpoints.remote())
    targets = [f"{e['address']}:{e['grpc']}" for e in endpoints]
    scheme = "https" if security.tls else "http"
    urls = [f"{scheme}://{e['address']}:{e['http']}/v1" for e in endpoints if e["http"]]
    print(f"moe-serve: {settings.num_workers} expert workers, {len(endpoints)} routers serving gRPC on "
          f"{', '.join(targets)}"
          + (f", the OpenAI API on {', '.join(urls)}" if urls else "")
          + f" ({'TLS' if security.tls else 'plaintext'}, {'token' if security.auth else 'no'} authentication)",
          flush=True)
    if args.demo_prompt:
        from cluster.client import generate_remote

        # The demo trusts the server's own certificate (right for a self-signed one) and sends the server's token.
        demo = argparse.Namespace(target=targets[0], prompt=[args.demo_prompt], prompt_ids=[], json=False,
                                  timeout=300.0, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                                  max_tokens=args.max_tokens, stop=[], stop_token_ids=[], ignore_eos=True,
                                  logprobs=False, tls_ca=security.tls_cert_file, token=security.token())
        print(f"> {args.demo_prompt}", flush=True)
        generate_remote(demo)
    print("serving; Ctrl-C to stop", flush=True)

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second signal: stop waiting for requests in flight
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stop.wait()
    try:  # from here a second signal, however soon, ends the drain early (without a traceback)
        print(f"moe-serve: draining (up to {settings.drain_grace_seconds:g} s for requests in flight)", flush=True)
        try:
            summaries = ray.get(controller.drain_routers.remote(settings.drain_grace_seconds),
                                timeout=settings.drain_grace_seconds + STOP_TIMEOUT_SECONDS)
        except (ray.exceptions.RayError, TimeoutError) as err:  # stop_cluster kills what is left
            summaries = [{"error": f"the routers could not be drained: {err}"}]
        for summary in summaries:
            print(f"moe-serve: router drained: {summary}", flush=True)
        print("moe-serve: stopping", flush=True)
        stop_cluster(controller)
    except KeyboardInterrupt:
        print("moe-serve: second signal, stopping now", flush=True)
        try:
            kill_cluster()  # routers and workers are detached: each is killed by name
        except Exception:
            pass
        ray.shutdown()
        return 1
    ray.shutdown()
    return 0
