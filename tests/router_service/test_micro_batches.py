"""Two-micro-batch overlap (EngineSettings.micro_batches = 2): same outputs, really pipelined, no deadlock.

The engine tests run two engines on one checkpoint, one unsplit and one with two micro-batches, on a
workload that mixes decodes with chunked prefills, and compare every step's logits. The pipelining
test records the order in which the model dispatches and waits per layer through a real
LocalDispatcher. The dispatch test runs ClusterDispatcher over real sockets to in-process expert
servers, with two pending dispatches whose replies overflow the sockets' buffers.
"""

from __future__ import annotations

import math

import pytest
import torch

from cluster.make_model import default_model_dir
from expert_workers.checkpoint import Checkpoint
from expert_workers.experts import ExpertGroup
from expert_workers.wire import ExpertServer
from router_service.cluster_dispatch import ClusterDispatcher
from router_service.dispatch import ExpertDispatcher, LocalDispatcher, PendingExperts
from router_service.engine import EngineSettings, load_engine
from router_service.kv_cache import KVCache
from router_service.model import ForwardBatch, SeqChunk, split_micro_batches
from router_service.placement import PlacementPlan, WorkerPlacement
from router_service.sampling import SamplingParams
from router_service.transports import SocketTransport

LOGIT_ATOL = 1e-5
CPU = torch.device("cpu")
# Lengths 1..40 with a budget of 16 tokens a step: the 20- and 40-token prompts prefill in chunks next to
# decodes of the others, and with 8 slots for 9 prompts the last one joins when the first finishes.
PROMPT_LENS = [1, 3, 7, 12, 40, 5, 2, 9, 20]
MAX_TOKENS = 6


def settings(**kw) -> EngineSettings:
    base = dict(max_model_len=128, max_num_seqs=8, max_batched_tokens=16, device="cpu", dtype="float32")
    return EngineSettings(**(base | kw))


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, min(vocab, 1000), (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_recorded(model_dir, **kw) -> tuple[list[list[int]], list[torch.Tensor], list[list[SeqChunk]]]:
    """Greedy completions of `prompts`, plus every step's logits and chunks."""
    engine = load_engine(model_dir, settings(**kw))
    logits, steps = [], []
    forward = engine.model.forward

    def recording(batch, kv):
        out = forward(batch, kv)
        logits.append(out)
        steps.append(list(batch.chunks))
        return out

    engine.model.forward = recording
    done = engine.generate(prompts(engine.spec.vocab_size), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return [c.token_ids for c in done], logits, steps


# --- the split ------------------------------------------------------------------------------------


def chunks_of(*sizes: int) -> list[SeqChunk]:
    return [SeqChunk(slot, 0, n) for slot, n in enumerate(sizes)]


def test_split_balances_whole_sequences_by_tokens():
    assert split_micro_batches(chunks_of(1, 5, 1, 1, 3)) == ([1, 3], [0, 2, 4])  # 6 tokens against 5
    assert split_micro_batches(chunks_of(*[1] * 8)) == ([0, 2, 4, 6], [1, 3, 5, 7])  # a decode batch
    assert split_micro_batches(chunks_of(100, 1, 1)) == ([0], [1, 2])  # a chunk is never split
    for sizes in [(7, 7, 2, 3, 9, 1), (1, 2, 3, 4, 5, 6, 7), (30, 1, 1, 1, 1, 1, 1, 1, 1)]:
        a, b = split_micro_batches(chunks_of(*sizes))
        assert sorted(a + b) == list(range(len(sizes))) and a == sorted(a) and b == sorted(b)
        tokens = [sum(sizes[i] for i in g) for g in (a, b)]
        assert abs(tokens[0] - tokens[1]) <= max(sizes)


def test_one_sequence_or_a_tiny_step_runs_unsplit():
    assert split_micro_batches(chunks_of(500)) is None
    assert split_micro_batches(chunks_of(3, 4)) is None  # 7 tokens
    assert split_micro_batches(chunks_of(4, 4)) is not None


def test_select_builds_the_micro_batch_as_build_would():
    chunks = [SeqChunk(0, 5, 1), SeqChunk(1, 0, 4), SeqChunk(2, 9, 1), SeqChunk(3, 3, 2)]
    ids = [10, 20, 21, 22, 23, 30, 40, 41]
    sub = ForwardBatch.build(chunks, ids, CPU).select([0, 2, 3])
    want = ForwardBatch.build([chunks[0], chunks[2], chunks[3]], [10, 30, 40, 41], CPU)
    for name in ("token_ids", "positions", "slots", "last_index", "decode_rows", "decode_mask"):
        assert torch.equal(getattr(sub, name), getattr(want, name)), name
    assert sub.prefill == want.prefill and sub.decode_slots == want.decode_slots and sub.decode_len == 10


# --- same outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v2-tiny", "mixtral-tiny", "qwen2-moe-tiny"])
def test_two_micro_batches_give_the_unsplit_outputs(moe_serve_cache, preset):
    """DeepSeek-MoE (shared experts, a dense first layer), DeepSeek-V2 (MLA, group-limited routing),
    Mixtral (GQA, no shared experts), Qwen2-MoE (gated shared expert)."""
    model_dir = default_model_dir(preset)
    tokens, logits, steps = run_recorded(model_dir, micro_batches=1)
    tokens2, logits2, steps2 = run_recorded(model_dir, micro_batches=2)
    assert tokens2 == tokens
    assert [[(c.slot, c.start, c.n) for c in s] for s in steps2] == [[(c.slot, c.start, c.n) for c in s] for s in steps]
    for i, (a, b) in enumerate(zip(logits, logits2)):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().max().item() <= LOGIT_ATOL, f"step {i}"
    # The workload did what it is for: split steps, one of them a later prefill chunk next to decodes.
    split = [s for s in steps if split_micro_batches(s) is not None]
    assert len(split) >= 4
    assert any(any(c.start > 0 and c.n > 1 for c in s) and any(c.n == 1 for c in s) for s in split)
    assert any(split_micro_batches(s) is None for s in steps)  # and the tail runs unsplit


# --- really pipelined ---------------------------------------------------------------------------------


class RecordingDispatcher(ExpertDispatcher):
    """A real dispatcher, with each dispatch and wait logged in call order as (event, layer, tokens)."""

    def __init__(self, inner: ExpertDispatcher):
        self.inner = inner
        self.events: list[tuple[str, int, int]] = []
        self.ids: list[torch.Tensor] = []  # each dispatch's topk_ids [T, K]

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        self.events.append(("dispatch", layer, hidden.shape[0]))
        self.ids.append(topk_ids)
        pending, events, T = self.inner.dispatch(layer, hidden, topk_ids, topk_weights), self.events, hidden.shape[0]

        class Recorded(PendingExperts):
            def wait(self) -> torch.Tensor:
                events.append(("wait", layer, T))
                return pending.wait()

        return Recorded()


def recorded_forward(model_dir, sizes: list[int], **kw) -> tuple[RecordingDispatcher, object, torch.Tensor]:
    """One prefill step of prompts of these sizes through the model, its dispatcher recording."""
    engine = load_engine(model_dir, settings(**kw))
    model = engine.model
    model.dispatcher = recorder = RecordingDispatcher(model.dispatcher)
    chunks = chunks_of(*sizes)
    ids = torch.arange(sum(sizes)) % 997
    kv = KVCache.for_spec(engine.spec, len(sizes), 128, model.dtype, CPU)
    return recorder, engine, model.forward(ForwardBatch.build(chunks, ids.tolist(), CPU), kv)


def test_the_other_micro_batch_dispatches_before_the_first_waits(tiny_model):
    sizes = [3, 9, 4]  # micro-batches: A = the 9-token prompt, B = the other two (7 tokens)
    recorder, engine, logits = recorded_forward(tiny_model, sizes, micro_batches=2)
    moe_layers = engine.spec.moe_layers
    assert len(moe_layers) >= 2
    A, B = 9, 7
    want = [("dispatch", moe_layers[0], A), ("dispatch", moe_layers[0], B)]
    for prev, layer in zip(moe_layers, moe_layers[1:]):
        # A finishes layer prev and sends layer `layer` while B's layer prev is still away, and vice versa.
        want += [("wait", prev, A), ("dispatch", layer, A), ("wait", prev, B), ("dispatch", layer, B)]
    want += [("wait", moe_layers[-1], A), ("wait", moe_layers[-1], B)]
    assert recorder.events == want
    for layer in moe_layers:
        ev = recorder.events
        assert ev.index(("dispatch", layer, B)) < ev.index(("wait", layer, A))

    # Unsplit: every MoE layer waits before the next dispatches, and the logits agree.
    unsplit, _, logits1 = recorded_forward(tiny_model, sizes, micro_batches=1)
    assert unsplit.events == [(e, layer, sum(sizes)) for layer in moe_layers for e in ("dispatch", "wait")]
    assert (logits - logits1).abs().max().item() <= LOGIT_ATOL


def test_switch_capacity_applies_per_micro_batch(tiny_model):
    factor, sizes = 1.0, [9, 4, 3, 6]  # micro-batches of 12 and 10 tokens
    recorder, engine, _ = recorded_forward(tiny_model, sizes, micro_batches=2, switch_capacity_factor=factor)
    E = engine.spec.moe.num_experts
    a, b = split_micro_batches(chunks_of(*sizes))
    T = [sum(sizes[i] for i in g) for g in (a, b)]
    sent = [e for e in recorder.events if e[0] == "dispatch"]
    assert len(sent) == 2 * len(engine.spec.moe_layers)
    dropped = False
    for k, ((_, _, n), ids) in enumerate(zip(sent, recorder.ids)):
        capacity = math.ceil(factor * T[k % 2] / E)  # dispatches alternate A, B
        assert ids.shape[1] == 1 and int(torch.bincount(ids[:, 0], minlength=E).max()) <= capacity
        dropped |= n < T[k % 2]
    assert dropped  # the capacity bit somewhere, so the bound above was tested


def test_load_telemetry_counts_every_micro_batch(tiny_model):
    from router_service.telemetry import LoadWindow

    totals = []
    for mb in (1, 2):
        engine = load_engine(tiny_model, settings(micro_batches=mb))
        spec = engine.spec
        engine.model.load = LoadWindow(spec.moe_layers, spec.moe.num_experts)
        engine.generate(prompts(spec.vocab_size), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        totals.append(engine.model.load.cumulative())
    assert torch.equal(totals[0], totals[1]) and int(totals[0].sum()) > 0


# --- two dispatches of one layer in flight over sockets -----------------------------------------------


class InProcessSocketTransport(SocketTransport):
    """The real socket transport, connected to expert servers in this process (no Ray to ask for endpoints)."""

    def __init__(self, servers: dict[int, ExpertServer], timeout: float):
        super().__init__(node_id="here", timeout=timeout)
        self.servers = servers

    def connect(self, workers):
        for w in workers:
            self._add(w, {"node_id": "here", "unix": self.servers[w].unix_path})


def test_two_pending_dispatches_with_replies_larger_than_the_socket_buffers(tiny_model):
    """Two workers; micro-batch B is sent while A's replies (about 0.5 MiB each) are unread. A worker writes
    its reply before it reads the next request, so sending B before collecting A would block both sides;
    the dispatcher collects A's reply first (it would otherwise fail here after the 10 s socket timeout)."""
    checkpoint = Checkpoint(tiny_model)
    spec = checkpoint.spec
    E, layer, T, K = spec.moe.num_experts, spec.moe_layers[0], 2000, spec.moe.top_k
    hosted = [{layer: [e for e in range(E) if e % 2 == w]} for w in range(2)]
    servers = {w: ExpertServer(ExpertGroup.load(checkpoint, h, torch.float32).run) for w, h in enumerate(hosted)}
    plan = PlacementPlan(1, E, (layer,), tuple(WorkerPlacement(w, f"w{w}", tuple((layer, e) for e in h[layer]))
                                               for w, h in enumerate(hosted)))
    dispatcher = ClusterDispatcher(plan, InProcessSocketTransport(servers, timeout=10.0), {0: None, 1: None},
                                   recovery_timeout=1.0)
    local = LocalDispatcher(ExpertGroup.load(checkpoint, {layer: list(range(E))}, torch.float32))
    g = torch.Generator().manual_seed(0)
    work = [(torch.randn(T, spec.hidden_size, generator=g),
             torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]),
             torch.rand(T, K, generator=g)) for _ in range(2)]
    try:
        pending = [dispatcher.dispatch(layer, *w) for w in work]  # A, then B with A's replies unread
        got = [p.wait() for p in pending]
        # A step that fails between dispatch and wait leaves replies unread; the next dispatch reads past them.
        dispatcher.dispatch(layer, *work[0])  # never waited for
        got.append(dispatcher.dispatch(layer, *work[1]).wait())
    finally:
        dispatcher.close()
        for s in servers.values():
            s.close()
    assert dispatcher.recoveries == []
    for w, out in zip([*work, work[1]], got):
        torch.testing.assert_close(out, local.dispatch(layer, *w).wait(), atol=1e-5, rtol=1e-5)
