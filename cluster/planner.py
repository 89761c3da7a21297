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
  migration_aware  ours: starts from the current plan and trades balancedness against bytes moved,
                   with EPLB's per-layer maxima as targets (see migration_aware_plan).
`plan` runs one, then, when PlannerInput.domains says which node each worker is on, spread_over_domains:
a replicated logical expert whose replicas all sit on one node gets one moved to another node, so that
losing a node leaves every replicated expert a copy (see there for the price in balancedness).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from expert_workers.spec import ModelSpec
from router_service.placement import PlacementPlan, WorkerPlacement

Logical = tuple[int, int]  # (layer, expert)

# Moving every logical expert's weights once is worth this much balancedness. On `moe-serve bench
# placement` (DeepSeek-MoE-16B shape, 8 workers, 11% spare slots, hot set rotating; seed 0) 0.03 gives
# balancedness 0.9930 against EPLB's 0.9926 for 0.098x its replicas moved, 28 ms per re-plan.
DEFAULT_MIGRATION_WEIGHT = 0.03
# With PlannerInput.groups: balancedness one extra worker per group, for every logical expert, is
# worth (see migration_aware_plan). On `moe-serve bench placement`'s group trace (8 layers x 64 experts
# in 8 groups, top-8 in the best 3, 8 workers; seed 0) 0.03 gives 4.95 workers visited per token
# against 5.84 without groups, planned balancedness 0.9901 against 0.9899.
DEFAULT_GROUP_WEIGHT = 0.03


WORKER_PREFIX = "expert-worker-"  # Ray actor names of expert workers: expert-worker-<id>


def worker_name(worker_id: int) -> str:
    return f"{WORKER_PREFIX}{worker_id}"


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
    # Worker id -> its failure domain (the controller passes each worker's Ray node id). With it, `plan`
    # spreads the replicas of every replicated logical expert over at least two domains (spread_over_domains);
    # a worker it does not name (one the new plan starts) counts as a domain of its own. None = no spreading.
    domains: Mapping[int, str] | None = None


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
        # New workers are numbered after the current plan's ids; the controller renames them past every id
        # it ever used (Controller._with_fresh_ids), so a drained worker's id is not reused.
        first_new = max(ids, default=-1) + 1
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
    """The published EPLB policy on arrays: [L, E] tokens -> [L, E, W] hosts.

    Replication is global across MoE layers, because a worker's slots hold replicas of every layer:
    each spare slot goes to the logical expert with the most tokens per replica, whatever its layer, and
    at most one replica per worker (two copies on one worker split nothing). Packing compares workers by
    their tokens in the replica's own layer, since each MoE layer waits for its own busiest worker: a
    layer's replicas go heaviest first into the worker with the fewest tokens of that layer among those
    with a free slot and no copy yet. The layers are packed in lockstep, the j-th replica of every layer
    in one numpy step; a worker that more layers choose than it has free slots takes the heaviest.
    """
    L, E = load.shape
    W = num_workers
    counts = _eplb_counts(load, W, slots)
    per_replica = load / counts  # [L, E]
    # Each layer's replicas heaviest first: order[l, j] is the expert of layer l's j-th replica (-1: none).
    R = int(counts.sum(1).max())
    by_weight = np.argsort(-per_replica, axis=1, kind="stable")  # [L, E]
    order = np.full((L, R), -1)
    for l in range(L):
        experts = np.repeat(by_weight[l], counts[l, by_weight[l]])
        order[l, :experts.size] = experts
    H = np.zeros((L, E, W), dtype=bool)
    wl = np.zeros((L, W))  # tokens per layer per worker so far
    used = np.zeros(W, dtype=int)  # slots taken per worker, all layers
    for j in range(R):
        todo = np.flatnonzero(order[:, j] >= 0)  # layers placing their j-th replica
        while todo.size:
            x = order[todo, j]
            ok = (used < slots)[None, :] & ~H[todo, x]  # [T, W]
            if (stuck := np.flatnonzero(~ok.any(1))).size:
                for t in stuck:  # one layer's fix may free a slot another stuck layer can use
                    if not ((used < slots) & ~H[todo[t], x[t]]).any():
                        _make_room(H, wl, used, slots, per_replica, int(todo[t]), int(x[t]))
                ok = (used < slots)[None, :] & ~H[todo, x]
            score = np.where(ok, wl[todo], np.inf)
            tie = ok & (score <= score.min(1, keepdims=True))
            # Among the least loaded, the fewest slots taken, then the first from a per-layer starting worker:
            # without the rotation every layer would start on worker 0 and, packed in lockstep, pile the same
            # workers with the same ranks of every layer until their slots run out.
            key = used[None, :] * W + (np.arange(W)[None, :] - todo[:, None] * W // L) % W
            w = np.where(tie, key, np.iinfo(int).max).argmin(1)
            # A worker chosen by more layers than it has free slots takes the heaviest replicas; the rest
            # choose again.
            rank = np.lexsort((-per_replica[todo, x], w))  # grouped by worker, heaviest first
            first = np.searchsorted(w[rank], w[rank])  # position of each worker's group in rank
            fits = np.empty(todo.size, dtype=bool)
            fits[rank] = np.arange(todo.size) - first < (slots - used)[w[rank]]
            l, x, w = todo[fits], x[fits], w[fits]
            H[l, x, w] = True
            np.add.at(used, w, 1)
            wl[l, w] += per_replica[l, x]
            todo = todo[~fits]
    return H


def _eplb_counts(load: np.ndarray, num_workers: int, slots: int) -> np.ndarray:
    """EPLB's replication: [L, E] tokens -> [L, E] replicas, every slot filled, each to the logical expert
    with the most tokens per replica (at most one replica per worker)."""
    L, E = load.shape
    W, N = num_workers, load.size
    flat = load.ravel()
    counts = np.ones(N, dtype=int)
    heap = [(-flat[i], 1, i) for i in range(N)] if W > 1 else []
    heapq.heapify(heap)
    for _ in range(min(W * slots, N * W) - N):
        _, c, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < W:
            heapq.heappush(heap, (-flat[i] / counts[i], counts[i], i))
    return counts.reshape(L, E)


def _make_room(H, wl, used, slots, per_replica, l: int, x: int) -> None:
    """Our addition to EPLB's packing: every worker with a free slot already hosts (l, x).

    Then some full worker u lacks x (x has fewer replicas than workers), and it holds a replica that the
    worker v with the free slot lacks (pigeonhole); move the lightest such replica over to v, which frees
    a slot for x on u.
    """
    v = int(np.flatnonzero(used < slots)[0])
    u = int(np.flatnonzero(~H[l, x] & (used >= slots))[0])
    ly, y = np.nonzero(H[:, :, u] & ~H[:, :, v])
    i = int(per_replica[ly, y].argmin())
    H[ly[i], y[i], u], H[ly[i], y[i], v] = False, True
    used[u], used[v] = used[u] - 1, used[v] + 1
    wl[ly[i], u] -= per_replica[ly[i], y[i]]
    wl[ly[i], v] += per_replica[ly[i], y[i]]


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
    """Maximise J = balancedness - migration_weight * replicas moved / logical experts (the byte ratio:
    expert_bytes cancels), starting from the current plan.

    Start from the current plan with replicas kept in place (after the forced changes: draining, too
    few slots, logical experts without a replica). EPLB's plan from scratch on the same load sets a
    target per MoE layer, the tokens on its busiest worker. `_exchange` first hands the replicas of
    cooled experts to heated ones whose replica alone is over the target (the hot set shifted); then
    `_search` moves replicas off each layer's busiest worker while that pays in J, taking the excess over
    the targets as the tokens a move will take off the layer's maximum, and stops once the plan is as
    balanced as EPLB's: further moves would chase one window's sampling noise, which the next window does
    not repeat. Excess rather than the maximum itself because several workers often tie at a layer's
    maximum: relieving one of them lowers nothing yet, but lowers the excess, and the next move relieves
    the next. Finally the starting plan and EPLB's plan with its workers matched
    to the current ones compete on J, so J never falls below the starting plan's, with migration_weight 0
    the result is at least as balanced as EPLB's, and a large migration_weight keeps the current plan.

    With `inp.groups` (group-limited routing), J also subtracts group_weight / logical experts for every
    extra worker an expert group's replicas span (group_spread). The trade-off: a group kept on one
    worker means a token that picks it sends one dispatch message there instead of several, but it also
    ties the group's experts' loads together, so a hot group can only be relieved by replicating or
    moving whole groups' worth of experts; the planner accepts a lower balancedness when the messages it
    saves are worth more. group_weight 0 (or groups None) plans as without groups.
    """
    p = _Problem.of(inp)
    H = _forced(p)
    if p.load.sum() == 0:  # nothing to balance: only the forced changes
        return p.to_plan(H)
    k = inp.migration_weight / p.load.size
    eplb = _eplb_hosts(p.load, len(p.worker_ids), p.slots)
    wl = _worker_tokens(eplb, p.load)
    target = wl.max(1)  # EPLB's busiest worker in each layer
    start = _exchange(p, H, target, k) if p.groups is None else H  # exchanges do not weigh group spread
    ours = _search(p, start, target, _balancedness(wl), k)
    matched = eplb[:, :, _match_columns(eplb, p.orig)]
    # The search's estimate of J can be off by a little (it counts excess, not maxima): the plan it started
    # from competes too, so J never falls below the starting plan's. Ties keep the search's plan.
    return p.to_plan(max((ours, H, matched), key=lambda s: p.objective(s, k)))


# Experts per layer an exchange considers: those with the most tokens per replica, each against every
# replicated expert of its layer.
EXCHANGE_HOT = 8


def _exchange(p: _Problem, H: np.ndarray, target: np.ndarray, k: float) -> np.ndarray:
    """Before the search, hand a cooled expert's replicas to a heated one, per layer.

    When the hot set shifts, an expert x heats up on one replica while an expert y, which had several,
    cools down. x's replica alone is then over the target, and giving x replicas one at a time cannot
    pay: each worker that takes one must first shed its own share of the layer, a chain of moves the
    search does not find. Two steps land at once instead, both between x, one of the EXCHANGE_HOT
    experts with the most tokens per replica whose replica alone is over the target, and a replicated y:

      exchange   x takes over y's hosts and y x's
      hand over  x keeps its hosts and takes over all of y's but one, y's busiest host, which keeps y

    Per round and layer the best of them is applied when it lowers the layer's excess over the target by
    more than its moves cost (J's rates, as in _best_moves); rounds repeat while any layer finds one.
    """
    H = H.copy()
    L, E, W = H.shape
    cost = (~p.orig).astype(float)  # [L, E, W] placing a replica here counts as one moved
    lay = np.arange(L)[:, None]
    for _ in range(E):  # a safety net only
        c = H.sum(2)  # [L, E]
        a = p.load / np.maximum(c, 1)  # [L, E] tokens per replica
        wl = np.einsum("lew,le->lw", H, a)  # [L, W]
        ex = np.maximum(wl - target[:, None], 0)
        S, Tm = wl.max(1).sum(), wl.mean(1).sum()
        if S == 0:
            break
        rate = Tm / (S * S)  # J per token off the summed maxima
        xs = np.argsort(-a, axis=1, kind="stable")[:, :EXCHANGE_HOT]  # [L, X]
        ys = np.argsort(-c, axis=1, kind="stable")[:, :max(int((c > 1).sum(1).max()), 1)]  # [L, Y] replicated first
        Y = ys.shape[1]
        lx, cx, ly, cy = p.load[lay, xs], c[lay, xs], p.load[lay, ys], c[lay, ys]  # [L, X], [L, Y]
        Hx, Hy = H[lay, xs].astype(float), H[lay, ys].astype(float)  # [L, X, W], [L, Y, W]
        cx_w, cy_w = cost[lay, xs], cost[lay, ys]  # [L, X, W], [L, Y, W]
        X4, Y4 = Hx[:, :, None], Hy[:, None]  # [L, X, 1, W], [L, 1, Y, W]
        ax4, ay4 = (lx / cx)[:, :, None, None], (ly / cy)[:, None, :, None]

        def excess_change(dw):  # [L, X, Y, W] tokens each worker gains -> [L, X, Y]
            return (np.maximum(wl[:, None, None] + dw - target[:, None, None, None], 0) - ex[:, None, None]).sum(3)

        # exchange: x's hosts run y's tokens over c_x replicas, y's hosts x's over c_y
        dex_x = excess_change(X4 * (ly[:, None, :, None] / cx[:, :, None, None] - ax4)
                              + Y4 * (lx[:, :, None, None] / cy[:, None, :, None] - ay4))
        moves_x = (np.einsum("lyw,lxw->lxy", Hy, cx_w) + np.einsum("lxw,lyw->lxy", Hx, cy_w)
                   - (Hx * cx_w).sum(2)[:, :, None] - (Hy * cy_w).sum(2)[:, None])
        # hand over: x on c_x + c_y - 1 replicas; y's kept host runs all of y's tokens
        # y stays on its busiest host: x's new replicas carry more tokens than y's whole load now
        keep = np.where(Hy > 0, wl[:, None, :], -np.inf).argmax(2)  # [L, Y]
        kept = np.zeros_like(Hy)
        np.put_along_axis(kept, keep[:, :, None], 1.0, 2)
        given = Hy - kept  # [L, Y, W] y's hosts that x takes over
        ax_new = (lx[:, :, None] / (cx[:, :, None] + cy[:, None] - 1))[..., None]  # [L, X, Y, 1]
        dex_h = excess_change(X4 * (ax_new - ax4) + given[:, None] * (ax_new - ay4)
                              + kept[:, None] * (ly[:, None, :, None] - ay4))
        moves_h = np.einsum("lyw,lxw->lxy", given, cx_w) - (given * cy_w).sum(2)[:, None]
        apart = np.einsum("lxw,lyw->lxy", Hx, Hy) == 0  # no worker hosts both (x cannot go there twice)

        alone_over = (lx / cx > target[:, None])[:, :, None]  # [L, X, 1]
        pair = alone_over & (cy[:, None] > cx[:, :, None])  # [L, X, Y] x gains replicas (so y is not x)
        val = np.stack([np.where(pair & (dex_x < -1e-9), -rate * dex_x - k * moves_x, -np.inf),
                        np.where(pair & apart & (dex_h < -1e-9), -rate * dex_h - k * moves_h,
                                 -np.inf)], 1).reshape(L, -1)  # [L, 2 * X * Y] exchanges, then hand-overs
        best = val.argmax(1)
        applied = False
        for l in np.flatnonzero(val[np.arange(L), best] > 1e-12):
            kind, rest = divmod(int(best[l]), xs.shape[1] * Y)
            x, y = xs[l, rest // Y], ys[l, rest % Y]
            if kind == 0:
                H[l, x], H[l, y] = H[l, y].copy(), H[l, x].copy()
            else:
                H[l, x] |= given[l, rest % Y] > 0
                H[l, y] = kept[l, rest % Y] > 0
            applied = True
        if not applied:
            break
    return H


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
    for w in np.flatnonzero(H.sum((0, 1)) > p.slots):
        while H[:, :, w].sum() > p.slots:
            c = H.sum(2)
            spare = H[:, :, w] & (c > 1)
            pool = spare if spare.any() else H[:, :, w]
            per_replica = np.where(pool, p.load / np.maximum(c, 1), np.inf)
            H[np.unravel_index(per_replica.argmin(), (L, E)) + (w,)] = False
    missing = ~H.any(2)
    for flat in np.argsort(-np.where(missing, p.load, -1), axis=None, kind="stable")[:int(missing.sum())]:
        l, e = np.unravel_index(flat, (L, E))
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


# The search stops once balancedness is this far above EPLB's: moves beyond it chase one window's noise.
GOAL_MARGIN = 0.0002
# Sources per layer and round: the workers furthest over the layer's target, each with its own best move.
SOURCES_PER_LAYER = 1
# Swap partners: replicas on the layer's least-loaded workers only (a swap must take load onto a light one).
# With trades doing most of the relief, 4 cost nothing in balancedness on the bench and cut a 16B round by a third.
SWAP_WORKERS = 4
# Layers per worker a trade's return may come from: those where the worker is furthest over the target.
RETURN_LAYERS = 4


def _search(p: _Problem, H: np.ndarray, target: np.ndarray, goal: float, k: float) -> np.ndarray:
    """Greedy rounds of moves off the workers over their layer's target until none pays (see _best_moves),
    or, without groups, until balancedness is GOAL_MARGIN above `goal` (EPLB's).

    Each round finds, for every (layer, source worker), the best move, and applies them best first,
    skipping a move that touches a (layer, worker) an earlier move of the round touched, or needs a free
    slot an earlier move took: moves on disjoint (layer, worker) sets change disjoint loads, so each
    lands exactly as evaluated. A move is kept only if it raises the estimate of J and does not raise
    the total excess over the targets, so the search ends.
    """
    H = H.copy()
    if H.shape[2] < 2:
        return H
    cost = (~p.orig).astype(float)  # [L, E, W] placing a replica here counts as one moved
    stop_at = goal + GOAL_MARGIN if p.groups is None else np.inf  # with groups J also counts their spread
    for _ in range(H.size):  # a safety net only
        moves, used = _best_moves(H, p.load, target, cost, p.slots, k, p.groups, p.group_k, stop_at)
        if not moves:
            break
        touched: set[tuple[int, int]] = set()
        for _, cells, changes in moves:
            delta = np.zeros_like(used)
            for (_, _, w), value in changes:
                delta[w] += 1 if value else -1
            if cells & touched or (used + delta > p.slots).any():
                continue
            for index, value in changes:
                H[index] = value
            used += delta
            touched |= cells
    return H


def _best_moves(H, load, target, cost, slots, k, groups, gk, stop_at=np.inf):
    """For each layer and each source worker u over the layer's target (the busiest one where none is),
    the best move off u: ([(value, (layer, worker) cells touched, [(H index, new value)])] best first,
    [W] slots taken); sources with no move that pays are left out, and there are none once balancedness
    reaches `stop_at`.

      move    a replica of x from u to w
      add     a replica of x (on u) on w; x's tokens then split over one more replica
      remove  x's replica on u, when x has others
      replace add x on w in place of a spare replica there of another expert of the same layer
      swap    x on u with y of the same layer on w, one of the layer's SWAP_WORKERS lightest workers
      trade   x from u to w, and in return a replica z of another layer from w to u (see _returns;
              without groups)

    A move or add into a full worker first evicts the spare replica there, from another layer, that
    costs least. The value of a move in J is what it takes off the excess over the targets, at J's rate
    per token of the summed layer maxima (balancedness = Tm / S, so dJ = Tm / S^2 per token), less k per
    replica moved (cost: a replica back where the current plan has it refunds one) and, with groups,
    gk per worker added to an expert group's span. Arrays are over the K replicas on each source, so a
    round costs O(sources x K x workers), not O(layers x experts x workers).
    """
    L, E, W = H.shape
    wk = np.arange(W)
    c = H.sum(2)  # [L, E] replicas per logical expert
    a = load / np.maximum(c, 1)  # [L, E] tokens per replica
    wl = np.einsum("lew,le->lw", H, a)  # [L, W] tokens per worker per layer
    ex = np.maximum(wl - target[:, None], 0)  # [L, W] excess over the layer's target
    S, Tm = wl.max(1).sum(), wl.mean(1).sum()
    used = H.sum((0, 1))  # [W] slots taken
    if S == 0 or Tm / S >= stop_at:
        return [], used
    rate = Tm / (S * S)  # J per token off the summed maxima
    free = used < slots  # [W]
    G = H.reshape(L, groups, E // groups, W).sum(2) if groups is not None else None  # [L, G, W] group replicas
    gx = np.arange(E) // (E // groups) if groups is not None else np.zeros(E, dtype=int)

    def excess(tokens, t):  # tokens' excess over the target t
        return np.maximum(tokens - t, 0)

    def group_count(l, e, w):  # replicas of e's expert group on w (1 without groups: never 0, never alone)
        return G[l, gx[e], w] if G is not None else np.full(np.broadcast(l, e, w).shape, 2)

    # Evictions to make room on a full worker v: per (layer, v) the spare replica whose removal costs J
    # least, over the list of spare replicas (l, y, v). Each other host of y takes load / (c (c - 1)) more.
    rl, ry, rv = _nonzero(H & (c > 1)[:, :, None])
    inc = load[rl, ry] / np.maximum(c[rl, ry] * (c[rl, ry] - 1), 1)
    up = excess(wl[rl, rv] + inc, target[rl]) - ex[rl, rv]  # this host's rise if another copy left
    ups = np.bincount(rl * E + ry, weights=up, minlength=L * E)[rl * E + ry]  # summed over y's hosts
    d_ev = ups - up + excess(wl[rl, rv] - a[rl, ry], target[rl]) - ex[rl, rv]
    v_ev = -rate * d_ev + k * cost[rl, ry, rv] + gk * (group_count(rl, ry, rv) == 1)
    best = np.lexsort((-v_ev, rl * W + rv))  # grouped by (layer, worker), best first
    head = best[np.r_[True, np.diff((rl * W + rv)[best]) != 0]] if best.size else best
    ev_val, ev_dex = np.full((L, W), -np.inf), np.zeros((L, W))
    ev_y = np.zeros((L, W), dtype=int)
    ev_val[rl[head], rv[head]], ev_dex[rl[head], rv[head]], ev_y[rl[head], rv[head]] = v_ev[head], d_ev[head], ry[head]
    best2 = np.argsort(-ev_val, axis=0, kind="stable")[:2]  # [2, W] the two best layers to evict from
    lay = np.arange(L)[:, None]
    ev_l = np.where(best2[0][None, :] == lay, best2[min(1, L - 1)][None, :], best2[0][None, :])  # [L, W] not l
    ev_ok = (ev_l != lay) & np.isfinite(ev_val[ev_l, wk])
    room_val = np.where(free, 0.0, np.where(ev_ok, ev_val[ev_l, wk], -np.inf))  # [L, W]
    room_dex = np.where(free | ~ev_ok, 0.0, ev_dex[ev_l, wk])

    # Sources: (layer pl, worker pu) pairs, P of them.
    by_excess = np.argsort(-ex, axis=1, kind="stable")[:, :SOURCES_PER_LAYER]  # [L, M]
    is_src = np.take_along_axis(ex, by_excess, 1) > 1e-9
    is_src[:, 0] |= groups is not None  # with groups, a layer at its target may still gather its groups
    pl, m = np.nonzero(is_src)
    if pl.size == 0:
        return [], used
    pu = by_excess[pl, m]
    P = pl.size
    p2, p3 = pl[:, None], pl[:, None, None]
    th2, th3 = target[pl][:, None], target[pl][:, None, None]
    mx, ex_u = wl[pl, pu], ex[pl, pu]  # [P]
    wl_p, ex_p = wl[pl], ex[pl]  # [P, W]
    on_u = H[pl, :, pu]  # [P, E]
    K = max(int(on_u.sum(1).max()), 1)
    xs = np.argsort(~on_u, axis=1, kind="stable")[:, :K]  # [P, K] the experts on u first
    xok = np.take_along_axis(on_u, xs, 1)  # [P, K]
    ax, cx, lx = a[p2, xs], c[p2, xs], load[p2, xs]  # [P, K]
    Hx = H[p3, xs[:, :, None], wk]  # [P, K, W] hosts of each x
    refund = cost[p2, xs, pu[:, None]]  # [P, K] taking x off u gives back a move this plan made
    cost_w = cost[p3, xs[:, :, None], wk]  # [P, K, W]
    g_u = (group_count(p2, xs, pu[:, None]) == 1).astype(float)  # [P, K] x is its group's only replica on u
    g_w = (group_count(p3, xs[:, :, None], wk) == 0).astype(float)  # [P, K, W] x's group is not on w yet
    off_u = (excess(mx[:, None] - ax, th2) - ex_u[:, None])[:, :, None]  # [P, K, 1] u's excess change
    rv_p, rd_p = room_val[pl][:, None, :], room_dex[pl][:, None, :]  # [P, 1, W]
    cand = {}  # kind -> (value, excess change), both [P, ...]
    # move x from u to w: [P, K, W]
    d = off_u + excess(wl_p[:, None, :] + ax[:, :, None], th3) - ex_p[:, None, :]
    val = -rate * d - k * (cost_w - refund[:, :, None]) - gk * (g_w - g_u[:, :, None])
    cand["move"] = (np.where(xok[:, :, None] & ~Hx, val + rv_p, -np.inf), d + rd_p)
    # trade: move x from u to w and, in return, w's best replica z of another layer to u (see _returns):
    # no slot needed on either side, and with every slot full it relieves two (layer, worker) cells for
    # the two replicas moved where a swap relieves one. Not with groups: the returns scatter the other
    # layers' groups (on the bench's group trace, 5.05 workers visited per token instead of 4.95).
    if G is None:
        ret_val, ret_d, ret_l, ret_z = _returns(H, wl, ex, a, target, cost, rate, k, pl, pu)  # [P, W]
        cand["trade"] = (np.where(xok[:, :, None] & ~Hx, val + ret_val[:, None, :], -np.inf), d + ret_d[:, None, :])
    # add a replica of x on w: x's hosts each lose load / (c (c + 1)), w gains load / (c + 1)
    drop = lx / (cx * (cx + 1.0))
    host_d = (Hx * (excess(wl_p[:, None, :] - drop[:, :, None], th3) - ex_p[:, None, :])).sum(2)
    d = host_d[:, :, None] + excess(wl_p[:, None, :] + (lx / (cx + 1.0))[:, :, None], th3) - ex_p[:, None, :] + rd_p
    val = -rate * (d - rd_p) - k * cost_w - gk * g_w + rv_p  # rv_p counts the eviction's excess change
    cand["add"] = (np.where(xok[:, :, None] & ~Hx & (cx < W)[:, :, None], val, -np.inf), d)
    # replace: add x on w in place of the layer's own best spare replica y there (a cooled expert's spare
    # goes to a hot one), when no worker hosts both x and y, so that the two changes add up exactly
    y = ev_y[pl]  # [P, W] the layer's best spare on each worker
    ay_ = a[p2, y]
    y_rest = ev_dex[pl] - (excess(wl_p - ay_, th2) - ex_p)  # [P, W] what y's other hosts add to the excess
    d = (host_d[:, :, None] + excess(wl_p[:, None, :] + (lx / (cx + 1.0))[:, :, None] - ay_[:, None, :], th3)
         - ex_p[:, None, :] + y_rest[:, None, :])
    shared = np.einsum("pkv,pwv->pkw", Hx.astype(np.int32), H[p2, y].astype(np.int32)) > 0  # [P, K, W]
    ok = (xok[:, :, None] & ~Hx & (cx < W)[:, :, None] & np.isfinite(ev_val[pl])[:, None, :]
          & (y[:, None, :] != xs[:, :, None]) & ~shared)
    val = (-rate * d - k * (cost_w - cost[p2, y, wk][:, None, :]) - gk * g_w
           + gk * (group_count(p2, y, wk) == 1)[:, None, :])
    cand["replace"] = (np.where(ok, val, -np.inf), d)
    # remove x's replica on u: [P, K]
    rise = excess(wl_p[:, None, :] + (lx / np.maximum(cx * (cx - 1), 1))[:, :, None], th3) - ex_p[:, None, :]
    d = (Hx * rise).sum(2) - np.take_along_axis(rise, np.broadcast_to(pu[:, None, None], (P, K, 1)), 2)[:, :, 0] \
        + off_u[:, :, 0]
    val = -rate * d + k * refund + gk * g_u
    cand["remove"] = (np.where(xok & (cx > 1), val, -np.inf), d)
    # swap x on u with y on w, w among the layer's lightest workers: [P, K, T, J] over the J replicas on w
    T = min(SWAP_WORKERS, W)
    light = np.argsort(wl_p, axis=1, kind="stable")[:, :T]  # [P, T]
    ys = _members(H[p2, :, light])  # [P, T, J] the experts on each light worker, -1 padded
    yok = ys >= 0
    ys = np.maximum(ys, 0)
    ay = a[p3, ys]  # [P, T, J]
    wl_w, ex_w = np.take_along_axis(wl_p, light, 1), np.take_along_axis(ex_p, light, 1)  # [P, T]
    s4 = lambda v: v[:, None, :, None]  # noqa: E731  [P, T] -> [P, 1, T, 1]
    ax4, ay4 = ax[:, :, None, None], ay[:, None, :, :]
    d = (excess(mx[:, None, None, None] - ax4 + ay4, th3[..., None]) - ex_u[:, None, None, None]
         + excess(s4(wl_w) + ax4 - ay4, th3[..., None]) - s4(ex_w))
    lw4 = light[:, None, :, None]
    dm = (cost[pl[:, None, None, None], xs[:, :, None, None], lw4] + cost[p3, ys, pu[:, None, None]][:, None]
          - refund[:, :, None, None] - cost[p3, ys, light[:, :, None]][:, None])
    ok = (xok[:, :, None, None] & yok[:, None] & ~H[p3, ys, pu[:, None, None]][:, None]
          & ~H[pl[:, None, None, None], xs[:, :, None, None], lw4])
    val = -rate * d - k * dm
    if G is not None:  # x's group gains w and may lose u; y's gains u and may lose w; same group: 0
        gxx, gyy = gx[xs][:, :, None, None], gx[ys][:, None]  # [P, K, 1, 1], [P, 1, T, J]
        P4 = pl[:, None, None, None]
        ds = ((G[P4, gxx, lw4] == 0).astype(float) - (G[P4, gxx, pu[:, None, None, None]] == 1)
              + (G[P4, gyy, pu[:, None, None, None]] == 0) - (G[P4, gyy, lw4] == 1))
        val = val - gk * np.where(gxx == gyy, 0.0, ds)
    cand["swap"] = (np.where(ok, val, -np.inf), d)

    # per source the best kind whose value is positive and which does not raise the total excess
    kinds = list(cand)
    flat = [np.where(dex.reshape(P, -1) <= 1e-9, v.reshape(P, -1), -np.inf) for v, dex in cand.values()]
    top = np.stack([f.max(1) for f in flat])  # [kinds, P]
    out = []
    for i in np.flatnonzero(top.max(0) > 1e-12):
        kind = int(top[:, i].argmax())
        idx = np.unravel_index(int(flat[kind][i].argmax()), cand[kinds[kind]][0].shape[1:])
        l, u, x = int(pl[i]), int(pu[i]), int(xs[i, idx[0]])
        if kinds[kind] == "swap":
            w, y = int(light[i, idx[1]]), int(ys[i, idx[1], idx[2]])
            changes = [((l, x, u), False), ((l, x, w), True), ((l, y, w), False), ((l, y, u), True)]
        elif kinds[kind] == "trade":
            w = int(idx[1])
            lz, z = int(ret_l[i, w]), int(ret_z[i, w])
            changes = [((l, x, u), False), ((l, x, w), True), ((lz, z, w), False), ((lz, z, u), True)]
        elif kinds[kind] == "remove":
            changes = [((l, x, u), False)]
        elif kinds[kind] == "replace":
            w = int(idx[1])
            changes = [((l, x, w), True), ((l, int(ev_y[l, w]), w), False)]
        else:
            w = int(idx[1])
            changes = [((l, x, w), True)] + ([((l, x, u), False)] if kinds[kind] == "move" else [])
            if not free[w]:
                lv = int(ev_l[l, w])
                changes.append(((lv, int(ev_y[lv, w]), w), False))
        cells = {(l, u)} | {(ln, wn) for (ln, _, wn), _ in changes}
        # add and remove change x's tokens per replica, and an eviction y's: every host of theirs is touched
        for (ln, e, _), _ in changes if kinds[kind] not in ("swap", "trade") else ():
            cells |= {(ln, int(wn)) for wn in np.flatnonzero(H[ln, e])}
        out.append((float(top[kind, i]), cells, changes))
    return sorted(out, key=lambda t: -t[0]), used


def _returns(H, wl, ex, a, target, cost, rate, k, pl, pu):
    """For each source (pl, pu) and worker w, the best replica to move from w back to pu in another layer,
    as a trade's second half: ([P, W] value, [P, W] excess change, [P, W] its layer, [P, W] its expert).

    Candidates are limited to keep this O(sources x workers): on each w the RETURN_LAYERS layers where w
    is furthest over the target, and in each the replica that relieves w most at the least load for pu,
    the smallest one at least w's excess there (taking it clears the excess), else the largest. A return
    to a layer where pu is near its own target costs pu's rise, which the value counts.
    """
    L, E, W = H.shape
    R = min(RETURN_LAYERS, L)
    wk = np.arange(W)[None, :]
    lr = np.argsort(-ex, axis=0, kind="stable")[:R]  # [R, W] the layers where each worker is furthest over
    on = H[lr, :, wk]  # [R, W, E] w's replicas in those layers
    a_r = a[lr]  # [R, W, E] tokens per replica
    ex_r = ex[lr, wk]  # [R, W]
    clears = on & (a_r >= ex_r[:, :, None])
    zs = np.where(clears.any(2), np.where(clears, a_r, np.inf).argmin(2),
                  np.where(on, a_r, -np.inf).argmax(2))  # [R, W] the candidate of each cell
    ok_cell = on.any(2)  # a worker may hold none of a layer
    a_z = a[lr, zs]  # [R, W]
    relief = np.maximum(wl[lr, wk] - a_z - target[lr], 0) - ex_r  # [R, W] w's excess change, <= 0
    u3 = pu[:, None, None]  # [P, 1, 1]
    rise = np.maximum(wl[lr[None], u3] + a_z[None] - target[lr][None], 0) - ex[lr[None], u3]  # [P, R, W]
    d = relief[None] + rise
    val = -rate * d - k * (cost[lr[None], zs[None], u3] - cost[lr, zs, wk][None])
    ok = ok_cell[None] & ~H[lr[None], zs[None], u3] & (lr[None] != pl[:, None, None]) & (wk[None] != u3)
    val = np.where(ok, val, -np.inf)
    best = val.argmax(1)  # [P, W] which of the R layers
    pick = lambda v: np.take_along_axis(np.broadcast_to(v, val.shape), best[:, None, :], 1)[:, 0]  # noqa: E731
    return pick(val), pick(d), pick(lr[None]), pick(zs[None])


def _members(M: np.ndarray) -> np.ndarray:
    """[..., E] mask -> [..., J] the indices set in each row, ascending, padded with -1."""
    rows = M.reshape(-1, M.shape[-1])
    r, e = _nonzero(np.ascontiguousarray(rows))
    n = np.bincount(r, minlength=rows.shape[0])
    out = np.full((rows.shape[0], max(int(n.max(initial=0)), 1)), -1)
    out[r, np.arange(r.size) - np.repeat(np.cumsum(n) - n, n)] = e
    return out.reshape(M.shape[:-1] + (-1,))


def _nonzero(M: np.ndarray) -> tuple[np.ndarray, ...]:
    """np.nonzero of a C-contiguous array, through its flat view: several times faster for 3-d masks."""
    return np.unravel_index(np.flatnonzero(M), M.shape)


# --- failure domains ------------------------------------------------------------------------------
# A failure domain is what one fault takes down at once: a Ray node (a host, a pod). Replicas exist for
# load, but they are also the only thing that lets a request survive the loss of its expert's worker
# (dispatch fails over to another replica), so a replicated expert should not have all its copies on one
# node. Logical experts with a single replica cannot be protected this way; the controller re-creates them.


def _domain_codes(worker_ids: list[int], domains: Mapping[int, str]) -> np.ndarray:
    """[W] small ints, one per distinct domain; a worker `domains` does not name gets a domain of its own."""
    names = [domains.get(wid, ("own", wid)) for wid in worker_ids]
    codes = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return np.array([codes[n] for n in names], dtype=np.int64)


def _one_domain(H: np.ndarray, dom: np.ndarray) -> np.ndarray:
    """[L, E] replicated logical experts whose replicas all sit in one domain (False everywhere when the
    workers span a single domain: there is nowhere else to go)."""
    if np.unique(dom).size < 2:
        return np.zeros(H.shape[:2], dtype=bool)
    spans = sum(H[:, :, dom == d].any(2).astype(np.int64) for d in np.unique(dom))  # [L, E] domains hosting it
    return (H.sum(2) >= 2) & (spans == 1)


def experts_on_one_domain(plan: PlacementPlan, domains: Mapping[int, str]) -> list[Logical]:
    """Replicated logical experts that one domain's loss would leave without a copy."""
    ids = [w.worker_id for w in plan.workers]
    H = _hosts(plan, ids)
    return [(plan.moe_layers[l], int(e)) for l, e in zip(*np.nonzero(_one_domain(H, _domain_codes(ids, domains))))]


def spread_over_domains(new: PlacementPlan, inp: PlannerInput) -> PlacementPlan:
    """`new` (a policy's plan for `inp`) with every replicated logical expert on at least two domains where a
    move can do it; the current plan when the result is the current plan again.

    For each logical expert whose replicas share one domain, heaviest first, one of its replicas goes to a
    worker of another domain: into a free slot, or traded for a replica of any logical expert on that worker
    that the source does not host and that is not left on one domain by the trade. Replica counts never
    change, so each replica's tokens stay load / replicas and every layer's mean tokens per worker stays
    put: balancedness (sum of means / sum of maxima) falls exactly as much as the moves raise the sum of the
    layers' maxima. The move that raises it least wins, then the one loading fewer replicas the current
    plan does not already hold (bytes moved). `moe-serve bench scaling` reports the price at DeepSeek-V3's
    shape. An expert with no such move (every worker elsewhere full of replicas it cannot trade) stays."""
    assert inp.domains is not None
    p = _Problem.of(inp)
    H = _hosts(new, p.worker_ids)  # [L, E, W]
    dom = _domain_codes(p.worker_ids, inp.domains)  # [W]
    todo = _one_domain(H, dom)
    if not todo.any():
        return new
    L, E, W = H.shape
    count = H.sum(2)  # [L, E] replicas per logical expert: no move below changes it
    t = p.load / np.maximum(count, 1)  # [L, E] tokens per replica
    wl = np.einsum("lew,le->lw", H, t)  # [L, W] tokens per worker
    used = H.sum((0, 1))  # [W] slots taken
    fresh = ~p.orig  # [L, E, W] a replica placed there must be loaded (bytes moved)
    D = np.stack([H[:, :, dom == d].sum(2) for d in range(int(dom.max()) + 1)], 2)  # [L, E, domains]
    for l, e in np.argwhere(todo)[np.argsort(-t[todo], kind="stable")]:
        if (D[l, e] > 0).sum() > 1:
            continue  # an earlier trade already spread it
        peak = wl.max(1)  # [L]
        top = np.argsort(-wl, 1, kind="stable")[:, :3]  # [L, <=3] the busiest workers of each layer

        def rest(layers, w, ds):  # max tokens in each layer over the workers other than w and ds
            out = np.full(np.broadcast(layers, ds).shape, -np.inf)
            for r in range(top.shape[1] - 1, -1, -1):
                i = top[layers, r]
                out = np.where((i != w) & (i != ds), wl[layers, i], out)
            return out

        best = None  # (rise of the sum of layer maxima, replicas loaded, source, destination, (layer, expert) or None)
        # Trades within layer l first; with every layer only when none there keeps the maxima (a cross-layer
        # trade is rarely needed and costs a scan of the whole plan per source).
        for wide in (False, True):
            if wide and best is not None and best[0] <= 0:
                break
            for w in np.flatnonzero(H[l, e]):
                dests = np.flatnonzero((dom != dom[w]) & ~H[l, e])
                free = dests[used[dests] < p.slots]
                if free.size and not wide:  # into a free slot: only layer l changes
                    rise = np.maximum(rest(l, w, free), np.maximum(wl[l, w] - t[l, e], wl[l, free] + t[l, e])) \
                        - peak[l]
                    i = int(np.lexsort((fresh[l, e, free], rise))[0])
                    move = (float(rise[i]), int(fresh[l, e, free[i]]), int(w), int(free[i]), None)
                    best = move if best is None or move[:2] < best[:2] else best
                # trades: replica (xl, x) on destination d comes to w, and (l, e) goes to d
                scope = np.flatnonzero(np.arange(L) != l) if wide else np.array([l])
                li, xs, di = _nonzero(np.ascontiguousarray(H[scope][:, :, dests] & ~H[scope, :, w][:, :, None]))
                ls, d = scope[li], dests[di]
                spans = D[ls, xs].astype(bool).sum(1) - (D[ls, xs, dom[d]] == 1) + (D[ls, xs, dom[w]] == 0)
                keep = (count[ls, xs] == 1) | (spans >= 2)  # the traded expert is not left on one domain
                ls, xs, d = ls[keep], xs[keep], d[keep]
                if not ls.size:
                    continue
                same = ls == l
                dt = t[l, e] - np.where(same, t[ls, xs], 0.0)  # tokens layer l moves from w to d
                rise = np.maximum(rest(l, w, d), np.maximum(wl[l, w] - dt, wl[l, d] + dt)) - peak[l]
                other = np.maximum(rest(ls, w, d), np.maximum(wl[ls, w] + t[ls, xs], wl[ls, d] - t[ls, xs])) - peak[ls]
                rise = rise + np.where(same, 0.0, other)
                loads = fresh[l, e, d].astype(np.int64) + fresh[ls, xs, w]
                i = int(np.lexsort((loads, rise))[0])
                move = (float(rise[i]), int(loads[i]), int(w), int(d[i]), (int(ls[i]), int(xs[i])))
                best = move if best is None or move[:2] < best[:2] else best
        if best is None:
            continue
        _, _, w, d, traded = best
        moves = [(l, e, w, d)] + ([(*traded, d, w)] if traded else [])
        for ml, me, src, dst in moves:
            H[ml, me, src], H[ml, me, dst] = False, True
            wl[ml, src] -= t[ml, me]
            wl[ml, dst] += t[ml, me]
            D[ml, me, dom[src]] -= 1
            D[ml, me, dom[dst]] += 1
            used[src] -= 1
            used[dst] += 1
    return p.to_plan(H)


# --- registry --------------------------------------------------------------------------------------

Planner = Callable[[PlannerInput], PlacementPlan]
PLANNERS: dict[str, Planner] = {"eplb": eplb_plan, "migration_aware": migration_aware_plan}


def plan(policy_name: str, inp: PlannerInput) -> PlacementPlan:
    """The policy's plan, spread over failure domains when `inp.domains` names them."""
    if policy_name not in PLANNERS:
        raise ValueError(f"unknown placement policy {policy_name!r}; known: {sorted(PLANNERS)}")
    new = PLANNERS[policy_name](inp)
    return new if inp.domains is None else spread_over_domains(new, inp)
