"""Cluster settings: from flags, environment (MOE_SERVE_*) or a JSON config file.

Every field is typed, described and validated; unknown keys are errors.
Nested engine settings use `MOE_SERVE_ENGINE__MAX_NUM_SEQS=64` style variables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.autoscaler import AutoscalingPolicy
from cluster.planner import DEFAULT_MIGRATION_WEIGHT, PLANNERS
from expert_workers.experts import DEFAULT_LOAD_DUTY
from router_service.engine import EngineSettings

NAMESPACE = "moe-serve"  # Ray namespace of every named actor
CONTROLLER_NAME = "controller"
ROUTER_PREFIX = "router-"  # routers are named router-<id>; ids are never reused within a cluster


def router_name(router_id: int) -> str:
    return f"{ROUTER_PREFIX}{router_id}"


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOE_SERVE_", env_nested_delimiter="__", extra="forbid")

    model: str | None = Field(None, description="Checkpoint directory; default: the embedded tiny model.")
    num_workers: int = Field(2, ge=1, description="Expert workers to start with.")
    num_routers: int = Field(
        1, ge=1, description="Routers on each router node (the node where `moe-serve serve` runs, or every node "
        "with router_resource); each serves gRPC and HTTP on its own ports, counting up from port and http_port "
        "among the routers that share a node's address.")
    router_resource: str | None = Field(
        None, description="Ray custom resource that marks router nodes (a KubeRay router group's pods carry it). "
        "Set: num_routers routers run on every alive node with this resource, and the controller starts routers "
        "on nodes that join and drops those of nodes that leave. None: routers run on the node where "
        "`moe-serve serve` runs.")
    worker_resource: str | None = Field(
        None, description="Ray custom resource every expert worker asks for a sliver of (0.001), which keeps "
        "workers on the nodes that carry it (a KubeRay expert-worker group). None: any node with the CPUs and "
        "GPUs a worker asks for. Workers spread over nodes either way.")
    host: str = Field("127.0.0.1", description="Address the gRPC servers bind; 0.0.0.0 in a pod.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port of router 0; 0 picks a free port.")
    http_port: int | None = Field(
        8000, ge=0, le=65535, description="Port of router 0's OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health); routers count up from it as on gRPC; 0 picks a free port; "
        "None turns HTTP off.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Router engine settings.")
    transport: Literal["socket", "ray", "collective"] = Field(
        "socket", description="Expert dispatch data plane: 'socket' (fast: raw tensors over Unix/TCP sockets), "
                              "'ray' (reference: one Ray actor call per worker per MoE layer) or 'collective' "
                              "(a torch.distributed group per worker: NCCL GPU to GPU where router and worker "
                              "hold GPUs, else gloo).")
    data_plane_host: str = Field(
        "127.0.0.1", description="Address expert workers' TCP data plane binds: 'node' for the node's IP "
        "(multi-node clusters: routers on other nodes connect there); same-node routers use Unix sockets.")
    worker_num_cpus: float = Field(0.25, gt=0, description="CPUs each expert worker asks Ray for.")
    worker_num_gpus: float | None = Field(
        None, ge=0, description="GPUs each expert worker asks Ray for; default 1 when the cluster has GPUs, else 0.")
    router_num_cpus: float = Field(0.5, ge=0, description="CPUs each router asks Ray for.")
    router_num_gpus: float = Field(
        0.0, ge=0, description="GPUs each router asks Ray for: 1 on GPU router pods, so that the router's "
        "attention, shared experts and KV cache run on the pod's GPU (Ray hands a GPU only to an actor that asks). "
        "0: routers compute on CPUs.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per expert worker process; default: the CPUs it asks Ray for "
        "(worker_num_cpus, rounded down, at least 1), so that processes sharing a node do not oversubscribe it.")
    router_torch_threads: int | None = Field(
        None, ge=1, description="torch threads in each router process; default: every CPU of its node (a router "
        "computes while its workers wait for its tokens, and waits while they compute).")
    load_window_seconds: float = Field(60.0, gt=0, description="Sliding window of routing-load telemetry.")
    plan_deadline_seconds: float | None = Field(
        None, gt=0, description="A plan that takes longer than this to compute is dropped, not rolled out: the "
                                "load it was planned from is stale by then (default: load_window_seconds).")
    start_timeout_seconds: float = Field(300.0, gt=0, description="How long actors may take to start and load.")
    autoscaling: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy,
                                           description="Worker autoscaling policy (off by default).")
    placement_policy: Literal[tuple(PLANNERS)] = Field(  # type: ignore[valid-type]
        "migration_aware", description="Replica planner: 'migration_aware' (ours) or 'eplb' (the published policy).")
    migration_weight: float = Field(
        DEFAULT_MIGRATION_WEIGHT, ge=0,
        description="Balancedness that moving every logical expert's weights once is worth; 0 ignores movement.")
    replica_slots_per_worker: int | None = Field(
        None, ge=1, description="Replicas one worker's memory holds; default 1.25 x its share of logical experts.")
    replica_load_duty: float = Field(
        DEFAULT_LOAD_DUTY, gt=0, le=1, description="Fraction of the time an expert worker spends copying weights "
        "while it loads replicas live (each layer's copy is followed by a pause, leaving cores and memory "
        "bandwidth to decoding); 1: as fast as it can. Default measured with `moe-serve bench rebalance` "
        "(docs/rebalancing.md).")
    rebalance_below_balancedness: float | None = Field(
        0.75, gt=0, le=1, description="Rebalance automatically when balancedness falls below this (None: only on request).")
    rebalance_min_tokens: int = Field(
        300, ge=0, description="Least routed tokens (tokens through the model) in the window before an automatic "
                               "rebalance (avoids noise).")
    # Security of the routers' gRPC servers (router_service.security). Files are read by each router, so they
    # must exist at the same path on every node that runs one (a mounted Kubernetes Secret, say).
    tls_cert_file: str | None = Field(
        None, description="PEM certificate chain of the gRPC servers; with tls_key_file turns TLS on (else plaintext).")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token that Generation and ClusterAdmin calls must carry (health and reflection "
                          "stay open); prefer auth_token_file. Unset with auth_token_file unset: no authentication.")
    auth_token_file: str | None = Field(
        None, description="File holding the bearer token (surrounding whitespace ignored), e.g. a mounted Secret.")
    drain_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM: how long in-flight requests may run to completion before they are "
                                "cancelled (new requests are refused UNAVAILABLE, health says NOT_SERVING meanwhile).")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "ClusterSettings":
        data = json.loads(Path(path).read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
