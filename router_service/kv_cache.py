"""Slot-based KV cache with a fixed memory budget.

Each running sequence owns one slot: room for `max_model_len` positions of
every layer's cache entries. The number of slots follows from the memory
budget; when every slot is taken, admission waits (the scheduler's job).

What a token leaves per layer depends on the attention (`KVLayout.of(spec)`):
    MHA / GQA   a key and a value per kv head: k, v [L, S, N, M, D]
    MLA         the compressed latent and the shared rope key, latent ‖ rope key
                [R + Dr], as one key-only entry: k [L, S, 1, M, R + Dr], no v
                (keys and values are up-projected from the latent when attending)

Shape legend: L layers, S slots, N kv heads, M max_model_len, D head dim, T tokens, B sequences.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from expert_workers.spec import ModelSpec


@dataclass(frozen=True)
class KVLayout:
    """One token's cache entry in one layer: `heads` rows of a key part and a value part."""

    heads: int  # N; 1 for MLA
    key_dim: int  # MHA: D; MLA: kv_lora_rank + qk_rope_head_dim
    value_dim: int  # MHA: D; MLA: 0 (no value part)

    @classmethod
    def of(cls, spec: ModelSpec) -> "KVLayout":
        if spec.mla is not None:
            return cls(1, spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim, 0)
        return cls(spec.num_kv_heads, spec.head_dim, spec.head_dim)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_model_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                 value_dim: int | None = None):
        """Keys [L, S, N, M, head_dim] and values [L, S, N, M, value_dim] (default head_dim; 0: keys only)."""
        if num_slots < 1:
            raise ValueError(f"KV cache budget holds no sequence of {max_model_len} tokens; raise kv_cache_bytes")
        value_dim = head_dim if value_dim is None else value_dim
        shape = (num_layers, num_slots, num_kv_heads, max_model_len)  # [L, S, N, M]
        self.k = torch.zeros((*shape, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((*shape, value_dim), dtype=dtype, device=device) if value_dim else None
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._free = list(range(num_slots))  # min-heap: lowest slot first keeps batches contiguous
        heapq.heapify(self._free)

    @classmethod
    def for_spec(cls, spec: ModelSpec, num_slots: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "KVCache":
        """A cache in the layout the model's attention writes."""
        layout = KVLayout.of(spec)
        return cls(spec.num_layers, num_slots, layout.heads, max_model_len, layout.key_dim, dtype, device,
                   value_dim=layout.value_dim)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, max_model_len: int, head_dim: int,
                       element_size: int, value_dim: int | None = None) -> int:
        value_dim = head_dim if value_dim is None else value_dim
        return num_layers * num_kv_heads * max_model_len * (head_dim + value_dim) * element_size

    @classmethod
    def slot_bytes(cls, spec: ModelSpec, max_model_len: int, element_size: int) -> int:
        """Bytes one sequence's slot takes for this model (what a memory budget is divided by)."""
        layout = KVLayout.of(spec)
        return cls.bytes_per_slot(spec.num_layers, layout.heads, max_model_len, layout.key_dim, element_size,
                                  layout.value_dim)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor | None = None) -> None:
        """slots, positions [T]; k [T, N, key_dim], v [T, N, value_dim] (None for a key-only layout)."""
        self.k[layer][slots, :, positions] = k
        if self.v is not None:
            self.v[layer][slots, :, positions] = v

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys and values of the first `length` positions of `slots`: [B, N, length, dim] each (no values: None)."""
        k = self.k[layer][:, :, :length]
        v = self.v[layer][:, :, :length] if self.v is not None else None
        first = slots[0]
        if slots == list(range(first, first + len(slots))):  # contiguous: a view, no copy
            sel = slice(first, first + len(slots))
            return k[sel], (v[sel] if v is not None else None)
        index = torch.tensor(slots, device=k.device)
        return k.index_select(0, index), (v.index_select(0, index) if v is not None else None)
