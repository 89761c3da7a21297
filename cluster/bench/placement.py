"""Placement planners on a shifting Zipf load trace: our migration-aware planner against EPLB.

Synthetic routing load (no model, no cluster): each MoE layer's experts have Zipf-distributed
popularity, and every few windows the hottest experts of every layer trade places with random
cooler ones. Each window both planners rebalance with the same replica budget: EPLB from scratch
(as published), ours from its previous plan. Reported per window: balancedness on the window the
plan was made from ("planned"), on the next window, which the plan actually serves ("served";
split into steady windows and those right after a hot-set rotation, which no plan foresees), and
bytes moved; also the bytes EPLB would move if its workers were renamed to match the previous
plan (EPLB itself does not), which separates worker renaming from real savings.

Then a group-limited trace (DeepSeek-V3's routing scaled down: by default 64 experts in 8 groups, each
token takes its top-8 experts inside its best 3 groups by top-2 sum): the migration-aware planner with
and without PlannerInput.groups, from the group-aware initial plan and from round-robin by expert, at
the same slots and migration weight. Reported: workers visited per token (dispatch messages per token
per MoE layer) and balancedness on the window each plan serves.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from cluster.bench.common import machine, print_table, write_json
from cluster.planner import (DEFAULT_GROUP_WEIGHT, DEFAULT_MIGRATION_WEIGHT, PlannerInput, balancedness, eplb_plan,
                             grouped_plan, match_workers, migration_aware_plan, plan_change, plan_group_spread,
                             round_robin_plan, workers_visited_per_token)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # defaults: DeepSeek-MoE-16B (27 MoE layers of 64 routed experts, top-6, hidden 2048, width 1408, bf16)
    p.add_argument("--layers", type=int, default=27, help="MoE layers")
    p.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--expert-bytes", type=int, default=3 * 2048 * 1408 * 2, help="bytes of one replica")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--slots", type=int, help="replica slots per worker (default: 11%% spare, 240 for 27 x 64 on 8)")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    p.add_argument("--shift-every", type=int, default=4, help="windows between hot-set rotations")
    p.add_argument("--hot", type=int, default=8, help="hottest experts per layer that rotate out")
    p.add_argument("--migration-weight", type=float, default=DEFAULT_MIGRATION_WEIGHT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare at no spare slot and one or two spares per worker per layer")
    p.add_argument("--scale-windows", type=int, default=6,
                   help="windows per shape in the plan-time table up to DeepSeek-V3's shape (0: skip it)")
    p.add_argument("--out", default="bench-results/placement.json", help="JSON path; the PNG plot goes next to it")
    g = p.add_argument_group("group-limited trace (DeepSeek-V2/V3 routing)")
    g.add_argument("--group-trace", choices=("also", "only", "off"), default="also",
                   help="run the group-limited trace after the Zipf one, instead of it, or not at all")
    g.add_argument("--group-layers", type=int, default=8, help="MoE layers")
    g.add_argument("--group-experts", type=int, default=64, help="routed experts per MoE layer (V3: 256)")
    g.add_argument("--n-group", type=int, default=8, help="expert groups per layer (V3: 8)")
    g.add_argument("--topk-group", type=int, default=3, help="groups a token picks experts from (V3: 4)")
    g.add_argument("--group-top-k", type=int, default=8, help="experts per token (V3: 8)")
    g.add_argument("--group-workers", type=int, default=8)
    g.add_argument("--group-windows", type=int, default=8)
    g.add_argument("--group-tokens", type=int, default=1024, help="tokens per window")
    g.add_argument("--group-weight", type=float, default=DEFAULT_GROUP_WEIGHT)


def zipf_trace(args: argparse.Namespace) -> list[dict[tuple[int, int], int]]:
    """Tokens per logical expert per window. MoE layers are numbered from 1 (layer 0 is dense)."""
    rng = np.random.default_rng(args.seed)
    popularity = 1.0 / np.arange(1, args.experts + 1) ** args.zipf
    popularity /= popularity.sum()
    ranking = [rng.permutation(args.experts) for _ in range(args.layers)]  # ranking[l][r]: expert of rank r
    trace = []
    for t in range(args.windows):
        if t and t % args.shift_every == 0:
            for perm in ranking:  # each hot expert trades ranks with a random cooler one
                for r in range(args.hot):
                    j = rng.integers(args.hot, args.experts)
                    perm[[r, j]] = perm[[j, r]]
        load = {}
        for l, perm in enumerate(ranking):
            pairs = rng.multinomial(args.tokens * args.top_k, popularity)  # (token, expert) pairs by rank
            load.update({(l + 1, int(perm[r])): int(n) for r, n in enumerate(pairs)})
        trace.append(load)
    return trace


def group_trace(args: argparse.Namespace) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Per window, every token's routed experts per MoE layer: [(layer, expert ids)].

    Scores are log Zipf popularity (over a random expert order per layer) plus Gumbel noise, so a
    token's experts follow popularity; groups are ranked by the sum of their top-2 scores (V3), and a
    token takes its top-k experts inside its best topk_group groups. The hot experts trade places with
    cooler ones every --shift-every windows, as in the Zipf trace."""
    rng = np.random.default_rng(args.seed + 1)
    E, G, T = args.group_experts, args.n_group, args.group_tokens
    popularity = 1.0 / np.arange(1, E + 1) ** args.zipf
    ranking = [rng.permutation(E) for _ in range(args.group_layers)]
    hot = min(args.hot, E // 2)
    trace = []
    for t in range(args.group_windows):
        if t and t % args.shift_every == 0:
            for perm in ranking:
                for r in range(hot):
                    j = rng.integers(hot, E)
                    perm[[r, j]] = perm[[j, r]]
        routed = []
        for l, perm in enumerate(ranking):
            log_pop = np.empty(E)
            log_pop[perm] = np.log(popularity)  # expert perm[r] has rank r
            scores = log_pop + rng.gumbel(size=(T, E))  # [T, E]
            grouped = scores.reshape(T, G, E // G)
            group_score = np.sort(grouped, -1)[:, :, -2:].sum(-1)  # [T, G]
            keep = np.argsort(-group_score, 1, kind="stable")[:, :args.topk_group]
            mask = np.zeros((T, G), dtype=bool)
            np.put_along_axis(mask, keep, True, 1)
            masked = np.where(np.repeat(mask, E // G, 1), scores, -np.inf)
            picks = np.argsort(-masked, 1, kind="stable")[:, :args.group_top_k]
            routed.append([(l + 1, tuple(int(e) for e in row)) for row in picks])
        trace.append([pair for pairs in zip(*routed) for pair in pairs])  # token-major
    return trace


def run_groups(args: argparse.Namespace) -> dict:
    """Group-aware against group-oblivious placement on the group-limited trace; returns the JSON part."""
    L, E, G, W = args.group_layers, args.group_experts, args.n_group, args.group_workers
    layers = tuple(range(1, L + 1))
    slots = math.ceil(1.11 * L * E / W)
    trace = group_trace(args)
    loads = []
    for routed in trace:
        load: dict[tuple[int, int], int] = {}
        for layer, experts in routed:
            for e in experts:
                load[(layer, e)] = load.get((layer, e), 0) + 1
        loads.append(load)
    starts = {"oblivious": round_robin_plan(layers, E, W), "aware": grouped_plan(layers, E, G, W)}
    groups = {"oblivious": None, "aware": G}
    current = dict(starts)
    windows = []
    for t, load in enumerate(loads):
        row: dict = {"window": t}
        for name in ("oblivious", "aware"):
            if t == 0:  # the initial plans, never rebalanced, serve the first window
                row[f"unplaced_visited_{name}"] = workers_visited_per_token(starts[name], trace[0])
                row[f"unplaced_balancedness_{name}"] = balancedness(starts[name], load)
            began = time.perf_counter()
            new = migration_aware_plan(PlannerInput(
                load, W, slots, args.expert_bytes, current=current[name], migration_weight=args.migration_weight,
                groups=groups[name], group_weight=args.group_weight))
            row[f"planner_ms_{name}"] = 1e3 * (time.perf_counter() - began)
            row[f"replicas_moved_{name}"] = plan_change(current[name], new, 1).bytes_moved
            row[f"group_spread_{name}"] = plan_group_spread(new, G)
            row[f"balancedness_{name}"] = balancedness(new, load)
            if t + 1 < len(loads):
                row[f"served_{name}"] = balancedness(new, loads[t + 1])
                row[f"visited_{name}"] = workers_visited_per_token(new, trace[t + 1])
            current[name] = new
        windows.append(row)
        nan = float("nan")
        print(f"group window {t:2d}: workers visited / token oblivious {row.get('visited_oblivious', nan):.2f} "
              f"aware {row.get('visited_aware', nan):.2f}; balancedness oblivious "
              f"{row['balancedness_oblivious']:.3f} aware {row['balancedness_aware']:.3f}", flush=True)

    def mean(key):
        vals = [w[key] for w in windows if w.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {f"{m}_{n}": mean(f"{m}_{n}") for n in ("oblivious", "aware")
               for m in ("visited", "served", "balancedness", "replicas_moved", "group_spread", "planner_ms")}
    for n in ("oblivious", "aware"):
        summary[f"unplaced_visited_{n}"] = windows[0][f"unplaced_visited_{n}"]
        summary[f"unplaced_balancedness_{n}"] = windows[0][f"unplaced_balancedness_{n}"]
    summary["visited_ratio"] = summary["visited_aware"] / summary["visited_oblivious"]
    print(f"\ngroup-limited trace: {L} MoE layers x {E} experts in {G} groups, top-{args.group_top_k} within the "
          f"best {args.topk_group} groups, {W} workers x {slots} slots, {args.group_windows} windows of "
          f"{args.group_tokens} tokens, migration_weight {args.migration_weight}, group_weight {args.group_weight}; "
          f"means over windows, served = on the next window")
    gb = args.expert_bytes / 1e9
    table = print_table(
        ["placement", "workers visited / token", "balancedness served", "balancedness planned",
         "GB moved / window", "group spread"],
        [["round-robin by expert, never moved", f"{summary['unplaced_visited_oblivious']:.3f}",
          f"{summary['unplaced_balancedness_oblivious']:.4f}", "", 0.0, plan_group_spread(starts['oblivious'], G)],
         ["grouped initial plan, never moved", f"{summary['unplaced_visited_aware']:.3f}",
          f"{summary['unplaced_balancedness_aware']:.4f}", "", 0.0, plan_group_spread(starts['aware'], G)],
         ["migration_aware, group-oblivious", f"{summary['visited_oblivious']:.3f}",
          f"{summary['served_oblivious']:.4f}",
          f"{summary['balancedness_oblivious']:.4f}", summary["replicas_moved_oblivious"] * gb,
          f"{summary['group_spread_oblivious']:.1f}"],
         ["migration_aware, group-aware", f"{summary['visited_aware']:.3f}", f"{summary['served_aware']:.4f}",
          f"{summary['balancedness_aware']:.4f}", summary["replicas_moved_aware"] * gb,
          f"{summary['group_spread_aware']:.1f}"]])
    print(f"workers visited per token, group-aware / group-oblivious: {summary['visited_ratio']:.3f}")
    return {"summary": summary, "windows": windows, "table": table, "slots": slots}


def compare(args: argparse.Namespace, slots: int, trace=None) -> tuple[list[dict], dict]:
    """Both planners over a Zipf trace at one replica budget: (per-window rows, means over windows).

    The first window plans from round-robin (a cold start); the means are over the re-plans after it,
    which is what a running cluster does every window."""
    trace = trace or zipf_trace(args)
    start = round_robin_plan(tuple(range(1, args.layers + 1)), args.experts, args.workers)
    eplb, ours = start, start
    windows = []
    for t, load in enumerate(trace):
        inp = dict(num_workers=args.workers, slots_per_worker=slots, expert_bytes=args.expert_bytes)
        began = time.perf_counter()
        new_eplb = eplb_plan(PlannerInput(load, current=eplb, **inp))
        eplb_ms = 1e3 * (time.perf_counter() - began)
        began = time.perf_counter()
        new_ours = migration_aware_plan(PlannerInput(load, current=ours, migration_weight=args.migration_weight, **inp))
        ms = 1e3 * (time.perf_counter() - began)
        # The controller's own work around a plan: the change to roll out and balancedness before and after.
        began = time.perf_counter()
        change = plan_change(ours, new_ours, args.expert_bytes)
        balancedness(ours, load), balancedness(new_ours, load)
        controller_ms = 1e3 * (time.perf_counter() - began)
        nxt = trace[t + 1] if t + 1 < len(trace) else None
        windows.append({
            "window": t,
            "balancedness_unplaced": balancedness(start, load),
            "balancedness_eplb": balancedness(new_eplb, load), "balancedness_ours": balancedness(new_ours, load),
            "served_eplb": balancedness(new_eplb, nxt) if nxt else None,
            "served_ours": balancedness(new_ours, nxt) if nxt else None,
            "replicas_moved_eplb": plan_change(eplb, new_eplb, 1).bytes_moved,
            "replicas_moved_eplb_renamed": plan_change(eplb, match_workers(new_eplb, eplb), 1).bytes_moved,
            "replicas_moved_ours": change.replicas_moved,
            "replicas_ours": sum(len(w.replicas) for w in new_ours.workers),
            "planner_ms_ours": ms, "planner_ms_eplb": eplb_ms, "controller_ms": controller_ms,
        })
        eplb, ours = new_eplb, new_ours
        w = windows[-1]
        print(f"window {t:2d}: balancedness eplb {w['balancedness_eplb']:.4f} ours {w['balancedness_ours']:.4f}, "
              f"replicas moved eplb {w['replicas_moved_eplb']} ours {w['replicas_moved_ours']} "
              f"({ms:.0f} ms; eplb {eplb_ms:.0f} ms)", flush=True)

    replans = windows[1:] or windows
    steady = [w for w in replans if (w["window"] + 1) % args.shift_every]
    rotated = [w for w in replans if (w["window"] + 1) % args.shift_every == 0]

    def mean(key, rows=replans):
        vals = [w[key] for w in rows if w[key] is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    gb = args.expert_bytes / 1e9
    moved = {k: mean(f"replicas_moved_{k}") * gb for k in ("eplb", "eplb_renamed", "ours")}
    summary = {
        "slots": slots,
        "balancedness_eplb": mean("balancedness_eplb"), "balancedness_ours": mean("balancedness_ours"),
        "served_eplb": mean("served_eplb"), "served_ours": mean("served_ours"),
        "served_steady_eplb": mean("served_eplb", steady), "served_steady_ours": mean("served_ours", steady),
        "served_rotated_eplb": mean("served_eplb", rotated), "served_rotated_ours": mean("served_ours", rotated),
        "gb_moved_per_window_eplb": moved["eplb"], "gb_moved_per_window_eplb_renamed": moved["eplb_renamed"],
        "gb_moved_per_window_ours": moved["ours"],
        "moves_ratio": mean("replicas_moved_ours") / max(mean("replicas_moved_eplb"), 1e-9),
        "balancedness_unplaced": mean("balancedness_unplaced"),
        "planner_ms_first": windows[0]["planner_ms_ours"],
        "planner_ms_ours": mean("planner_ms_ours"), "planner_ms_ours_max": max(w["planner_ms_ours"] for w in replans),
        "planner_ms_eplb": mean("planner_ms_eplb"), "controller_ms": mean("controller_ms"),
    }
    summary["target_met"] = (summary["balancedness_ours"] >= summary["balancedness_eplb"]
                             and summary["moves_ratio"] <= 0.1)
    return windows, summary


# Shapes for the plan-time table: (name, MoE layers, experts, workers, spare replicas per layer).
SCALE_SHAPES = (("4 x 64, 8 workers", 4, 64, 8, 7),
                ("DeepSeek-MoE-16B: 27 x 64, 8 workers", 27, 64, 8, 7),
                ("27 x 64, 32 workers", 27, 64, 32, 7),
                ("DeepSeek-V3: 58 x 256, 64 workers", 58, 256, 64, 32))


def run_scale(args: argparse.Namespace, shapes=SCALE_SHAPES) -> dict:
    """Plan time against shape: each shape over --scale-windows windows of the drifting trace."""
    rows, out = [], {}
    for name, L, E, W, spare in shapes:
        shape = argparse.Namespace(**{**vars(args), "layers": L, "experts": E, "workers": W,
                                      "windows": args.scale_windows})
        slots = math.ceil(L * (E + spare) / W)
        print(f"\n{name}, {slots} slots per worker ({spare} spare replicas per layer)")
        _, s = compare(shape, slots)
        out[name] = s
        rows.append([name, f"{L * E}", f"{s['planner_ms_eplb']:.0f}", f"{s['planner_ms_first']:.0f}",
                     f"{s['planner_ms_ours']:.0f}", f"{s['planner_ms_ours_max']:.0f}", f"{s['controller_ms']:.0f}",
                     f"{s['balancedness_ours']:.4f} / {s['balancedness_eplb']:.4f}", f"{s['moves_ratio']:.3f}"])
    print(f"\nplan time against shape ({args.scale_windows} windows each, hot set rotated every "
          f"{args.shift_every}; re-plan = every window after the first)")
    table = print_table(["shape", "logical experts", "eplb ms", "ours first ms", "ours re-plan ms (mean)",
                         "re-plan ms (max)", "controller ms", "balancedness ours / eplb", "moves ours / eplb"], rows)
    return {"shapes": out, "table": table}


def run_budgets(args: argparse.Namespace, trace) -> dict:
    """Quality against EPLB at equal replica budgets: no spare slot, one and two spares per worker per layer."""
    rows, out = [], {}
    need = math.ceil(args.layers * args.experts / args.workers)
    for name, slots in (("no spare slot", need), ("1 spare per worker per layer", need + args.layers),
                        ("2 spares per worker per layer", need + 2 * args.layers)):
        print(f"\nbudget: {name} ({slots} slots per worker)")
        _, s = compare(args, slots, trace)
        out[name] = s
        rows.append([name, slots, f"{s['balancedness_ours']:.4f}", f"{s['balancedness_eplb']:.4f}",
                     f"{s['served_ours']:.4f}", f"{s['served_eplb']:.4f}", f"{s['moves_ratio']:.3f}",
                     f"{s['planner_ms_ours']:.0f}", "met" if s["target_met"] else "NOT met"])
    print(f"\nquality at equal replica budgets ({args.layers} x {args.experts}, {args.workers} workers; means over "
          f"re-plans; served = on the next window)")
    table = print_table(["budget", "slots", "balancedness ours", "eplb", "served ours", "served eplb",
                         "moves ours / eplb", "ours ms", "target (>= eplb, <= 0.1x moves)"], rows)
    return {"budgets": out, "table": table}


def run(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}  # not the CLI's func
    if args.group_trace == "only":
        groups = run_groups(args)
        write_json(args.out, {"suite": "placement", "machine": machine(), "settings": settings, "groups": groups})
        return 0
    args.slots = args.slots or math.ceil(1.11 * args.layers * args.experts / args.workers)
    trace = zipf_trace(args)
    windows, summary = compare(args, args.slots, trace)
    print(f"\n{args.layers} MoE layers x {args.experts} experts, {args.workers} workers x {args.slots} slots, "
          f"{args.windows} windows of {args.tokens} tokens (top-{args.top_k}), Zipf {args.zipf}, "
          f"{args.hot} hot experts per layer rotate every {args.shift_every} windows, "
          f"migration_weight {args.migration_weight}; means over re-plans")
    cols = ("balancedness", "served_steady", "served_rotated")
    table = print_table(
        ["planner", "balancedness planned", "served: steady", "served: hot set rotated", "GB moved / window"],
        [["eplb"] + [f"{summary[f'{c}_eplb']:.4f}" for c in cols] + [summary["gb_moved_per_window_eplb"]],
         ["eplb, workers renamed", "same", "same", "same", summary["gb_moved_per_window_eplb_renamed"]],
         ["migration_aware"] + [f"{summary[f'{c}_ours']:.4f}" for c in cols] + [summary["gb_moved_per_window_ours"]],
         ["round-robin, never moved", f"{summary['balancedness_unplaced']:.4f}", "", "", 0.0]])
    print(f"replicas moved ours / eplb: {summary['moves_ratio']:.3f}; re-plan {summary['planner_ms_ours']:.0f} ms; "
          f"target (balancedness >= eplb, moves <= 0.1x) {'met' if summary['target_met'] else 'NOT met'}")
    budgets = run_budgets(args, trace) if args.budgets else None
    scale = run_scale(args) if args.scale_windows else None
    groups = run_groups(args) if args.group_trace == "also" else None
    out = write_json(args.out, {"suite": "placement", "machine": machine(), "settings": settings,
                                "summary": summary, "windows": windows, "table": table, "budgets": budgets,
                                "scale": scale, "groups": groups})
    _plot(windows, args.expert_bytes / 1e9, out.with_suffix(".png"))
    return 0


def _plot(windows: list[dict], gb: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [w["window"] for w in windows]
    fig, (planned, served, moved) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for ax, key, label in ((planned, "balancedness", "balancedness on the window planned from"),
                           (served, "served", "balancedness on the next window")):
        ts = [x for x, w in zip(t, windows) if w[f"{key}_eplb"] is not None]
        ax.plot(ts, [w[f"{key}_eplb"] for w in windows[:len(ts)]], "o-", label="EPLB")
        ax.plot(ts, [w[f"{key}_ours"] for w in windows[:len(ts)]], "s-", label="migration-aware")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=8)
    moved.plot(t, [w["replicas_moved_eplb"] * gb for w in windows], "o-", label="EPLB")
    moved.plot(t, [w["replicas_moved_eplb_renamed"] * gb for w in windows], "^--", label="EPLB, workers renamed")
    moved.plot(t, [w["replicas_moved_ours"] * gb for w in windows], "s-", label="migration-aware")
    moved.set_ylabel("GB moved")
    moved.set_xlabel("window")
    moved.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
