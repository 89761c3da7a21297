"""Metrics exported through `ray.util.metrics` (Prometheus sees them with a `ray_` prefix).

One home for every metric name, its tags and its description; routers and the
controller record through the small classes here. Per-expert counters are
exported from the telemetry window every few seconds, never on the decode path.

Names (Prometheus): ray_moe_serve_<name>, e.g. ray_moe_serve_expert_tokens_total{layer,expert}.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


def _metrics():
    from ray.util import metrics

    return metrics


Protocol = Literal["grpc", "http"]  # the front door a request came through: the `protocol` tag


class RouterMetrics:
    """A router's request, latency, queue and KV metrics, plus per-expert token counts.

    Request, latency and token metrics carry a `protocol` tag (grpc, or http for the OpenAI API); the
    `code` of requests_total is the gRPC status name (OK, INVALID_ARGUMENT, ...) or the HTTP status (200, 400, ...).
    """

    def __init__(self, router: str):
        m = _metrics()
        self.tags = {"router": router}
        tags = ("router", "protocol")
        self.requests = m.Counter("moe_serve_requests_total", "Finished requests by protocol and status code "
                                  "(gRPC status name, or HTTP status).", tag_keys=("router", "protocol", "code"))
        self.ttft = m.Histogram("moe_serve_time_to_first_token_seconds", "Arrival to first generated token.",
                                boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.itl = m.Histogram("moe_serve_inter_token_latency_seconds", "Time between two streamed tokens.",
                               boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.generated = m.Counter("moe_serve_generated_tokens_total", "Tokens generated.", tag_keys=tags)
        self.queue = m.Gauge("moe_serve_queue_depth", "Requests waiting for admission.", tag_keys=("router",))
        self.kv_used = m.Gauge("moe_serve_kv_slots_used", "KV cache slots in use.", tag_keys=("router",))
        self.kv_total = m.Gauge("moe_serve_kv_slots", "KV cache slots in all.", tag_keys=("router",))
        self.expert_tokens = m.Counter("moe_serve_expert_tokens_total", "Tokens routed to a logical expert.",
                                       tag_keys=("layer", "expert"))
        self._lock = threading.Lock()
        self._last_expert_counts = None  # [L, E] cumulative counts already exported

    def request_done(self, code: str, protocol: Protocol = "grpc") -> None:
        self.requests.inc(1, {**self.tags, "protocol": protocol, "code": code})

    def first_token(self, seconds: float, protocol: Protocol = "grpc") -> None:
        self.ttft.observe(seconds, {**self.tags, "protocol": protocol})

    def inter_token(self, seconds: float, protocol: Protocol = "grpc") -> None:
        self.itl.observe(seconds, {**self.tags, "protocol": protocol})

    def tokens(self, n: int, protocol: Protocol = "grpc") -> None:
        if n:
            self.generated.inc(n, {**self.tags, "protocol": protocol})

    def export(self, engine) -> None:
        """Periodic: queue, KV usage and per-expert routed tokens since the last export."""
        self.queue.set(engine.num_waiting, self.tags)
        self.kv_used.set(engine.kv.used_slots, self.tags)
        self.kv_total.set(engine.kv.num_slots, self.tags)
        load = engine.model.load
        if load is None:
            return
        counts = load.cumulative()  # [L, E]
        with self._lock:
            delta = counts if self._last_expert_counts is None else counts - self._last_expert_counts
            self._last_expert_counts = counts
        for li, e in delta.nonzero().tolist():
            self.expert_tokens.inc(int(delta[li, e]), {"layer": str(load.moe_layers[li]), "expert": str(e)})


class RequestTimer:
    """Arrival-relative timings of one request (one choice of an HTTP request); feeds the latency histograms
    when metrics are on. Event loop only."""

    def __init__(self, metrics: RouterMetrics | None, protocol: Protocol = "grpc"):
        self.metrics, self.protocol = metrics, protocol
        self.arrival = time.perf_counter()
        self.first_token: float | None = None  # seconds from arrival
        self.last_token = 0.0
        self.queue = 0.0  # seconds from arrival to admission

    def saw(self, out) -> None:
        """One StepOutput of the request arrived."""
        if not out.token_ids:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now - self.arrival
            self.queue = out.queue_seconds
            if self.metrics:
                self.metrics.first_token(self.first_token, self.protocol)
        elif self.metrics:
            self.metrics.inter_token(now - self.last_token, self.protocol)
        self.last_token = now
        if self.metrics:
            self.metrics.tokens(len(out.token_ids), self.protocol)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.arrival


class ControllerMetrics:
    """Fleet and placement metrics, recorded by the controller."""

    def __init__(self):
        m = _metrics()
        self.workers = m.Gauge("moe_serve_workers", "Expert workers in the current plan.")
        self.balancedness = m.Gauge(
            "moe_serve_balancedness", "Sum over MoE layers of mean tokens per worker / sum of max (each layer waits "
            "for its busiest worker: ideal / actual step time; 1.0 is perfect), as cluster.planner.balancedness.")
        self.plan_version = m.Gauge("moe_serve_plan_version", "Version of the placement plan routers use.")
        self.rebalances = m.Counter("moe_serve_rebalances_total", "Plan changes, by reason (PlanChangeReason).",
                                    tag_keys=("reason",))
        self.plans_dropped = m.Counter("moe_serve_plans_dropped_total",
                                       "Plans dropped, not rolled out, because computing them outlived "
                                       "plan_deadline_seconds; by reason (PlanChangeReason).",
                                       tag_keys=("reason",))
        self.replicas = m.Gauge("moe_serve_expert_replicas", "Replicas of a logical expert.",
                                tag_keys=("layer", "expert"))
        self.worker_rate = m.Gauge("moe_serve_worker_tokens_per_second",
                                   "Routed (token, expert) pairs per second a worker runs, all MoE layers summed.",
                                   tag_keys=("worker",))

    def plan(self, plan) -> None:
        self.workers.set(len(plan.workers))
        self.plan_version.set(plan.version)
        for (layer, expert), n in plan.replica_count().items():
            self.replicas.set(n, {"layer": str(layer), "expert": str(expert)})

    def load(self, balancedness: float, worker_rates: dict[str, float]) -> None:
        self.balancedness.set(balancedness)
        for worker, rate in worker_rates.items():
            self.worker_rate.set(rate, {"worker": worker})

    def rebalanced(self, reason: str) -> None:
        self.rebalances.inc(1, {"reason": reason})

    def plan_dropped(self, reason: str) -> None:
        self.plans_dropped.inc(1, {"reason": reason})
