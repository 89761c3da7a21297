"""Slot-based KV cache with a fixed memory budget.

Each running sequence owns one slot: room for `max_model_len` positions of
every layer's keys and values. The number of slots follows from the memory
budget; when every slot is taken, admission waits (the scheduler's job).

Shape legend: L layers, S slots, N kv heads, M max_model_len, D head dim, T tokens, B sequences.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_model_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_slots < 1:
            raise ValueError(f"KV cache budget holds no sequence of {max_model_len} tokens; raise kv_cache_bytes")
        shape = (num_layers, num_slots, num_kv_heads, max_model_len, head_dim)  # [L, S, N, M, D]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._free = list(range(num_slots))  # min-heap: lowest slot first keeps batches contiguous
        heapq.heapify(self._free)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, max_model_len: int, head_dim: int,
                       element_size: int) -> int:
        return 2 * num_layers * num_kv_heads * max_model_len * head_dim * element_size

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
              v: torch.Tensor) -> None:
        """slots, positions [T]; k, v [T, N, D]."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `length` positions of `slots`: [B, N, length, D] each."""
        k, v = self.k[layer][:, :, :length], self.v[layer][:, :, :length]
        first = slots[0]
        if slots == list(range(first, first + len(slots))):  # contiguous: a view, no copy
            return k[first : first + len(slots)], v[first : first + len(slots)]
        index = torch.tensor(slots, device=k.device)
        return k.index_select(0, index), v.index_select(0, index)
