"""DeepSeek-V3's shape on paper: dispatch messages and bytes, planner time and controller load at 64 workers, 8 routers.

No model, no cluster, no Ray: every count comes from the project's own code run at that shape.
  spec       DeepSeek-V3's config.json values through expert_workers.spec.spec_from_config (58 MoE layers of
             256 routed experts, top-8 within the best 4 of 8 groups, hidden 7168, width 2048, 1 shared).
  routing    the router's gate on synthetic logits: sigmoid scores, router_service.model.limit_to_groups
             (top-2-sum group scores), top-8, renormalised and scaled by 2.5, bf16 weights. Expert
             popularity is Zipf (--zipf; 0 = uniform) over a random expert order per layer, plus Gumbel
             noise per token; every --shift-every windows the hottest experts trade places with cooler ones
             (the drifting load of `moe-serve bench placement`).
  plans      cluster.planner: initial_plan (grouped_plan, as the controller starts V3), then each window a
             re-plan as the controller makes it (migration_aware with PlannerInput.groups = 8, the
             controller's default slots: 1.25 x each worker's share), timed, next to EPLB and to
             migration_aware without groups.
  messages   per decode step, each router's batch of B sequences (one token each) through every MoE layer:
             router_service.cluster_dispatch.plan_dispatch on the plan's ReplicaTable gives the messages
             (one per worker with pairs), rows and pairs of each; expert_workers.wire.send_request into a
             counting socket gives each request's bytes, the server's reply framing each reply's. With
             --micro-batches 2 a step's batch splits in two dispatches per layer (as the engine does).
  controller cluster.controller.Controller.load (the telemetry gathering) and .expert_load (the admin
             message) on stand-in routers that answer with their [L][E] counts; the pickled size of one
             router's answer and of a plan pushed to the routers; plan_change and balancedness timed as
             `moe-serve bench placement` times them; ReplicaTable.from_plan (a router's switch to a plan,
             on its engine thread) timed.
  wire       optional: round trips of real requests of the measured sizes over a Unix socket pair, a thread
             running the worker's receive/reply loop (expert_workers.wire), to split a message's cost into a
             fixed part and a per-byte part on this machine.
  tiers      the attention tier's memory from cluster.make_model's tensor list and router_service.kv_cache;
             its MLA decode work as router_service.model._mla_expand does it (the cached latent expanded to
             per-head keys and values every step).

The hardware rates in the bottleneck table (--link-gbps, --per-message-us) are inputs, not measurements of a
cluster; the defaults cite docs/data-plane.md's measured per-message Python cost.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import pickle
import socket
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cluster.bench.common import machine, print_table, write_json
from cluster.planner import (PlannerInput, balancedness, eplb_plan, expert_groups, experts_on_one_domain, initial_plan,
                             migration_aware_plan, plan_change, plan_group_spread, spread_over_domains,
                             workers_visited_per_token)
from expert_workers.spec import ModelSpec, spec_from_config
from expert_workers import wire
from expert_workers.wire import ReceiveBuffer, recv_request, recv_response, send_request, send_response
from router_service.cluster_dispatch import plan_dispatch
from router_service.model import MICRO_BATCH_MIN_TOKENS, limit_to_groups
from router_service.placement import PlacementPlan, ReplicaTable, WorkerPlacement

# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3), the fields spec_from_config reads.
V3_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SLOT_SPARE = 1.25  # the controller's default replica_slots_per_worker: 1.25 x a worker's share


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shape (defaults: DeepSeek-V3)")
    g.add_argument("--moe-layers", type=int, default=58)
    g.add_argument("--dense-layers", type=int, default=3, help="dense layers before the first MoE layer")
    g.add_argument("--experts", type=int, default=256, help="routed experts per MoE layer")
    g.add_argument("--top-k", type=int, default=8)
    g.add_argument("--n-group", type=int, default=8)
    g.add_argument("--topk-group", type=int, default=4)
    g.add_argument("--hidden", type=int, default=7168)
    g.add_argument("--expert-width", type=int, default=2048, help="moe_intermediate_size")
    g.add_argument("--shared-experts", type=int, default=1)
    g.add_argument("--workers", type=int, default=64)
    g.add_argument("--routers", type=int, default=8)
    g.add_argument("--slots", type=int, help="replica slots per worker (default: the controller's, 1.25 x share)")
    g = p.add_argument_group("dispatch")
    g.add_argument("--batches", default="1,32,128,256", help="sequences per router in a decode step")
    g.add_argument("--steps", type=int, default=2, help="decode steps drawn per router and batch size")
    g.add_argument("--micro-batches", default="1,2", help="dispatches per layer and step: 1, 2 or both")
    g.add_argument("--workers-per-node", type=int, default=8,
                   help="workers per node (consecutive ids): the planner spreads replicas over the nodes, and "
                        "messages are also counted as if one went to each node (0 or 1: neither)")
    g = p.add_argument_group("load trace (as `moe-serve bench placement`)")
    g.add_argument("--windows", type=int, default=6, help="load windows; a re-plan after each")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per window, over all routers")
    g.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity (0: uniform)")
    g.add_argument("--shift-every", type=int, default=4, help="windows between hot-set rotations")
    g.add_argument("--hot", type=int, default=8, help="hottest experts per layer that rotate out")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("controller")
    g.add_argument("--telemetry-tokens", type=int, default=256 * 20 * 60,
                   help="tokens one router decodes in a 60 s load window (default 256 sequences at 20 tok/s), "
                        "for the size of its telemetry answer")
    g.add_argument("--from-plan", action=argparse.BooleanOptionalAction, default=True,
                   help="time ReplicaTable.from_plan (seconds at V3's shape)")
    g = p.add_argument_group("tiers and rates")
    g.add_argument("--context", type=int, default=4096, help="tokens in each sequence's KV cache")
    g.add_argument("--wire-reps", type=int, default=200, help="round trips per size on a Unix socket pair (0: skip)")
    g.add_argument("--link-gbps", default="100,400", help="router NIC speeds for the bottleneck table, Gb/s")
    g.add_argument("--per-message-us", type=float, default=25.0,
                   help="router Python per message sent and received (docs/data-plane.md: 20-30 us)")
    g.add_argument("--worker-per-message-us", type=float, default=125.0,
                   help="worker Python per message: receive 35 + reply 25 + ExpertGroup.run 65 (docs/data-plane.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the gate")
    p.add_argument("--out", default="bench-results/scaling.json")


# --- shape ------------------------------------------------------------------------------------------


def make_spec(args: argparse.Namespace) -> ModelSpec:
    """DeepSeek-V3's spec, or a smaller one of the same family from the shape arguments."""
    cfg = {**V3_CONFIG, "num_hidden_layers": args.dense_layers + args.moe_layers,
           "first_k_dense_replace": args.dense_layers, "n_routed_experts": args.experts,
           "num_experts_per_tok": args.top_k, "n_group": args.n_group, "topk_group": args.topk_group,
           "hidden_size": args.hidden, "moe_intermediate_size": args.expert_width,
           "n_shared_experts": args.shared_experts}
    return spec_from_config(cfg)


def default_slots(spec: ModelSpec, workers: int) -> int:
    return math.ceil(len(spec.logical_experts) * SLOT_SPARE / workers)


# --- routing ----------------------------------------------------------------------------------------


class Routing:
    """The router's gate on synthetic logits, per MoE layer, with a popularity that drifts over windows."""

    def __init__(self, spec: ModelSpec, zipf: float, hot: int, seed: int):
        self.spec, self.moe = spec, spec.moe
        E = self.moe.num_experts
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.log_pop = -zipf * torch.log(torch.arange(1, E + 1, dtype=torch.float32))  # by rank
        self.ranking = [self.rng.permutation(E) for _ in spec.moe_layers]  # ranking[l][r]: expert of rank r
        self.hot = min(hot, E // 2)

    def rotate(self) -> None:
        """Each hot expert trades ranks with a random cooler one (as `bench placement`'s trace)."""
        E = self.moe.num_experts
        for perm in self.ranking:
            for r in range(self.hot):
                j = self.rng.integers(self.hot, E)
                perm[[r, j]] = perm[[j, r]]

    def route(self, li: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [T, K] and bf16 weights [T, K] of `tokens` tokens at MoE layer index li, as
        CausalLM.route picks them for DeepSeek-V3 (sigmoid, group-limited, top-k, renormalised, scaled)."""
        moe, E = self.moe, self.moe.num_experts
        prior = torch.empty(E)
        prior[torch.from_numpy(self.ranking[li])] = self.log_pop
        u = torch.rand(tokens, E, generator=self.gen).clamp_(1e-9, 1 - 1e-9)
        logits = prior - torch.log(-torch.log(u))  # [T, E] popularity plus Gumbel noise
        scores = logits.sigmoid()
        choice = limit_to_groups(scores, moe) if moe.n_group > 1 else scores
        ids = torch.topk(choice, moe.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, ids)
        if moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, (weights * moe.routed_scaling_factor).to(torch.bfloat16)

    def window(self, tokens: int, routers: int) -> tuple[list[torch.Tensor], dict, list[list[list[int]]]]:
        """One load window: ids per layer [T, K], the load {(layer, expert): pairs}, and each router's
        telemetry answer [L][E] (token i decoded by router i mod routers)."""
        E = self.moe.num_experts
        ids = [self.route(li, tokens)[0] for li in range(len(self.spec.moe_layers))]
        load, per_router = {}, [[] for _ in range(routers)]
        owner = torch.arange(tokens) % routers
        for layer, x in zip(self.spec.moe_layers, ids):
            counts = torch.bincount(x.reshape(-1), minlength=E)
            load.update({(layer, e): int(n) for e, n in enumerate(counts.tolist())})
            for r in range(routers):
                per_router[r].append(torch.bincount(x[owner == r].reshape(-1), minlength=E).tolist())
        return ids, load, per_router


# --- wire bytes -------------------------------------------------------------------------------------


def request_bytes(rows: int, pairs: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one dispatch request on the socket wire."""
    return wire.request_bytes(rows, pairs, hidden, dtype)


def reply_bytes(rows: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one reply on the socket wire."""
    return wire.response_bytes(rows, hidden, dtype)


def collective_bytes(rows: int, pairs: int, hidden: int, element: int = 2) -> tuple[int, int]:
    """(request, reply) bytes on a collective link: int64 headers (expert_workers.collective's REQ_LEN,
    RSP_LEN), hidden, int32 pairs [2, P], weight [P]; out [T, H]."""
    from expert_workers.collective import REQ_LEN, RSP_LEN

    return 8 * REQ_LEN + rows * hidden * element + 8 * pairs + element * pairs, 8 * RSP_LEN + rows * hidden * element


# --- messages per decode step -----------------------------------------------------------------------


def dispatch_step(table: ReplicaTable, layer: int, ids: torch.Tensor, weights: torch.Tensor, hidden: int,
                  micro_batches: int, pairs_per_worker: dict[int, int]) -> dict:
    """One MoE layer of one router's decode step: its dispatches' messages and bytes (see the module doc)."""
    T = ids.shape[0]
    halves = [slice(0, T)]
    if micro_batches == 2 and T >= 2 and T >= MICRO_BATCH_MIN_TOKENS:  # as split_micro_batches: one token each
        halves = [slice(0, (T + 1) // 2), slice((T + 1) // 2, T)]
    out = {"messages": 0, "rows": 0, "pairs": 0, "request_bytes": 0, "reply_bytes": 0, "header_bytes": 0,
           "pair_bytes": 0, "collective_bytes": 0, "plan_s": 0.0}
    for h in halves:
        began = time.perf_counter()
        plan = plan_dispatch(table, layer, ids[h], weights[h])
        out["plan_s"] += time.perf_counter() - began
        for w, rows, tok in zip(plan.workers, plan.row_counts, plan.token):
            P = tok.numel()
            req, rsp = request_bytes(rows, P, hidden), reply_bytes(rows, hidden)
            out["messages"] += 1
            out["rows"] += rows
            out["pairs"] += P
            out["request_bytes"] += req
            out["reply_bytes"] += rsp
            out["header_bytes"] += request_bytes(0, 0, hidden) + reply_bytes(0, hidden)
            out["pair_bytes"] += req - request_bytes(rows, 0, hidden)  # token, expert, weight of each pair
            out["collective_bytes"] += sum(collective_bytes(rows, P, hidden))
            pairs_per_worker[w] = pairs_per_worker.get(w, 0) + P
    return out


def count_messages(spec: ModelSpec, plan: PlacementPlan, routing: Routing, batches: list[int], routers: int,
                   steps: int, micro_batches: list[int]) -> list[dict]:
    """Per batch size and micro-batch count: per router and cluster-wide, messages and bytes of a decode step."""
    table = ReplicaTable.from_plan(plan)
    H, L = spec.hidden_size, len(spec.moe_layers)
    rows = []
    for B in batches:
        # Each router's steps draw their own tokens; every micro-batch setting sees the same draws.
        draws = [[routing.route(li, B) for li in range(L)] for _ in range(routers * steps)]
        visited = workers_visited_per_token(plan, [(layer, tuple(t)) for d in draws for layer, (x, _) in
                                                   zip(spec.moe_layers, d) for t in x.tolist()])
        for mb in micro_batches:
            totals, per_step, per_layer_msgs, plan_s, worker_pairs = {}, [], [], [], []
            for d in draws:
                step: dict = {}
                pairs_per_worker: dict[int, int] = {}
                for layer, (x, w) in zip(spec.moe_layers, d):
                    one = dispatch_step(table, layer, x, w, H, mb, pairs_per_worker)
                    per_layer_msgs.append(one["messages"])
                    plan_s.append(one.pop("plan_s"))
                    for k, v in one.items():
                        step[k] = step.get(k, 0) + v
                per_step.append(step)
                worker_pairs.append(pairs_per_worker)
            for k in per_step[0]:
                totals[k] = statistics.fmean(s[k] for s in per_step)
            # Cluster-wide: every router's step at once; a worker's pairs summed over the routers of one step.
            cluster_pairs = []
            for s in range(steps):
                summed: dict[int, int] = {}
                for r in range(routers):
                    for w, n in worker_pairs[s * routers + r].items():
                        summed[w] = summed.get(w, 0) + n
                cluster_pairs.append(summed)
            max_pairs = statistics.fmean(max(c.values()) for c in cluster_pairs)
            mean_pairs = statistics.fmean(sum(c.values()) / len(plan.workers) for c in cluster_pairs)
            rows.append({
                "batch": B, "micro_batches": mb, "workers_visited_per_token": visited,
                "messages_per_layer": statistics.fmean(per_layer_msgs),
                "messages_per_step_router": totals["messages"],
                "messages_per_step_cluster": totals["messages"] * routers,
                "messages_per_worker_per_step": totals["messages"] * routers / len(plan.workers),
                "rows_per_message": totals["rows"] / totals["messages"],
                "pairs_per_message": totals["pairs"] / totals["messages"],
                "request_bytes_per_layer": totals["request_bytes"] / L,
                "reply_bytes_per_layer": totals["reply_bytes"] / L,
                "header_bytes_per_layer": totals["header_bytes"] / L,
                "pair_bytes_per_layer": totals["pair_bytes"] / L,
                "collective_bytes_per_layer": totals["collective_bytes"] / L,
                "bytes_per_step_router": totals["request_bytes"] + totals["reply_bytes"],
                "plan_dispatch_us": 1e6 * statistics.fmean(plan_s),
                "worker_pairs_per_step_max": max_pairs, "worker_pairs_per_step_mean": mean_pairs,
            })
    return rows


def per_node_plan(plan: PlacementPlan, workers_per_node: int) -> PlacementPlan:
    """The plan with each node's workers (consecutive in plan order) merged into one: what the messages would be
    if a router sent one message per node and the node fanned it out to its workers (not built)."""
    nodes: dict[int, set] = {}
    for i, w in enumerate(plan.workers):
        nodes.setdefault(i // workers_per_node, set()).update(w.replicas)
    return PlacementPlan(plan.version, plan.num_experts, plan.moe_layers,
                         tuple(WorkerPlacement(n, f"node-{n}", tuple(sorted(r))) for n, r in sorted(nodes.items())))


# --- planner and controller -------------------------------------------------------------------------


class StandInRouter:
    """Answers Controller.load's `expert_load.remote(seconds)` with fixed counts [L][E]."""

    def __init__(self, counts: list[list[int]]):
        self.counts = counts
        self.expert_load = SimpleNamespace(remote=self._remote)

    async def _remote(self, seconds=None):
        return self.counts


def stand_in_controller(plan: PlacementPlan, per_router: list[list[list[int]]], window_seconds: float = 60.0):
    """Just enough of a Controller for its own load and expert_load methods, over stand-in routers."""
    from cluster.controller import Controller

    ctl = SimpleNamespace(router_handles={i: StandInRouter(c) for i, c in enumerate(per_router)}, plan=plan,
                          settings=SimpleNamespace(load_window_seconds=window_seconds))
    ctl._on_routers = lambda method, *args: Controller._on_routers(ctl, method, *args)
    ctl.load = lambda seconds=None: Controller.load(ctl, seconds)
    return ctl


def controller_gather(plan: PlacementPlan, per_router: list[list[list[int]]], window_seconds: float = 60.0) -> dict:
    """Controller.load over stand-in routers (the telemetry gathering of every control-loop turn and re-plan)
    and Controller.expert_load (the admin ExpertLoad message), timed; sizes of what travels."""
    from cluster.controller import Controller

    ctl = stand_in_controller(plan, per_router, window_seconds)
    began = time.perf_counter()
    load = asyncio.run(Controller.load(ctl))
    gather_s = time.perf_counter() - began
    began = time.perf_counter()
    msg = asyncio.run(Controller.expert_load(ctl))
    admin_s = time.perf_counter() - began
    began = time.perf_counter()
    balancedness(plan, load)
    from cluster.planner import worker_load

    worker_load(plan, load)
    gauges_s = time.perf_counter() - began
    return {"load_gather_ms": 1e3 * gather_s, "expert_load_admin_ms": 1e3 * admin_s,
            "expert_load_admin_bytes": msg.ByteSize(), "gauges_ms": 1e3 * gauges_s,
            "telemetry_reply_bytes": len(pickle.dumps(per_router[0], protocol=5)),
            "plan_push_bytes": len(pickle.dumps(plan, protocol=5))}


def replan(spec: ModelSpec, routing: Routing, workers: int, slots: int, windows: int, tokens: int,
           shift_every: int, routers: int, telemetry_scale: float, time_from_plan: bool,
           workers_per_node: int = 0) -> dict:
    """Re-plans as the controller makes them over the drifting trace, timed, with the controller's work.
    With workers_per_node > 1 each plan is then spread over nodes of that many consecutive workers (what
    cluster.planner.plan does with the controller's PlannerInput.domains); the rows say what that cost."""
    groups = expert_groups(spec)
    domains = {w: f"node-{w // workers_per_node}" for w in range(workers)} if workers_per_node > 1 else None
    eb = spec.expert_bytes(2)
    start = initial_plan(spec, workers)
    current, oblivious = start, start
    rows, per_router = [], None
    for t in range(windows):
        if t and t % shift_every == 0:
            routing.rotate()
        ids, load, per_router = routing.window(tokens, routers)
        routed = [(layer, tuple(x)) for layer, xs in zip(spec.moe_layers, ids) for x in xs[:256].tolist()]
        inp = dict(num_workers=workers, slots_per_worker=slots, expert_bytes=eb)
        began = time.perf_counter()
        new = migration_aware_plan(PlannerInput(load, current=current, groups=groups, **inp))
        ours_ms = 1e3 * (time.perf_counter() - began)
        spread = {}
        if domains:
            unspread = new
            began = time.perf_counter()
            new = spread_over_domains(new, PlannerInput(load, current=current, groups=groups, domains=domains, **inp))
            spread = {"spread_ms": 1e3 * (time.perf_counter() - began),
                      "one_node_experts_unspread": len(experts_on_one_domain(unspread, domains)),
                      "one_node_experts": len(experts_on_one_domain(new, domains)),
                      "balancedness_unspread": balancedness(unspread, load),
                      "replicas_moved_unspread": plan_change(current, unspread, 1).bytes_moved}
        began = time.perf_counter()
        new_obl = migration_aware_plan(PlannerInput(load, current=oblivious, **inp))
        obl_ms = 1e3 * (time.perf_counter() - began)
        began = time.perf_counter()
        eplb = eplb_plan(PlannerInput(load, current=current, **inp))
        eplb_ms = 1e3 * (time.perf_counter() - began)
        began = time.perf_counter()
        change = plan_change(current, new, eb)
        before, after = balancedness(current, load), balancedness(new, load)
        controller_ms = 1e3 * (time.perf_counter() - began)
        rows.append({"window": t, "planner_ms": ours_ms, "planner_ms_group_oblivious": obl_ms, "eplb_ms": eplb_ms,
                     "controller_ms": controller_ms, "balancedness_before": before, "balancedness_after": after,
                     "balancedness_eplb": balancedness(eplb, load),
                     "balancedness_group_oblivious": balancedness(new_obl, load),
                     "replicas_moved": change.replicas_moved, "gb_moved": change.bytes_moved / 1e9,
                     "replicas_moved_eplb": plan_change(current, eplb, 1).bytes_moved,
                     "visited_per_token": workers_visited_per_token(new, routed),
                     "visited_per_token_group_oblivious": workers_visited_per_token(new_obl, routed),
                     "group_spread": plan_group_spread(new, groups) if groups else None, **spread})
        print(f"window {t}: re-plan {ours_ms:.0f} ms (without groups {obl_ms:.0f}, eplb {eplb_ms:.0f}), "
              f"balancedness {before:.3f} -> {after:.3f} (eplb {rows[-1]['balancedness_eplb']:.3f}), "
              f"{change.replicas_moved} replicas moved ({change.bytes_moved / 1e9:.1f} GB)"
              + (f"; spread over nodes in {spread['spread_ms']:.0f} ms: {spread['one_node_experts_unspread']} -> "
                 f"{spread['one_node_experts']} experts on one node" if spread else ""), flush=True)
        current, oblivious = new, new_obl
    replans = rows[1:] or rows
    summary = {k: statistics.fmean(r[k] for r in replans) for k in rows[0] if k not in ("window", "group_spread")}
    summary["planner_ms_first"] = rows[0]["planner_ms"]
    summary["planner_ms_max"] = max(r["planner_ms"] for r in replans)
    summary["slots"] = slots
    scaled = [[[round(n * telemetry_scale) for n in layer] for layer in r] for r in per_router]
    summary.update(controller_gather(current, scaled))
    if time_from_plan:
        began = time.perf_counter()
        ReplicaTable.from_plan(current)
        summary["replica_table_from_plan_s"] = time.perf_counter() - began
    return {"summary": summary, "windows": rows, "start": start, "final": current}


# --- wire cost on this machine ----------------------------------------------------------------------


def wire_round_trips(sizes: list[tuple[int, int]], hidden: int, reps: int) -> list[dict]:
    """Round trips of requests of (rows, pairs) over a Unix socket pair to a thread running the worker's
    receive/reply loop (recv_request, an echo of the hidden rows as out, the server's reply framing)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def serve():
        buffer = ReceiveBuffer()
        with b:
            while True:
                try:
                    _, h, _, _, _ = recv_request(b, buffer)
                except Exception:
                    return
                send_response(b, h)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = []
    try:
        for rows, pairs in sizes:
            hidden_rows = torch.randn(rows, hidden).to(torch.bfloat16)
            tok, exp = torch.zeros(pairs, dtype=torch.int32), torch.zeros(pairs, dtype=torch.int32)
            w = torch.ones(pairs, dtype=torch.bfloat16)
            reply = torch.empty(rows, hidden, dtype=torch.bfloat16)
            times = []
            for i in range(reps + 5):
                began = time.perf_counter()
                send_request(a, 1, hidden_rows, tok, exp, w)
                recv_response(a, reply)
                if i >= 5:
                    times.append(time.perf_counter() - began)
            nbytes = request_bytes(rows, pairs, hidden) + reply_bytes(rows, hidden)
            out.append({"rows": rows, "pairs": pairs, "bytes": nbytes, "us_median": 1e6 * statistics.median(times)})
    finally:
        a.close()
        thread.join(timeout=5)
    if len(out) >= 2:  # least squares: time = fixed + bytes / rate
        x = np.array([r["bytes"] for r in out], dtype=float)
        y = np.array([r["us_median"] for r in out])
        slope, fixed = np.polyfit(x, y, 1)
        for r in out:
            r["fit_fixed_us"], r["fit_gb_per_s"] = float(fixed), float(1e-3 / slope) if slope > 0 else float("inf")
    return out


# --- the attention tier -----------------------------------------------------------------------------


def attention_tier(spec: ModelSpec, batches: list[int], context: int) -> dict:
    """A router's memory (non-expert weights as CausalLM.load keeps them, the KV cache) and its MLA decode work
    per step as _mla_expand does it, against attending in the latent space (weight absorption; not built)."""
    from cluster.make_model import _plan
    from router_service.kv_cache import KVCache

    routed = {n for i in spec.moe_layers for e in range(spec.moe.num_experts) for n in spec.names.expert(i, e)}
    fp32 = {n for i in spec.moe_layers for n in (spec.names.router_gates(i)[0], spec.names.router_score_biases(i)[0])}
    weights = sum(t.numel * (4 if t.name in fp32 else 2) for t in _plan(spec, "per_expert") if t.name not in routed)
    routed_bytes = len(spec.logical_experts) * spec.expert_bytes(2)
    kv_token = KVCache.slot_bytes(spec, 1, 2)
    out = {"router_weight_bytes": weights, "routed_expert_bytes": routed_bytes, "kv_bytes_per_token": kv_token,
           "context": context, "per_batch": []}
    m, Q, Ly = spec.mla, spec.num_heads, spec.num_layers
    if m is None:
        return out
    R, Dn, Dr, Dv = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    for B in batches:
        cached = B * context  # cached positions read per layer
        expand = 2 * cached * R * Q * (Dn + Dv)  # linear(latent, kv_b) per layer
        attend = 2 * cached * Q * (Dn + Dr) + 2 * cached * Q * Dv  # q.k and p.v on the expanded heads
        absorbed = 2 * cached * Q * (R + Dr) + 2 * cached * Q * R  # q.[latent|rope] and p.latent per head
        transient = cached * Q * ((Dn + Dv) + (Dn + Dr) + Dv) * 2  # kv_b's output, keys, values (bf16) of a layer
        out["per_batch"].append({
            "batch": B, "kv_cache_bytes": B * context * kv_token, "kv_read_bytes_per_step": B * context * kv_token,
            "mla_flops_per_step": Ly * (expand + attend), "absorbed_flops_per_step": Ly * absorbed,
            "expanded_transient_bytes_per_layer": transient})
    return out


# --- bottleneck -------------------------------------------------------------------------------------


def bottlenecks(msgs: list[dict], wire: list[dict], links_gbps: list[float], per_message_us: float,
                worker_per_message_us: float, layers: int) -> list[dict]:
    """Per batch (micro-batches 1): a router's step time floors from messages, from its planning and from bytes
    on its link, and a worker's from the messages it serves."""
    fixed = wire[0].get("fit_fixed_us") if wire else None
    out = []
    for m in msgs:
        if m["micro_batches"] != 1:
            continue
        row = {"batch": m["batch"],
               "router_message_ms": m["messages_per_step_router"] * per_message_us / 1e3,
               "router_plan_ms": layers * m["plan_dispatch_us"] / 1e3,
               "worker_message_ms": m["messages_per_worker_per_step"] * worker_per_message_us / 1e3,
               "wire_fixed_ms_this_machine": (m["messages_per_step_router"] * fixed / 1e3) if fixed else None}
        out_bytes = m["request_bytes_per_layer"] * layers
        back_bytes = m["reply_bytes_per_layer"] * layers
        for g in links_gbps:  # full duplex: the larger direction sets the time
            row[f"link_ms_{g:g}gbps"] = max(out_bytes, back_bytes) / (g * 1e9 / 8) * 1e3
        out.append(row)
    return out


# --- run ----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}
    spec = make_spec(args)
    L, E, W, R, H = len(spec.moe_layers), spec.moe.num_experts, args.workers, args.routers, spec.hidden_size
    slots = args.slots or default_slots(spec, W)
    batches, mbs, links = _ints(args.batches), _ints(args.micro_batches), [float(x) for x in args.link_gbps.split(",")]
    print(f"{L} MoE layers x {E} experts (top-{spec.moe.top_k}, best {spec.moe.topk_group} of {spec.moe.n_group} "
          f"groups), hidden {H}, {W} workers x {slots} slots, {R} routers; one replica "
          f"{spec.expert_bytes(2) / 2**20:.0f} MiB", flush=True)

    routing = Routing(spec, args.zipf, args.hot, args.seed)
    # telemetry: a router's share of the window is tokens / routers; scale it to --telemetry-tokens
    scale = args.telemetry_tokens / max(args.tokens / R, 1)
    planner = replan(spec, routing, W, slots, args.windows, args.tokens, args.shift_every, R, scale, args.from_plan,
                     args.workers_per_node)
    s = planner["summary"]

    messages = {}
    for name, plan in (("initial", planner["start"]), ("replanned", planner["final"])):
        print(f"\nmessages per decode step, plan: {name}", flush=True)
        messages[name] = count_messages(spec, plan, routing, batches, R, args.steps, mbs)
    msgs = messages["replanned"]
    if args.workers_per_node > 1:
        print(f"\nmessages per decode step if one went to each node of {args.workers_per_node} workers", flush=True)
        messages["replanned_per_node"] = count_messages(spec, per_node_plan(planner["final"], args.workers_per_node),
                                                        routing, batches, R, args.steps, [1])

    wire = []
    if args.wire_reps:
        sizes = sorted({(max(1, round(m["rows_per_message"])), max(1, round(m["pairs_per_message"]))) for m in msgs
                        if m["micro_batches"] == 1})
        wire = wire_round_trips(sizes, H, args.wire_reps)
    tier = attention_tier(spec, batches, args.context)
    floors = bottlenecks(msgs, wire, links, args.per_message_us, args.worker_per_message_us, L)

    MB = 2**20
    print(f"\nmessages and bytes per decode step ({R} routers, {args.steps} steps each; plan after "
          f"{args.windows} re-plans; means)")
    msg_table = print_table(
        ["batch / router", "micro-batches", "workers / token", "msgs / layer", "msgs / step / router",
         "msgs / step cluster", "msgs / worker / step", "rows / msg", "MiB out / layer", "MiB back / layer",
         "headers+pairs KiB / layer", "plan_dispatch us"],
        [[m["batch"], m["micro_batches"], f"{m['workers_visited_per_token']:.2f}", f"{m['messages_per_layer']:.1f}",
          f"{m['messages_per_step_router']:.0f}", f"{m['messages_per_step_cluster']:.0f}",
          f"{m['messages_per_worker_per_step']:.0f}", f"{m['rows_per_message']:.2f}",
          f"{m['request_bytes_per_layer'] / MB:.3f}", f"{m['reply_bytes_per_layer'] / MB:.3f}",
          f"{(m['header_bytes_per_layer'] + m['pair_bytes_per_layer']) / 1024:.1f}", f"{m['plan_dispatch_us']:.0f}"]
         for m in msgs])
    node_table = None
    if "replanned_per_node" in messages:
        print(f"\nthe same with one message per node of {args.workers_per_node} workers (a relay per node; not built)")
        node_table = print_table(
            ["batch / router", "nodes / token", "msgs / layer", "msgs / step / router", "msgs / step cluster",
             "MiB out / layer", "MiB back / layer"],
            [[m["batch"], f"{m['workers_visited_per_token']:.2f}", f"{m['messages_per_layer']:.1f}",
              f"{m['messages_per_step_router']:.0f}", f"{m['messages_per_step_cluster']:.0f}",
              f"{m['request_bytes_per_layer'] / MB:.3f}", f"{m['reply_bytes_per_layer'] / MB:.3f}"]
             for m in messages["replanned_per_node"]])
    eb = spec.expert_bytes(2)
    flop_pair = 2 * 3 * H * spec.moe.expert_intermediate_size
    print(f"\nexpert tier per worker per decode step (all {R} routers at once; {slots} slots = "
          f"{slots * eb / 1e9:.1f} GB of replicas)")
    expert_table = print_table(
        ["batch / router", "pairs (max worker)", "pairs (mean)", "GFLOP (max worker)", "rows received"],
        [[m["batch"], f"{m['worker_pairs_per_step_max']:.0f}", f"{m['worker_pairs_per_step_mean']:.0f}",
          f"{m['worker_pairs_per_step_max'] * flop_pair / 1e9:.0f}",
          f"{m['rows_per_message'] * m['messages_per_worker_per_step']:.0f}"] for m in msgs if m["micro_batches"] == 1])
    print(f"\nplanner at this shape ({args.windows} windows of {args.tokens} tokens, Zipf {args.zipf}, hot set rotated "
          f"every {args.shift_every}; means over re-plans after the first)")
    plan_table = print_table(
        ["re-plan", "ms (mean)", "ms (max)", "first ms", "balancedness", "replicas moved", "GB moved",
         "workers / token"],
        [["migration_aware, groups (the controller's)", f"{s['planner_ms']:.0f}", f"{s['planner_ms_max']:.0f}",
          f"{s['planner_ms_first']:.0f}", f"{s['balancedness_after']:.4f}", f"{s['replicas_moved']:.0f}",
          f"{s['gb_moved']:.1f}", f"{s['visited_per_token']:.2f}"],
         ["migration_aware, no groups", f"{s['planner_ms_group_oblivious']:.0f}", "", "",
          f"{s['balancedness_group_oblivious']:.4f}", "", "", f"{s['visited_per_token_group_oblivious']:.2f}"],
         ["eplb (from scratch)", f"{s['eplb_ms']:.0f}", "", "", f"{s['balancedness_eplb']:.4f}",
          f"{s['replicas_moved_eplb']:.0f}", f"{s['replicas_moved_eplb'] * spec.expert_bytes(2) / 1e9:.1f}", ""]]
        + ([["  of which: before spreading over nodes", "", "", "", f"{s['balancedness_unspread']:.4f}",
             f"{s['replicas_moved_unspread']:.0f}", "", ""],
            ["  spreading over nodes (after the re-plan)", f"{s['spread_ms']:.0f}", "", "", "", "", "", ""]]
           if "spread_ms" in s else []))
    if "spread_ms" in s:
        print(f"replicated experts with every copy on one node of {args.workers_per_node} workers: "
              f"{s['one_node_experts_unspread']:.1f} before spreading, {s['one_node_experts']:.1f} after (means)")
    print("\ncontroller")
    ctl_table = print_table(
        ["work", "value"],
        [["plan_change + balancedness x2 per re-plan, ms", f"{s['controller_ms']:.0f}"],
         [f"Controller.load over {R} routers, ms", f"{s['load_gather_ms']:.0f}"],
         ["one router's telemetry answer [L][E], KiB (pickle 5)", f"{s['telemetry_reply_bytes'] / 1024:.1f}"],
         ["balancedness + worker_load (gauges) per turn, ms", f"{s['gauges_ms']:.0f}"],
         ["ExpertLoad admin message: ms / KiB", f"{s['expert_load_admin_ms']:.0f} / "
                                                f"{s['expert_load_admin_bytes'] / 1024:.0f}"],
         ["plan pushed to each router, KiB (pickle 5)", f"{s['plan_push_bytes'] / 1024:.0f}"],
         ["ReplicaTable.from_plan on a router (engine thread), s",
          f"{s['replica_table_from_plan_s']:.2f}" if "replica_table_from_plan_s" in s else "skipped"]])
    if wire:
        print("\nwire round trips on this machine (Unix socket pair, worker loop on a thread; no compute)")
        print_table(["rows", "pairs", "KiB both ways", "us (median)"],
                    [[w["rows"], w["pairs"], f"{w['bytes'] / 1024:.0f}", f"{w['us_median']:.0f}"] for w in wire])
        if "fit_fixed_us" in wire[0]:
            print(f"fit: {wire[0]['fit_fixed_us']:.0f} us per message + bytes at {wire[0]['fit_gb_per_s']:.2f} GB/s")
    print(f"\nfloors of one decode step, ms (router: {args.per_message_us:g} us a message; worker: "
          f"{args.worker_per_message_us:g} us a message; links full duplex)")
    floor_table = print_table(
        ["batch / router", "router messages", "router plans", "worker messages"]
        + [f"link {g:g} Gb/s" for g in links],
        [[f["batch"], f"{f['router_message_ms']:.1f}", f"{f['router_plan_ms']:.1f}", f"{f['worker_message_ms']:.1f}"]
         + [f"{f[f'link_ms_{g:g}gbps']:.1f}" for g in links] for f in floors])
    GB = 1e9
    print(f"\nattention tier per router: weights {tier['router_weight_bytes'] / GB:.1f} GB (routed experts, on "
          f"workers: {tier['routed_expert_bytes'] / GB:.0f} GB), KV {tier['kv_bytes_per_token'] / 1024:.1f} KiB "
          f"per token; context {args.context}")
    tier_table = print_table(
        ["batch / router", "KV cache GB", "MLA TFLOP / step (expand)", "absorbed TFLOP / step",
         "expanded K/V GB / layer"],
        [[t["batch"], f"{t['kv_cache_bytes'] / GB:.1f}", f"{t['mla_flops_per_step'] / 1e12:.1f}",
          f"{t['absorbed_flops_per_step'] / 1e12:.2f}", f"{t['expanded_transient_bytes_per_layer'] / GB:.2f}"]
         for t in tier["per_batch"]])
    write_json(args.out, {
        "suite": "scaling", "machine": {**machine(), "cpu_model": _cpu_model()}, "settings": settings,
        "shape": {"moe_layers": L, "experts": E, "top_k": spec.moe.top_k, "n_group": spec.moe.n_group,
                  "topk_group": spec.moe.topk_group, "hidden": H, "expert_width": spec.moe.expert_intermediate_size,
                  "shared_width": spec.moe.shared_intermediate_size, "workers": W, "routers": R, "slots": slots,
                  "expert_bytes": spec.expert_bytes(2)},
        "messages": messages, "planner": {"summary": s, "windows": planner["windows"]}, "wire": wire,
        "attention_tier": tier, "floors": floors,
        "tables": {"messages": msg_table, "planner": plan_table, "controller": ctl_table, "floors": floor_table,
                   "attention_tier": tier_table, "per_node": node_table, "expert_tier": expert_table}})
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
