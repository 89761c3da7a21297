"""Sampling parameters, their validation, and the batched sampler.

Each request with a seed owns a torch.Generator, so its samples do not depend on
which other requests share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from router_service.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the top-k of one row of logits is cheap, but the wire and JSON are not

# One sampled token's alternatives: (token id, log-probability), most likely first.
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # return the chosen token's log-probability (unscaled distribution)
    top_logprobs: int = 0  # also return this many most likely tokens and their log-probabilities (needs logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("sampling.temperature", f"must be finite and >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise InvalidRequest("sampling.seed", f"must be in [-2**63, 2**64), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest("sampling.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("sampling.top_logprobs", "needs logprobs")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("sampling.stop_token_ids", f"ids {bad} are outside the vocabulary [0, {vocab_size})")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
           ) -> tuple[list[int], list[float] | None, list[TopLogprobs] | None]:
    """Next token per sequence. logits [S, V] fp32. Returns ids and, if any sequence asked, each one's
    log-prob of its token and its top_logprobs alternatives (empty lists for sequences that did not ask)."""
    if all(p.greedy for p in params):
        tokens = logits.argmax(dim=-1)  # [S]
    else:
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        for i, (p, gen) in enumerate(zip(params, generators)):
            tokens[i] = logits[i].argmax() if p.greedy else _sample_one(logits[i], p, gen)
    logprobs = top = None
    if any(p.logprobs for p in params):
        all_logprobs = torch.log_softmax(logits, dim=-1)  # [S, V]
        logprobs = all_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        k = max(p.top_logprobs for p in params)
        if k:
            values, ids = all_logprobs.topk(k, dim=-1)  # [S, k] each, most likely first
            values, ids = values.tolist(), ids.tolist()
            top = [list(zip(ids[i][:p.top_logprobs], values[i][:p.top_logprobs])) for i, p in enumerate(params)]
    return tokens.tolist(), logprobs, top


def _sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """logits [V] -> one token id, after temperature, top-k and top-p."""
    # Shift by the max first: for a tiny temperature the scaled logits would overflow to inf.
    scaled = (logits - logits.max()) / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= p.top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    probs = scaled.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
