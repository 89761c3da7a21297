"""The engine: continuous batching over one model, one step at a time.

Each `step` admits waiting requests while KV slots and the token budget allow,
runs one forward pass over a flat batch (decode tokens of running sequences
plus prefill chunks of new ones), samples, detokenises and reports what each
request gained. Requests join and leave between steps.

Threads: `step` is called from one thread only (the engine loop); `add_request`
and `abort` may be called from any thread and touch only `_waiting` and
`_aborts`, under `_lock`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from expert_workers.checkpoint import Checkpoint, resolve_dtype
from expert_workers.experts import ExpertGroup
from router_service.dispatch import ExpertDispatcher, LocalDispatcher
from router_service.errors import InvalidRequest, QueueFull
from router_service.kv_cache import KVCache
from router_service.model import MICRO_BATCH_MIN_TOKENS, CausalLM, ForwardBatch, SeqChunk
from router_service.sampling import SamplingParams, TopLogprobs, make_generator, sample
from router_service.tokenizer import TextStream, Tokenizer

FinishReason = Literal["length", "stop", "eos", "cancelled"]


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(32, ge=1, description="Most sequences decoding at once (KV slots, if the budget allows).")
    max_model_len: int | None = Field(
        None, ge=2, description="Context length (prompt + generated). Default: the model's, capped at 4096.")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV cache memory budget in bytes; slots = budget / bytes per slot. Default: max_num_seqs slots.")
    max_batched_tokens: int = Field(2048, ge=1, description="Most tokens in one forward pass; longer prompts prefill in chunks.")
    max_queue: int = Field(256, ge=0, description="Most requests waiting for admission; beyond it new ones are refused.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype. auto: the checkpoint's dtype on GPU, and on CPUs with native bf16 "
        "matmuls (AVX512-BF16 / AMX) for a bf16 checkpoint; float32 otherwise.")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")
    routing_bias: dict[int, float] = Field(
        default_factory=dict, description="Added to the gate logits of these expert ids in every MoE layer: "
        "skews routing load for tests and demos of rebalancing (changes outputs; empty in production).")
    switch_capacity_factor: float | None = Field(
        None, gt=0, description="Switch Transformer routing instead of the model's gate: top-1 weighted by the "
        "router probability, each expert taking at most ceil(factor * tokens in the step / experts) tokens, in "
        "token order; the rest skip the experts (routed output zero). An approximation for throughput: it "
        "changes outputs, and a sequence's output then depends on the batch it runs in. None (default): off.")
    # An int in 1..2 rather than Literal[1, 2]: a Literal refuses the string "2" of MOE_SERVE_ENGINE__MICRO_BATCHES.
    micro_batches: int = Field(
        1, ge=1, le=2, description="2: two-micro-batch overlap, as DeepSeek serves. Each step's sequences split "
        "into two micro-batches (whole sequences, balanced by token count) that take turns layer by layer: while "
        "one's routed tokens are on the expert workers, the router computes the other's attention, gate and shared "
        f"experts. Steps of one sequence or under {MICRO_BATCH_MIN_TOKENS} tokens run unsplit. Outputs equal 1's "
        "up to float rounding; with switch_capacity_factor the capacity is per micro-batch. 1 (default): each MoE "
        "layer's routed experts overlap only its shared experts.")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return resolve_dtype(self.dtype)
        dtype = resolve_dtype(checkpoint_dtype)
        if device.type == "cpu" and not (dtype == torch.bfloat16 and cpu_has_native_bf16()):
            # Without native 16-bit matmuls a CPU converts every weight on the fly: fp32 is faster there.
            return torch.float32
        return dtype


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 matmuls natively, reading half the bytes of fp32 (decode is
    bound by reading weights, so a bf16 checkpoint computed in bf16 is the fast path, as on GPU)."""
    import torch.cpu

    # Private helpers (torch's compiler uses them), hence the getattr for torch versions without them;
    # oneDNN's public check also says yes on plain AVX512 CPUs, where bf16 is emulated and slower than fp32.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class StepOutput:
    """What one request gained in one step (a stream message)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str  # new text since the last output
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0  # arrival to admission
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished request, as the offline `generate` returns it."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


class _Sequence:
    """Engine-side state of one admitted request."""

    def __init__(self, request: Request, arrival: float, stream: TextStream | None, device: torch.device):
        self.request = request
        self.params = request.params
        self.token_ids = list(request.prompt_ids)  # prompt + generated
        self.num_prompt = len(request.prompt_ids)
        self.num_cached = 0  # tokens whose keys and values are in the KV cache
        self.slot: int | None = None
        self.arrival = arrival
        self.admitted = 0.0
        self.generator = make_generator(self.params.seed, device)
        self.stream = stream
        self.text = ""  # generated text so far (stop strings cut it)
        self.emitted = 0  # characters of `text` already reported
        self.pending_tokens: list[int] = []
        self.pending_logprobs: list[float] = []
        self.pending_top_logprobs: list[TopLogprobs] = []

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, settings: EngineSettings,
                 max_model_len: int, num_slots: int):
        self.model = model
        self.spec = model.spec
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        spec = model.spec
        self.kv = KVCache.for_spec(spec, num_slots, max_model_len, model.dtype, model.device)
        eos = set(spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Request, float]] = deque()  # guarded by _lock
        self._aborts: set[str] = set()  # guarded by _lock
        self._live_ids: set[str] = set()  # guarded by _lock: waiting or running
        self._running: list[_Sequence] = []  # engine thread only
        self._ids = itertools.count()
        self.steps = 0

    # --- any thread ----------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise InvalidRequest naming the field if this request can never be served."""
        ids, p = request.prompt_ids, request.params
        if not ids:
            raise InvalidRequest("prompt", "is empty")
        V = self.spec.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < V:
                raise InvalidRequest("prompt.token_ids", f"id {t} at position {i} is outside the vocabulary [0, {V})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise InvalidRequest(
                "prompt", f"has {len(ids)} tokens; the context holds {self.max_model_len} including at least one generated")
        p.validate(V)
        if p.max_tokens > room:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"{p.max_tokens} plus the prompt's {len(ids)} tokens exceeds the context of {self.max_model_len}")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        with self._lock:
            if not request.request_id:
                request.request_id = f"req-{next(self._ids)}"
            if request.request_id in self._live_ids:
                raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting (max_queue {self.settings.max_queue})")
            self._live_ids.add(request.request_id)
            self._waiting.append((request, time.monotonic()))

    def abort(self, request_id: str) -> None:
        """Cancel a request; it leaves at the next step boundary and frees its KV slot."""
        with self._lock:
            if request_id in self._live_ids:
                self._aborts.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._aborts)

    # --- engine thread ----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        prof = self.model.profile
        with prof("scheduling"):
            outputs = self._apply_aborts()
            self.model.dispatcher.begin_step()
            chunks = self._schedule()
        if not chunks:
            return outputs
        with prof("scheduling"):
            token_ids = [t for seq, c in chunks for t in seq.token_ids[c.start : c.start + c.n]]
            batch = ForwardBatch.build([c for _, c in chunks], token_ids, self.model.device)
        logits = self.model.forward(batch, self.kv)  # [S, V]
        self.steps += 1
        prof.steps += prof.enabled
        ready = []  # rows whose sequence has all its tokens cached: sample a next token
        for row, (seq, c) in enumerate(chunks):
            seq.num_cached += c.n
            if seq.num_cached == len(seq.token_ids):
                ready.append(row)
        if ready:
            seqs = [chunks[r][0] for r in ready]
            with prof("sampling"):
                tokens, logprobs, top = sample(logits[ready], [s.params for s in seqs], [s.generator for s in seqs])
            with prof("detokenize"):
                for i, seq in enumerate(seqs):
                    outputs.append(self._append(seq, tokens[i], None if logprobs is None else logprobs[i],
                                                None if top is None else top[i]))
        self._running = [s for s in self._running if s.slot is not None]
        return outputs

    def _schedule(self) -> list[tuple[_Sequence, SeqChunk]]:
        """This step's chunks: running sequences first, then admissions while slots and budget allow."""
        budget = self.settings.max_batched_tokens
        chunks: list[tuple[_Sequence, SeqChunk]] = []
        for seq in self._running:
            if budget == 0:
                break
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            chunks.append((seq, SeqChunk(seq.slot, seq.num_cached, n)))
            budget -= n
        while budget > 0 and len(self._running) < self.settings.max_num_seqs and self.kv.free_slots:
            with self._lock:
                if not self._waiting:
                    break
                request, arrival = self._waiting.popleft()
            seq = _Sequence(request, arrival, self.tokenizer.stream() if self.tokenizer else None, self.model.device)
            seq.slot, seq.admitted = self.kv.allocate(), time.monotonic()
            self._running.append(seq)
            n = min(seq.num_prompt, budget)
            chunks.append((seq, SeqChunk(seq.slot, 0, n)))
            budget -= n
        return chunks

    def _append(self, seq: _Sequence, token: int, logprob: float | None, top: TopLogprobs | None) -> StepOutput:
        """Add a sampled token; decide whether the sequence ends; build its output."""
        p = seq.params
        seq.token_ids.append(token)
        seq.pending_tokens.append(token)
        if logprob is not None and p.logprobs:
            seq.pending_logprobs.append(logprob)
            if p.top_logprobs:
                seq.pending_top_logprobs.append(top)
        reason: FinishReason | None = None
        if seq.stream is not None:
            seq.text += seq.stream.step(token)
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "eos"
        elif token in p.stop_token_ids:
            reason = "stop"
        elif p.stop and (cut := _find_stop(seq.text, p.stop, seq.emitted)) is not None:
            seq.text, reason = seq.text[:cut], "stop"
        elif seq.num_generated >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        # Hold back text that could be the start of a stop string until it is decided.
        hold = 0 if reason or not p.stop else max(len(s) for s in p.stop) - 1
        end = max(seq.emitted, len(seq.text) - hold)
        out = StepOutput(seq.request.request_id, seq.pending_tokens, seq.pending_logprobs, seq.text[seq.emitted:end],
                         reason, seq.num_prompt, seq.num_generated, seq.admitted - seq.arrival,
                         seq.pending_top_logprobs)
        seq.emitted, seq.pending_tokens, seq.pending_logprobs, seq.pending_top_logprobs = end, [], [], []
        if reason is not None:
            self._finish(seq)
        return out

    def _finish(self, seq: _Sequence) -> None:
        self.kv.release(seq.slot)
        seq.slot = None
        with self._lock:
            self._live_ids.discard(seq.request.request_id)
            self._aborts.discard(seq.request.request_id)

    def idle(self) -> None:
        """Called by the engine loop when there is no work: a queued plan switch needs no step."""
        self.model.dispatcher.begin_step()

    def fail_running(self) -> list[str]:
        """After a failed step: drop every running sequence (their state is unknown); waiting ones stay."""
        failed = [s.request.request_id for s in self._running]
        for seq in self._running:
            self._finish(seq)
        self._running = []
        return failed

    def _apply_aborts(self) -> list[StepOutput]:
        with self._lock:
            if not self._aborts:
                return []
            aborts, self._aborts = self._aborts, set()
            cancelled = [r for r, _ in self._waiting if r.request_id in aborts]
            self._waiting = deque((r, t) for r, t in self._waiting if r.request_id not in aborts)
            self._live_ids -= {r.request_id for r in cancelled}
        outputs = [StepOutput(r.request_id, [], [], "", "cancelled", len(r.prompt_ids), 0) for r in cancelled]
        for seq in [s for s in self._running if s.request.request_id in aborts]:
            outputs.append(StepOutput(seq.request.request_id, [], [], "", "cancelled", seq.num_prompt,
                                      seq.num_generated))
            self._finish(seq)
        self._running = [s for s in self._running if s.slot is not None]
        return outputs

    # --- offline use ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[Completion]:
        """Run prompts to completion (all submitted at once, batched continuously); results in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order = []
        for ids, p in zip(prompts, plist):
            request = Request("", list(ids), p)
            self.add_request(request)
            order.append(request.request_id)
            results[request.request_id] = Completion(request.request_id, list(ids))
        pending = set(order)
        while pending:
            for out in self.step():
                c = results[out.request_id]
                c.token_ids += out.token_ids
                c.logprobs += out.logprobs
                c.top_logprobs += out.top_logprobs
                c.text += out.text
                if out.finished:
                    c.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
        return [results[r] for r in order]


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop string starts in the not-yet-emitted tail of `text`, if any."""
    longest = max(len(s) for s in stops)
    start = max(0, emitted - longest)  # a stop may straddle the held-back boundary
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def load_engine(model_dir: str | Path, settings: EngineSettings | None = None,
                dispatcher: ExpertDispatcher | None = None) -> Engine:
    """Build an engine on a checkpoint. Without a dispatcher every routed expert is local."""
    settings = settings or EngineSettings()
    checkpoint = Checkpoint(model_dir)
    spec = checkpoint.spec
    device = settings.torch_device()
    dtype = settings.torch_dtype(spec.dtype, device)
    limit = min(spec.max_position_embeddings, spec.sliding_window or spec.max_position_embeddings)
    if settings.max_model_len is not None and settings.max_model_len > limit:
        raise ValueError(f"max_model_len {settings.max_model_len} exceeds the model's context of {limit}")
    max_model_len = settings.max_model_len or min(limit, 4096)
    per_slot = KVCache.slot_bytes(spec, max_model_len, torch.empty((), dtype=dtype).element_size())
    slots = settings.max_num_seqs
    if settings.kv_cache_bytes is not None:
        slots = min(slots, settings.kv_cache_bytes // per_slot)
    if dispatcher is None:
        hosted = {layer: list(range(spec.moe.num_experts)) for layer in spec.moe_layers}
        dispatcher = LocalDispatcher(ExpertGroup.load(checkpoint, hosted, dtype, device))
    model = CausalLM.load(checkpoint, dispatcher, dtype, device, max_model_len)
    if settings.routing_bias:
        model.set_routing_bias(settings.routing_bias)
    if settings.switch_capacity_factor is not None:
        model.set_switch_capacity(settings.switch_capacity_factor)
    model.micro_batches = settings.micro_batches
    return Engine(model, Tokenizer.from_model_dir(model_dir), settings, max_model_len, slots)
