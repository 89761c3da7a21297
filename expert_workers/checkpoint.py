"""Selective, memory-mapped reading of Hugging Face checkpoints.

A checkpoint directory holds `config.json`, one `model.safetensors` or several
shards with `model.safetensors.index.json`, and usually `tokenizer.json`.
safetensors memory-maps each file, so a process touches only the bytes of the
tensors it asks for: the router never reads a routed expert, and an expert
worker reads only the (layer, expert) replicas it hosts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from expert_workers.spec import ModelSpec, load_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A missing or malformed tensor; the message names the tensor and the file."""


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


class Checkpoint:
    """Index of one checkpoint directory; reads tensors by name on demand."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec | None = None):
        self.dir = Path(model_dir)
        self.spec = spec or load_spec(self.dir)
        self.weight_map = self._read_index()  # tensor name -> file name
        self._handles: dict[str, object] = {}

    def _read_index(self) -> dict[str, str]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: malformed index ({err!r})") from None
        single = self.dir / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        with safe_open(single, "pt") as f:
            return {name: single.name for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            index = "model.safetensors.index.json" if (self.dir / "model.safetensors.index.json").exists() else "model.safetensors"
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint ('{index}' in {self.dir})")
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.dir / file
            try:
                self._handles[file] = safe_open(path, "pt")
            except Exception as err:  # safetensors raises several kinds for a bad file
                raise CheckpointError(f"tensor '{name}': cannot open '{path}' ({err})") from None
        return self._handles[file], file

    def read(self, name: str, shape: Iterable[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked against the expected shape and cast to `dtype`."""
        handle, file = self._file(name)
        try:
            tensor = handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"tensor '{name}' in '{file}' cannot be read ({err})") from None
        self._check(name, file, tensor.shape, shape)
        return tensor.to(dtype) if dtype is not None else tensor

    def read_rows(self, name: str, rows: list[int], shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        """Selected slices along dim 0 of a stacked tensor (fused experts), reading only those rows."""
        handle, file = self._file(name)
        try:
            sl = handle.get_slice(name)
            self._check(name, file, torch.Size(sl.get_shape()), shape)
            return torch.stack([sl[r : r + 1][0] for r in rows]).to(dtype)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"tensor '{name}' in '{file}' cannot be read ({err})") from None

    @staticmethod
    def _check(name: str, file: str, actual: torch.Size, expected: Iterable[int] | None) -> None:
        if expected is not None and tuple(actual) != tuple(expected):
            raise CheckpointError(
                f"tensor '{name}' in '{file}' has shape {tuple(actual)}, expected {tuple(expected)}"
            )

    # --- routed experts -----------------------------------------------------------------

    def expert_layout(self, layer: int) -> str:
        """'per_expert' or 'fused', by which names the checkpoint holds for this layer."""
        names = self.spec.names
        if names.expert(layer, 0)[0] in self:
            return "per_expert"
        if any(gate_up in self for gate_up, _ in names.fused_experts(layer)):
            return "fused"
        raise CheckpointError(
            f"tensor '{names.expert(layer, 0)[0]}' (or a fused '{names.fused_experts(layer)[0][0]}') "
            f"is missing from the checkpoint in {self.dir}"
        )

    def read_experts(self, layer: int, experts: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the given routed experts of one layer, stacked.

        Returns gate_up [n, 2I, H] (gate rows first, then up rows) and down [n, H, I].
        """
        spec, moe = self.spec, self.spec.moe
        assert moe is not None, "read_experts on a model without MoE layers"
        H, I = spec.hidden_size, moe.expert_intermediate_size
        if self.expert_layout(layer) == "fused":
            gate_up_name, down_name = next(p for p in spec.names.fused_experts(layer) if p[0] in self)
            E = moe.num_experts
            gate_up = self.read_rows(gate_up_name, experts, (E, 2 * I, H), dtype)
            down = self.read_rows(down_name, experts, (E, H, I), dtype)
            return gate_up, down
        gate_ups, downs = [], []
        for e in experts:
            gate, up, down = spec.names.expert(layer, e)
            gate_ups.append(torch.cat([self.read(gate, (I, H), dtype), self.read(up, (I, H), dtype)]))
            downs.append(self.read(down, (H, I), dtype))
        return torch.stack(gate_ups), torch.stack(downs)
