"""Placement policies: pure functions from routing load to a PlacementPlan (no Ray, no I/O, no clock).

Glossary (the words used in code, metrics and logs):
  logical expert  one routed expert of one MoE layer, named (layer, expert).
  replica         one copy of a logical expert's weights on one worker. Every logical expert has at
                  least one; a hot one has several, and dispatch splits its tokens evenly over them.
  slot            room for one replica in a worker's memory; every worker has `slots_per_worker`.
  worker          an expert-worker actor; it hosts replicas of every MoE layer.
  load            tokens routed to a logical expert during the window.
  balancedness    per MoE layer, mean over max tokens per worker, combined as
                  sum_layers(mean) / sum_layers(max) (vLLM's EPLB metric). Every MoE layer waits for its
                  busiest worker, so this is ideal step time / actual step time; 1.0 is perfect.
  bytes moved     expert_bytes for every replica of the new plan on a worker that did not host it in
                  the old plan. Unloading a replica is free.

Worked example: one MoE layer (layer 1) of 4 logical experts with load [90, 30, 20, 20] (160 tokens),
2 workers with 3 slots each. The round-robin initial plan puts experts 0, 2 on worker 0 and 1, 3 on
worker 1: 110 and 50 tokens, balancedness = mean 80 / max 110 = 0.73. EPLB fills the 6 slots: expert 0
gets a second replica (90 -> 45 per replica; a third would need a third worker), then expert 1 (30 -> 15).
Packing 45, 45, 20, 20, 15, 15 heaviest first gives worker 0 experts {0, 2, 1} and worker 1 {0, 3, 1}:
80 tokens each, balancedness 1.0, and 2 replicas moved (expert 1 onto worker 0, expert 0 onto worker 1),
so bytes moved = 2 * expert_bytes.

Expert groups (DeepSeek-V2/V3 group-limited routing): a layer's E experts form n_group contiguous groups
(expert e is in group e // (E / n_group)) and a token picks its top-k experts inside its best topk_group
groups only. The router sends one dispatch message per worker a token's experts sit on, so a plan that
keeps each group on few workers sends fewer: `workers_visited_per_token` measures it. `initial_plan`
lays groups out whole where it can (`grouped_plan`), and with `PlannerInput.groups` set the
migration-aware planner also pays `group_weight` per extra worker a group spreads over (see
migration_aware_plan for the trade-off against balancedness).

Policies (PLANNERS) take a PlannerInput and return a plan:
  eplb             the published EPLB policy, planned from scratch (ignores weight movement).
  migration_aware  ours: starts from the current plan and trades balancedness against bytes moved.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from expert_workers.spec import ModelSpec
from router_service.placement import PlacementPlan, WorkerPlacement

Logical = tuple[int, int]  # (layer, expert)

# Moving every logical expert's weights once is worth this much balancedness. Tuned on
# `moe-serve bench placement` (DeepSeek-MoE-16B shape, 8 workers, shifting Zipf load; seeds 0-2):
# balancedness 0.997-0.998 against EPLB's 0.994 for 0.21x its bytes moved. On seed 0, 0.01 gives
# 0.9985 for 0.28x; 0.1 only ties EPLB (0.9935) for 0.13x.
DEFAULT_MIGRATION_WEIGHT = 0.03
# With PlannerInput.groups: balancedness one extra worker per group, for every logical expert, is
# worth (see migration_aware_plan). On `moe-serve bench placement`'s group trace (8 layers x 64 experts
# in 8 groups, top-8 in the best 3, 8 workers; seed 0) 0.03 gives 5.13 workers visited per token
# against 5.83 without groups, planned balancedness 0.9972 against 0.9981; 0.1: 4.97 for 0.9959;
# 0.3: 4.96 for 0.9916.
DEFAULT_GROUP_WEIGHT = 0.03


def worker_name(worker_id: int) -> str:
    return f"expert-worker-{worker_id}"


def round_robin_plan(moe_layers: tuple[int, ...], num_experts: int, num_workers: int,
                     version: int = 1) -> PlacementPlan:
    """Load-agnostic plan: logical experts dealt round-robin in layer-major order, one replica each."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    replicas: list[list[Logical]] = [[] for _ in range(num_workers)]
    for i, logical in enumerate((l, e) for l in moe_layers for e in range(num_experts)):
        replicas[i % num_workers].append(logical)
    workers = tuple(WorkerPlacement(w, worker_name(w), tuple(r)) for w, r in enumerate(replicas))
    return PlacementPlan(version, num_experts, tuple(moe_layers), workers)


def grouped_plan(moe_layers: tuple[int, ...], num_experts: int, num_groups: int, num_workers: int,
                 version: int = 1) -> PlacementPlan:
    """Load-agnostic plan for group-limited routing: each worker gets one contiguous run of every layer's
    experts, so expert groups (contiguous, DeepSeek's layout) stay whole wherever the run boundaries allow.

    Each worker gets exactly as many experts of each layer as round_robin_plan gives it (so the same
    slots suffice and a uniform load is balanced the same), and the runs are dealt in round-robin order
    starting at the worker round-robin would give the layer's expert 0. No divisibility rule: a group is
    split where workers outnumber groups or a run boundary falls inside it. Worked example, 8 experts in
    4 groups {0,1} {2,3} {4,5} {6,7}, one layer, 3 workers: round-robin counts are 3, 3, 2, so worker 0
    gets {0,1,2}, worker 1 {3,4,5}, worker 2 {6,7}; groups 0, 2 and 3 are whole, group 1 is split.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} equal groups")
    E, W = num_experts, num_workers
    replicas: list[list[Logical]] = [[] for _ in range(W)]
    for li, layer in enumerate(moe_layers):
        first = li * E % W  # round-robin gives this worker the layer's expert 0
        counts = [sum(1 for e in range(E) if (first + e) % W == w) for w in range(W)]
        e = 0
        for step in range(W):
            w = (first + step) % W
            replicas[w].extend((layer, x) for x in range(e, e + counts[w]))
            e += counts[w]
    workers = tuple(WorkerPlacement(w, worker_name(w), tuple(r)) for w, r in enumerate(replicas))
    return PlacementPlan(version, num_experts, tuple(moe_layers), workers)


def initial_plan(spec: ModelSpec, num_workers: int, version: int = 1) -> PlacementPlan:
    """Load-agnostic start: logical experts dealt round-robin, one replica each.

    Dealing in layer-major order spreads every layer over all workers, so any
    counts of experts and workers work (no divisibility rule): with 8 experts
    on 3 workers, worker 0 gets experts 0, 3, 6 of the first layer. A model with
    group-limited routing (spec.moe.n_group > 1) gets grouped_plan instead:
    the same number of experts per worker and layer, in contiguous runs that keep
    expert groups whole where they fit.
    """
    if spec.moe is None:
        raise ValueError(f"model_type {spec.model_type!r} has no MoE layers: nothing to place on expert workers")
    if spec.moe.n_group > 1:
        return grouped_plan(spec.moe_layers, spec.moe.num_experts, spec.moe.n_group, num_workers, version)
    return round_robin_plan(spec.moe_layers, spec.moe.num_experts, num_workers, version)


def expert_groups(spec: ModelSpec) -> int | None:
    """PlannerInput.groups for a model: its n_group when routing is group-limited, else None."""
    return spec.moe.n_group if spec.moe is not None and spec.moe.n_group > 1 else None


def workers_visited_per_token(plan: PlacementPlan, routed) -> float:
    """Mean number of distinct workers a token's routed experts sit on, per (token, MoE layer).

    routed: [(layer, expert ids of one token)]. As the router dispatches (ReplicaTable.assign), the
    n-th pair routed to a logical expert with R replicas goes to its (n mod R)-th replica, counting
    pairs in the order given. Worked example: one layer of 4 experts; plan w0 {0, 1}, w1 {2, 3};
    tokens picking (0, 1) and (1, 2) visit 1 and 2 workers: 1.5.
    """
    hosts: dict[Logical, list[int]] = {}
    for w in plan.workers:
        for r in w.replicas:
            hosts.setdefault(r, []).append(w.worker_id)
    seen: dict[Logical, int] = {}
    total, n = 0, 0
    for layer, experts in routed:
        visited = set()
        for e in experts:
            ws = hosts.get((layer, int(e)))
            if not ws:
                raise ValueError(f"logical expert {(layer, int(e))} has no replica in plan v{plan.version}")
            i = seen.get((layer, int(e)), 0)
            seen[(layer, int(e))] = i + 1
            visited.add(ws[i % len(ws)])
        total += len(visited)
        n += 1
    return total / n if n else 0.0


# --- inputs and reports ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerInput:
    """What a policy plans from. The logical experts are the current plan's, else the load's keys."""

    load: Mapping[Logical, float]  # tokens per logical expert in the window; a missing key means 0
    num_workers: int  # workers in the new plan (kept ones first, then new empty ones)
    slots_per_worker: int  # replicas one worker's memory holds
    expert_bytes: int  # bytes of one replica's weights
    current: PlacementPlan | None = None
    migration_weight: float = DEFAULT_MIGRATION_WEIGHT  # balancedness one full move of all experts is worth; 0 = EPLB
    drain: frozenset[int] = frozenset()  # worker ids to empty; they leave the new plan
    # Expert groups per layer (contiguous, DeepSeek's layout) for group-limited routing; None = ignore
    # groups (the planners then behave exactly as without this field).
    groups: int | None = None
    group_weight: float = DEFAULT_GROUP_WEIGHT  # J paid per extra worker a group spans, per logical expert


@dataclass(frozen=True)
class PlanChange:
    """What the controller does to go from one plan to the next."""

    added: dict[int, tuple[Logical, ...]]  # worker id -> replicas to load before the switch
    removed: dict[int, tuple[Logical, ...]]  # worker id -> replicas to unload after every router switched
    bytes_moved: int

    @property
    def replicas_moved(self) -> int:
        return sum(len(r) for r in self.added.values())


def plan_change(old: PlacementPlan, new: PlacementPlan, expert_bytes: int) -> PlanChange:
    """Replicas added and removed per worker; a worker missing from one plan counts as empty there."""
    before = {w.worker_id: set(w.replicas) for w in old.workers}
    after = {w.worker_id: set(w.replicas) for w in new.workers}
    added, removed = {}, {}
    for wid in sorted(before.keys() | after.keys()):
        if plus := after.get(wid, set()) - before.get(wid, set()):
            added[wid] = tuple(sorted(plus))
        if minus := before.get(wid, set()) - after.get(wid, set()):
            removed[wid] = tuple(sorted(minus))
    return PlanChange(added, removed, expert_bytes * sum(len(r) for r in added.values()))


def _layer_worker_load(plan: PlacementPlan, load: Mapping[Logical, float]) -> np.ndarray:
    """[L, W] tokens per MoE layer per worker (in plan.workers order); a logical expert's tokens split evenly."""
    counts = plan.replica_count()
    row = {layer: i for i, layer in enumerate(plan.moe_layers)}
    out = np.zeros((len(plan.moe_layers), len(plan.workers)))
    for wi, w in enumerate(plan.workers):
        for r in w.replicas:
            out[row[r[0]], wi] += load.get(r, 0) / counts[r]
    return out


def _balancedness(wl: np.ndarray) -> float:
    """sum over layers of mean tokens per worker / sum over layers of max; 1.0 when there is no load."""
    peak = wl.max(1).sum() if wl.size else 0.0
    return 1.0 if peak == 0 else float(wl.mean(1).sum() / peak)


def balancedness(plan: PlacementPlan, load: Mapping[Logical, float]) -> float:
    return _balancedness(_layer_worker_load(plan, load))


def worker_load(plan: PlacementPlan, load: Mapping[Logical, float], layer: int | None = None) -> dict[int, float]:
    """Tokens each worker runs: over all MoE layers, or over one."""
    wl = _layer_worker_load(plan, load)
    per_worker = wl.sum(0) if layer is None else wl[plan.moe_layers.index(layer)]
    return {w.worker_id: float(t) for w, t in zip(plan.workers, per_worker)}


# --- the problem in array form ---------------------------------------------------------------------
# H [L, E, W] bool: H[l, e, w] is a replica of logical expert (moe_layers[l], e) on worker index w.


@dataclass
class _Problem:
    moe_layers: tuple[int, ...]
    num_experts: int
    load: np.ndarray  # [L, E] tokens per logical expert
    worker_ids: list[int]  # worker index -> worker id in the new plan
    slots: int
    orig: np.ndarray  # [L, E, W] the current plan's replicas on the workers that stay
    current: PlacementPlan | None
    groups: int | None = None  # expert groups per layer, or None to ignore groups
    group_weight: float = 0.0

    @classmethod
    def of(cls, inp: PlannerInput) -> "_Problem":
        cur = inp.current
        if cur is not None:
            layers, E = cur.moe_layers, cur.num_experts
        elif inp.load:
            layers, E = tuple(sorted({l for l, _ in inp.load})), max(e for _, e in inp.load) + 1
        else:
            raise ValueError("load is empty and there is no current plan: nothing names the logical experts")
        row = {layer: i for i, layer in enumerate(layers)}
        load = np.zeros((len(layers), E))
        for (layer, e), tokens in inp.load.items():
            if layer not in row or not 0 <= e < E:
                raise ValueError(f"load names logical expert {(layer, e)}, not in MoE layers {layers} x {E} experts")
            if tokens < 0:
                raise ValueError(f"load of logical expert {(layer, e)} is negative: {tokens}")
            load[row[layer], e] = tokens
        if inp.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {inp.num_workers}")
        if inp.migration_weight < 0:
            raise ValueError(f"migration_weight must be >= 0, got {inp.migration_weight}")
        if inp.groups is not None and (inp.groups < 1 or E % inp.groups):
            raise ValueError(f"groups={inp.groups} does not split {E} experts into equal contiguous groups")
        if inp.group_weight < 0:
            raise ValueError(f"group_weight must be >= 0, got {inp.group_weight}")
        need = -(-load.size // inp.num_workers)
        if inp.slots_per_worker < need:
            raise ValueError(f"slots_per_worker={inp.slots_per_worker} cannot hold {load.size} logical experts on "
                             f"{inp.num_workers} workers: need at least {need}")
        ids = [w.worker_id for w in cur.workers] if cur is not None else []
        if unknown := set(inp.drain) - set(ids):
            raise ValueError(f"drain names workers {sorted(unknown)} that the current plan does not have")
        kept = [w for w in cur.workers if w.worker_id not in inp.drain] if cur is not None else []
        if len(kept) > inp.num_workers:
            raise ValueError(f"num_workers={inp.num_workers} but {len(kept)} workers stay after draining "
                             f"{sorted(inp.drain)}: name the workers to drain")
        first_new = max(ids, default=-1) + 1  # fresh ids: an actor name is never reused
        worker_ids = [w.worker_id for w in kept] + list(range(first_new, first_new + inp.num_workers - len(kept)))
        orig = _hosts(cur, worker_ids) if cur is not None else np.zeros((len(layers), E, len(worker_ids)), dtype=bool)
        return cls(tuple(layers), E, load, worker_ids, inp.slots_per_worker, orig, cur, inp.groups,
                   inp.group_weight if inp.groups is not None else 0.0)

    def to_plan(self, H: np.ndarray) -> PlacementPlan:
        """The plan for H; the current plan itself when nothing changed (same version: nothing to roll out)."""
        workers = _workers(H, self.moe_layers, self.worker_ids)
        cur = self.current
        if cur is not None and [(w.worker_id, set(w.replicas)) for w in cur.workers] == \
                [(w.worker_id, set(w.replicas)) for w in workers]:
            return cur
        return PlacementPlan(cur.version + 1 if cur else 1, self.num_experts, self.moe_layers, workers)

    def objective(self, H: np.ndarray, k: float) -> float:
        """balancedness - k * replicas moved (k = migration_weight / logical experts), and with groups
        - group_weight / logical experts * (workers each group spans - 1, summed over layers and groups)."""
        J = _balancedness(_worker_tokens(H, self.load)) - k * float((H & ~self.orig).sum())
        if self.groups is not None:
            J -= self.group_k * float(group_spread(H, self.groups))
        return J

    @property
    def group_k(self) -> float:
        return self.group_weight / self.load.size if self.groups is not None else 0.0


def _group_hosts(H: np.ndarray, groups: int) -> np.ndarray:
    """[L, G, W] replicas of each expert group on each worker."""
    L, E, W = H.shape
    return H.reshape(L, groups, E // groups, W).sum(2)


def group_spread(H: np.ndarray, groups: int) -> int:
    """Extra workers expert groups span: sum over layers and groups of (workers hosting the group - 1)."""
    GH = _group_hosts(H, groups)
    return int((GH > 0).sum() - GH.shape[0] * GH.shape[1])


def plan_group_spread(plan: PlacementPlan, groups: int) -> int:
    """group_spread of a plan: 0 when every group of every layer sits on one worker."""
    return group_spread(_hosts(plan, [w.worker_id for w in plan.workers]), groups)


def _worker_tokens(H: np.ndarray, load: np.ndarray) -> np.ndarray:
    """[L, W] tokens per worker per layer."""
    return np.einsum("lew,le->lw", H, load / np.maximum(H.sum(2), 1))


# --- EPLB ------------------------------------------------------------------------------------------


def _eplb_hosts(load: np.ndarray, num_workers: int, slots: int) -> np.ndarray:
    """The published EPLB policy on arrays; replication and packing are global across MoE layers.

    Global, because a worker's slots hold replicas of every layer: replicas go to the logical experts
    with the most tokens per replica whatever their layer. Packing compares workers by their tokens in
    the replica's own layer, since each MoE layer waits for its own busiest worker.
    """
    L, E = load.shape
    W, N = num_workers, load.size
    flat = load.ravel()
    counts = np.ones(N, dtype=int)
    # Replication: fill every slot, one replica at a time, to the logical expert with the most tokens per
    # replica; at most one replica per worker, since two copies on one worker split nothing.
    heap = [(-flat[i], 1, i) for i in range(N)] if W > 1 else []
    heapq.heapify(heap)
    for _ in range(min(W * slots, N * W) - N):
        _, c, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < W:
            heapq.heappush(heap, (-flat[i] / counts[i], counts[i], i))
    # Packing: heaviest replica first, into the worker with the fewest tokens in its layer among those
    # with a free slot and no replica of it yet (ties: fewer replicas, then lower index).
    per_replica = flat / counts
    H = np.zeros((N, W), dtype=bool)
    wl = np.zeros((L, W))
    used = np.zeros(W, dtype=int)
    for i in sorted(range(N), key=lambda i: (-per_replica[i], i)):
        layer = i // E
        for _ in range(counts[i]):
            ok = (used < slots) & ~H[i]
            if not ok.any():
                _make_room(i, H, wl, used, slots, per_replica, E)
                ok = (used < slots) & ~H[i]
            w = min(np.flatnonzero(ok), key=lambda w: (wl[layer, w], used[w], w))
            H[i, w], used[w] = True, used[w] + 1
            wl[layer, w] += per_replica[i]
    return H.reshape(L, E, W)


def _make_room(i, H, wl, used, slots, per_replica, E) -> None:
    """Our addition to EPLB's packing, for when every free slot is on a worker that already hosts i.

    Then some full worker lacks i (i has fewer replicas than workers), and it holds a replica that the
    worker with the free slot lacks (pigeonhole); move the lightest such replica over to free a slot.
    """
    dst = int(np.flatnonzero(used < slots)[0])
    src = int(np.flatnonzero(~H[i] & (used >= slots))[0])
    j = min(np.flatnonzero(H[:, src] & ~H[:, dst]), key=lambda j: per_replica[j])
    H[j, src], H[j, dst] = False, True
    used[src], used[dst] = used[src] - 1, used[dst] + 1
    wl[j // E, src] -= per_replica[j]
    wl[j // E, dst] += per_replica[j]


def eplb_plan(inp: PlannerInput) -> PlacementPlan:
    """EPLB from scratch; the current plan only supplies the worker ids (EPLB ignores weight movement)."""
    p = _Problem.of(inp)
    return p.to_plan(_eplb_hosts(p.load, len(p.worker_ids), p.slots))


def match_workers(plan: PlacementPlan, current: PlacementPlan) -> PlacementPlan:
    """The same placement with its workers renamed to keep the most replicas where `current` has them
    (what EPLB would move if it matched workers, which it does not). Both plans have the same worker ids."""
    ids = [w.worker_id for w in current.workers]
    if sorted(ids) != sorted(w.worker_id for w in plan.workers):
        raise ValueError("match_workers needs two plans over the same worker ids")
    H = _hosts(plan, ids)
    H = H[:, :, _match_columns(H, _hosts(current, ids))]
    return PlacementPlan(plan.version, plan.num_experts, plan.moe_layers, _workers(H, plan.moe_layers, ids))


def _workers(H: np.ndarray, moe_layers: tuple[int, ...], worker_ids: list[int]) -> tuple[WorkerPlacement, ...]:
    """The inverse of _hosts."""
    return tuple(WorkerPlacement(wid, worker_name(wid),
                                 tuple((moe_layers[l], int(e)) for l, e in zip(*np.nonzero(H[:, :, i]))))
                 for i, wid in enumerate(worker_ids))


def _hosts(plan: PlacementPlan, worker_ids: list[int]) -> np.ndarray:
    """[L, E, W] the plan's replicas on the given workers, in that order (others left out)."""
    row = {layer: i for i, layer in enumerate(plan.moe_layers)}
    col = {wid: i for i, wid in enumerate(worker_ids)}
    H = np.zeros((len(plan.moe_layers), plan.num_experts, len(worker_ids)), dtype=bool)
    for w in plan.workers:
        for layer, e in w.replicas if w.worker_id in col else ():
            H[row[layer], e, col[w.worker_id]] = True
    return H


# --- migration-aware ------------------------------------------------------------------------------


def migration_aware_plan(inp: PlannerInput) -> PlacementPlan:
    """Maximise J = balancedness - migration_weight * bytes_moved / bytes of all logical experts.

    Start from the current plan with replicas kept in place (after the forced changes: draining, too
    few slots, logical experts without a replica), then apply, in every MoE layer, the move that most
    raises J until none does (`_improve`). The same search also runs from EPLB's plan with its workers
    matched to the current ones, and the better J wins: so with migration_weight 0 the result is at
    least as balanced as EPLB, and a large migration_weight keeps the current plan.

    bytes_moved / bytes of all logical experts = replicas moved / logical experts: expert_bytes cancels.

    With `inp.groups` (group-limited routing), J also subtracts group_weight / logical experts for every
    extra worker an expert group's replicas span (group_spread). The trade-off: a group kept on one
    worker means a token that picks it sends one dispatch message there instead of several, but it also
    ties the group's experts' loads together, so a hot group can only be relieved by replicating or
    moving whole groups' worth of experts; the planner accepts a lower balancedness when the messages it
    saves are worth more. group_weight 0 (or groups None) plans as without groups; with groups None the
    search is exactly the group-oblivious one.
    """
    p = _Problem.of(inp)
    H = _forced(p)
    if p.load.sum() == 0:  # nothing to balance: only the forced changes
        return p.to_plan(H)
    k = inp.migration_weight / p.load.size
    eplb = _eplb_hosts(p.load, len(p.worker_ids), p.slots)
    starts = [H, eplb[:, :, _match_columns(eplb, p.orig)]]
    return p.to_plan(max((_improve(p, s, k) for s in starts), key=lambda s: p.objective(s, k)))


def _match_columns(H: np.ndarray, orig: np.ndarray) -> np.ndarray:
    """perm such that H[..., perm] shares the most replicas with orig, worker by worker (greedy)."""
    W = H.shape[2]
    common = np.einsum("lew,lev->wv", H.astype(int), orig.astype(int))  # [W (H), W (orig)]
    perm, taken = np.full(W, -1), np.zeros(W, dtype=bool)
    for flat in np.argsort(-common, axis=None, kind="stable"):
        u, v = divmod(int(flat), W)
        if not taken[u] and perm[v] < 0:
            perm[v], taken[u] = u, True
    return perm


def _forced(p: _Problem) -> np.ndarray:
    """The current plan made valid with the fewest changes: no worker over its slots, every logical expert
    with a replica (those of drained workers included). Spare replicas go first; a sole replica that must
    leave is placed again on the least-loaded worker of its layer with a free slot."""
    H = p.orig.copy()
    L, E, W = H.shape
    for w in range(W):
        while H[:, :, w].sum() > p.slots:
            c = H.sum(2)
            spare = H[:, :, w] & (c > 1)
            pool = spare if spare.any() else H[:, :, w]
            per_replica = np.where(pool, p.load / np.maximum(c, 1), np.inf)
            H[np.unravel_index(per_replica.argmin(), (L, E)) + (w,)] = False
    for flat in np.argsort(-p.load, axis=None, kind="stable"):
        l, e = np.unravel_index(flat, (L, E))
        if H[l, e].any():
            continue
        used = H.sum((0, 1))
        if (used >= p.slots).all():  # every slot taken: drop the spare replica with the fewest tokens
            c = H.sum(2)
            per_replica = np.where(H & (c > 1)[:, :, None], (p.load / np.maximum(c, 1))[:, :, None], np.inf)
            H[np.unravel_index(per_replica.argmin(), H.shape)] = False
            used = H.sum((0, 1))
        wl = _worker_tokens(H, p.load)
        w = min(np.flatnonzero(used < p.slots), key=lambda w: (wl[l, w], used[w], w))
        H[l, e, w] = True
    return H


def _improve(p: _Problem, H: np.ndarray, k: float) -> np.ndarray:
    """Greedy local search on J: apply the move that raises J most until none does (see _best_moves).

    When a layer's busiest workers (nearly) tie, relieving one of them gains (almost) nothing and costs
    bytes, so no single move pays. Then try, layer by layer, a short chain of moves chosen as if the
    layer's top m workers were already relieved, and keep it as soon as J rises; a layer whose chain
    fails is left alone until some other move lands. J rises with every kept move, so the search ends.
    """
    H = H.copy()
    L, E, W = H.shape
    if W < 2 or p.load.sum() == 0:
        return H
    cost = (~p.orig).astype(float)  # replicas moved by placing a replica here
    J = p.objective(H, k)
    given_up = np.zeros(L, dtype=bool)  # layers where no chain helps; a move that touches one re-arms it
    for _ in range(4 * H.size):  # a safety net only
        if moves := _best_moves(H, p.load, cost, p.slots, k, groups=p.groups, gk=p.group_k):
            touched = _apply_batch(H, moves, p.slots)
            J = p.objective(H, k)
            given_up[touched] = False
            continue
        relieve, promise = _chain_targets(_worker_tokens(H, p.load), k)
        for l in [l for l in np.argsort(-promise, kind="stable") if relieve[l].any() and not given_up[l]]:
            trial, untie, touched = H.copy(), np.zeros_like(relieve), []
            untie[l] = relieve[l]
            trial_J = J
            for _ in range(2 * int(untie[l].sum())):
                if not (move := _best_moves(trial, p.load, cost, p.slots, k, untie, only=l, groups=p.groups,
                                            gk=p.group_k)):
                    break
                _apply(trial, move[0][2])
                touched += [index[0] for index, _ in move[0][2]]
                if (trial_J := p.objective(trial, k)) > J + 1e-12:
                    break
            if trial_J > J + 1e-12:
                H, J = trial, trial_J
                given_up[touched] = False
                break
            given_up[l] = True
        else:
            break
    return H


def _apply_batch(H: np.ndarray, moves: list, slots: int) -> list[int]:
    """Apply the per-layer best moves, best first, skipping any that shares a layer with one already
    applied or needs a slot an earlier one took. Moves in disjoint layers each raising J raise it
    together too (balancedness is convex in the tokens taken off the max), so the batch is one
    greedy step per layer at the cost of one search. Returns the layers touched."""
    used = H.sum((0, 1))
    touched: set[int] = set()
    for _, _, changes in moves:
        layers = {index[0] for index, _ in changes}
        delta = np.zeros_like(used)
        for index, value in changes:
            delta[index[2]] += 1 if value else -1
        if layers & touched or (used + delta > slots).any():
            continue
        _apply(H, changes)
        used += delta
        touched |= layers
    return sorted(touched)


def _chain_targets(wl: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Per layer the top m >= 2 workers whose relief promises the most J net of m moves: ([L, W] mask, [L]
    promise). Relieving the top m can at best bring the layer's max down to the (m+1)-th load or to the
    mean, whichever is higher; a layer where no m promises a gain gets an empty row."""
    L, W = wl.shape
    S, Tm = wl.max(1).sum(), wl.mean(1).sum()
    desc = -np.sort(-wl, 1)
    out = np.zeros((L, W), dtype=bool)
    if W < 3 or S == 0:
        return out, np.zeros(L)
    m = np.arange(2, W)  # [M]
    floor = np.maximum(desc[:, 2:], wl.mean(1, keepdims=True))  # [L, M] best max after relieving m
    promise = Tm / (S - (desc[:, :1] - floor)) - Tm / S - k * m
    best = promise.argmax(1)
    top = promise[np.arange(L), best]
    for l in np.flatnonzero(top > 1e-12):
        out[l, np.argsort(-wl[l], kind="stable")[: m[best[l]]]] = True
    return out, top


def _apply(H: np.ndarray, changes: list) -> None:
    """changes: [(H index, new value)]; index[0] is the layer."""
    for index, value in changes:
        H[index] = value


def _max_without(M: np.ndarray) -> np.ndarray:
    """[..., W] -> [..., W]: entry w is the max of M over the last axis leaving out index w."""
    top = np.sort(M, -1)
    second = top[..., -2:-1] if M.shape[-1] > 1 else np.zeros_like(top[..., -1:])
    return np.where(np.arange(M.shape[-1]) == M.argmax(-1)[..., None], second, top[..., -1:])


def _best_moves(H, load, cost, slots, k, untie=None, only=None, groups=None, gk=0.0):
    """Per layer (or in layer `only`), the move that raises J most: [(dJ, layer, [(H index, new value)])],
    best first; layers where no move raises J are left out.

    Every move takes tokens off some layer's busiest worker h (only that can lower the layer's max):
      move    a replica of x from h to w
      add     a replica of x (on h) on w; x's tokens then split over one more replica
      remove  x's replica on h, when x has others
      swap    x on h with y of the same layer on w
    Move and add go only to a worker with few enough replicas of the layer (see `roomy`). A move into
    a full worker first evicts the spare replica that costs least, from another layer, so that the
    effects on the two layers add up exactly. Workers marked in `untie` [L, W] count as relieved: the
    gain is the one the rest of a chain of moves would realise (see _improve). With `groups`, every
    move also pays gk per worker it adds to an expert group's span (and gains gk per worker it takes off).
    """
    L, E, W = H.shape
    lay, wrk = np.arange(L), np.arange(W)
    c = H.sum(2)  # [L, E] replicas per logical expert
    a = load / c  # [L, E] tokens per replica
    wl = np.einsum("lew,le->lw", H, a)  # [L, W] tokens per worker per layer
    full = H.sum((0, 1)) >= slots  # [W]
    h = wl.argmax(1)  # [L] busiest worker of each layer
    mx = wl[lay, h]
    S, Tm = mx.sum(), wl.mean(1).sum()  # J's balancedness is Tm / S; Tm never changes
    relieved = np.zeros((L, W), dtype=bool)
    relieved[lay, h] = True  # each move states h's new load itself
    if untie is not None:
        relieved |= untie
    wl_o = np.where(relieved, 0.0, wl)  # loads are >= 0, so 0 leaves a worker out of a max
    rest = _max_without(wl_o)  # [L, W] busiest worker other than h (and the relieved) and w
    on_h = H[lay, :, h]  # [L, E]
    refund_h = on_h * cost[lay, :, h]  # removing a replica this plan placed on h gives its bytes back

    # Evictions to make room on a full worker: per (layer, worker) the spare replica whose removal raises
    # that layer's max least, net of bytes given back (converted to tokens at dJ/dS = -Tm / S^2).
    spare = c > 1
    spare_rise = np.where(spare, load / (c * np.maximum(c - 1, 1)), 0.0)  # each other host's extra tokens
    after_evict = np.maximum(wl[:, None, :] - a[:, :, None], _max_without(wl[:, None, :] + spare_rise[:, :, None] * H))
    rise = after_evict - mx[:, None, None]  # [L, E, W]
    score = np.where(H & spare[:, :, None], rise - k * S * S / Tm * cost, np.inf)
    ev_e = score.argmin(1)  # [L, W]
    ev_score = np.take_along_axis(score, ev_e[:, None], 1)[:, 0]
    by_score = np.argsort(ev_score, axis=0, kind="stable")  # [L, W]: layers to evict from, best first
    ev_l = np.where(by_score[0] == lay[:, None], by_score[min(1, L - 1)], by_score[0])  # not the move's own layer
    ev_ok = (ev_l != lay[:, None]) & np.isfinite(ev_score[ev_l, wrk])
    room_rise = np.where(full, np.where(ev_ok, rise[ev_l, ev_e[ev_l, wrk], wrk], np.inf), 0.0)  # [L, W]
    room_dm = np.where(full & ev_ok, -cost[ev_l, ev_e[ev_l, wrk], wrk], 0.0)
    # Expert groups: change in the workers a group spans. new_w [L, E, W]: x's group is not on w yet;
    # alone_h [L, E]: x is its group's only replica on h; room_ds [L, W]: the eviction empties its group.
    if groups is not None:
        gx = np.arange(E) // (E // groups)
        GH = _group_hosts(H, groups)  # [L, G, W]
        new_w = (GH[:, gx, :] == 0).astype(float)
        alone_h = (GH[lay[:, None], gx[None, :], h[:, None]] == 1).astype(float)
        room_ds = np.where(full & ev_ok, -(GH[ev_l, gx[ev_e[ev_l, wrk]], wrk] == 1).astype(float), 0.0)
    else:
        GH = new_w = alone_h = room_ds = np.zeros((L, 1, 1))

    # From here on only the layers searched: the same names, indexed by position in `ls`.
    ls = lay if only is None else np.array([only])
    (H, cost, load, c, a, wl, wl_o, h, mx, rest, on_h, refund_h, spare, spare_rise, room_rise, room_dm,
     GH, new_w, alone_h, room_ds) = (
        v[ls] for v in (H, cost, load, c, a, wl, wl_o, h, mx, rest, on_h, refund_h, spare, spare_rise,
                        room_rise, room_dm, GH, new_w, alone_h, room_ds))
    L, lay = len(ls), np.arange(len(ls))

    def dJ(after, dm, room=True, ds=None):  # after: the layer's new max; dm: change in replicas moved;
        # ds: change in the workers expert groups span (only with groups)
        g = mx.reshape((L,) + (1,) * (after.ndim - 1)) - after - (room_rise[:, None, :] if room else 0)
        out = Tm / (S - g) - Tm / S - k * (dm + (room_dm[:, None, :] if room else 0))
        if groups is not None:
            out = out - gk * (ds + (room_ds[:, None, :] if room else 0))
        return out

    # A move or add never gives a worker more than ceil(R / W) + 1 replicas of one layer (R: the layer's
    # replicas). The experts that turn hot next are mostly cold now, so a worker piled with one layer's
    # cold experts is the one overloaded after a shift (bench, seed 0: 0.394 -> 0.409 served right after
    # the hot set rotates, EPLB 0.414, for 27% more bytes moved).
    roomy = (H.sum(1) < -(-c.sum(1, keepdims=True) // W) + 1)[:, None, :]  # [L, 1, W]

    cand = []  # (dJ, kind)
    # move x from h to w: [L, E, W]
    after = np.maximum(np.maximum(rest[:, None, :], (mx[:, None] - a)[:, :, None]), wl[:, None, :] + a[:, :, None])
    cand.append((np.where(on_h[:, :, None] & ~H & roomy,
                          dJ(after, cost - refund_h[:, :, None], ds=new_w - alone_h[:, :, None]), -np.inf), "move"))
    # add a replica of x (on h) on w: x's hosts each lose a share, w gains one: [L, E, W]
    D = np.where(H, wl[:, None, :] - (load / (c * (c + 1)))[:, :, None], wl_o[:, None, :])
    after = np.maximum(_max_without(D), wl[:, None, :] + (load / (c + 1))[:, :, None])
    cand.append((np.where(on_h[:, :, None] & ~H & roomy, dJ(after, cost, ds=new_w), -np.inf), "add"))
    # remove x's replica on h: [L, E]
    Rm = np.where(H, wl[:, None, :] + spare_rise[:, :, None], wl_o[:, None, :])
    Rm[lay[:, None], np.arange(E), h[:, None]] = mx[:, None] - a
    cand.append((np.where(on_h & spare, dJ(Rm.max(2), -refund_h, room=False, ds=-alone_h), -np.inf), "remove"))
    # swap x on h with a replica y on w, y of the same layer and not on h: [L, K, R] over the K replicas
    # on h and the R replicas of the layer's other experts
    K = int(on_h.sum(1).max())
    xs = np.argsort(~on_h, axis=1, kind="stable")[:, :K]  # [L, K] experts on h first
    ly, ye, yw = np.nonzero(H & ~on_h[:, :, None])
    n = np.bincount(ly, minlength=L)
    Ye, Yw, Yok = (np.zeros((L, max(n.max(), 1)), dtype=t) for t in (int, int, bool))
    pos = np.arange(ly.size) - np.repeat(np.cumsum(n) - n, n)
    Ye[ly, pos], Yw[ly, pos], Yok[ly, pos] = ye, yw, True
    l3, l2 = lay[:, None, None], lay[:, None]
    ax, ay = np.take_along_axis(a, xs, 1)[:, :, None], a[l2, Ye][:, None, :]
    after = np.maximum(np.maximum(rest[l2, Yw][:, None, :], mx[:, None, None] - ax + ay),
                       wl[l2, Yw][:, None, :] + ax - ay)
    x_to_w = cost[l3, xs[:, :, None], Yw[:, None, :]]
    y_to_h = (cost[l2, Ye, h[:, None]] - cost[l2, Ye, Yw])[:, None, :]  # net of y's refund on w
    dm = x_to_w + y_to_h - np.take_along_axis(refund_h, xs, 1)[:, :, None]
    ok = np.take_along_axis(on_h, xs, 1)[:, :, None] & Yok[:, None, :] & ~H[l3, xs[:, :, None], Yw[:, None, :]]
    g = mx[:, None, None] - after
    swap_dj = Tm / (S - g) - Tm / S - k * dm
    if groups is not None:  # x's group gains w and may lose h; y's gains h and may lose w; same group: 0
        gxx, gyy = gx[xs], gx[Ye]  # [L, K], [L, R]
        ds = ((GH[l3, gxx[:, :, None], Yw[:, None, :]] == 0).astype(float)
              - (GH[l2, gxx, h[:, None]] == 1)[:, :, None] + (GH[l2, gyy, h[:, None]] == 0)[:, None, :]
              - (GH[l2, gyy, Yw] == 1)[:, None, :])
        swap_dj = swap_dj - gk * np.where(gxx[:, :, None] == gyy[:, None, :], 0.0, ds)
    cand.append((np.where(ok, swap_dj, -np.inf), "swap"))

    best = np.stack([dj.reshape(L, -1).max(1) for dj, _ in cand])  # [kinds, L]
    out = []
    for i in np.flatnonzero(best.max(0) > 1e-12):
        dj, kind = cand[int(best[:, i].argmax())]
        idx = (i,) + np.unravel_index(dj[i].argmax(), dj.shape[1:])
        l = int(ls[i])
        out.append((float(best[:, i].max()), l, _changes(kind, l, idx, h, xs, Ye, Yw, full, ev_l, ev_e)))
    return sorted(out, key=lambda t: -t[0])


def _changes(kind, l, idx, h, xs, Ye, Yw, full, ev_l, ev_e) -> list:
    """The [(H index, new value)] of one move found by _best_moves: idx indexes the searched layers
    (h, xs, Ye, Yw), l is the layer; ev_l, ev_e index all layers."""
    i = idx[0]
    if kind == "remove":
        return [((l, idx[1], h[i]), False)]
    if kind == "swap":
        x, y, w = xs[i, idx[1]], Ye[i, idx[2]], Yw[i, idx[2]]
        return [((l, x, h[i]), False), ((l, x, w), True), ((l, y, w), False), ((l, y, h[i]), True)]
    e, w = idx[1], idx[2]
    changes = [((l, e, w), True)] + ([((l, e, h[i]), False)] if kind == "move" else [])
    if full[w]:
        changes.append(((ev_l[l, w], ev_e[ev_l[l, w], w], w), False))
    return changes


# --- registry --------------------------------------------------------------------------------------

Planner = Callable[[PlannerInput], PlacementPlan]
PLANNERS: dict[str, Planner] = {"eplb": eplb_plan, "migration_aware": migration_aware_plan}


def plan(policy_name: str, inp: PlannerInput) -> PlacementPlan:
    if policy_name not in PLANNERS:
        raise ValueError(f"unknown placement policy {policy_name!r}; known: {sorted(PLANNERS)}")
    return PLANNERS[policy_name](inp)
