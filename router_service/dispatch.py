"""The dispatch interface: how the router's MoE layers reach their routed experts.

The model calls `dispatch` once per MoE layer per step with the gate's choices
and gets back a handle; it computes the shared experts meanwhile and then
`wait`s for the weighted sum of routed outputs. Implementations:
    LocalDispatcher   every routed expert in this process (the single-process engine)
    (cluster)         one message per expert worker that has tokens (router_service.cluster_dispatch)

Shape legend: T tokens, H hidden, K routed experts per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from expert_workers.experts import ExpertGroup


class PendingExperts(ABC):
    """Routed outputs on their way back; `wait` returns [T, H].

    `experts` [T*K]: the logical expert of every pair dispatched, as the dispatcher holds them (on the
    host for a cluster, which copied them there to plan), so that load telemetry needs no copy of its own."""

    experts: torch.Tensor

    @abstractmethod
    def wait(self) -> torch.Tensor: ...


class ExpertDispatcher(ABC):
    @abstractmethod
    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> PendingExperts:
        """hidden [T, H]; topk_ids, topk_weights [T, K] (weights already scaled and normalised)."""

    def begin_step(self) -> None:
        """Called by the engine before each step: the one point where a new placement may take effect."""

    def close(self) -> None:
        """Release transport resources; the default has none."""


def to_pairs(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flatten top-k choices [T, K] into (token, expert, weight) pairs [T*K]."""
    T, K = topk_ids.shape
    token = torch.arange(T, device=topk_ids.device).repeat_interleave(K)  # [P]
    return token, topk_ids.reshape(-1), topk_weights.reshape(-1)


class _Deferred(PendingExperts):
    def __init__(self, fn, experts: torch.Tensor):
        self._fn, self.experts = fn, experts

    def wait(self) -> torch.Tensor:
        return self._fn()


class LocalDispatcher(ExpertDispatcher):
    """Runs routed experts in this process from one ExpertGroup that hosts them all."""

    def __init__(self, experts: ExpertGroup):
        self.experts = experts

    def dispatch(self, layer, hidden, topk_ids, topk_weights) -> PendingExperts:
        # Deferred so that the caller's shared-expert compute comes first, as in the cluster.
        token, expert, weight = to_pairs(topk_ids, topk_weights)  # [P]
        return _Deferred(lambda: self.experts.run(layer, hidden, token, expert, weight), expert)
