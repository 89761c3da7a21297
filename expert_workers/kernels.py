"""CPU kernels for the decode step: which one computes each linear and each MoE layer, and the fallback.

A decode step multiplies every weight it reads by a few token rows, so it is bound by how fast weights
stream from memory. torch's GEMMs reach a third to a half of that rate at these shapes; the C++ kernels
in `csrc/cpu_kernels.cpp` reach most of it (figures: docs/kernels.md). They are built on first use for
the CPU they run on and used where they apply:

    backend  dtype                  weights                             rows per call
    amx      bf16 (AMX CPUs)        prepacked once into VNNI tiles       any
    fma      fp32 (AVX-512, or      prepacked once into panels of 16     any
             AVX2 with FMA)         output features
    dot      bf16 (AVX512-BF16);    unpacked (and a oneDNN-prepacked     at most DOT_MAX_ROWS; a linear of
             fp32 weights whose     copy)                                more rows runs torch's oneDNN
             features do not fit                                         linear on the copy
             panels
    torch    anything else, GPUs, or when the build is unavailable      any

Weights of a linear go through `prepare_linear` once after loading, stacked routed experts through
`prepare_experts`; `linear` and `moe` then run whatever backend the prepared weight was made for, so a
call site never chooses. Setting MOE_SERVE_CPU_KERNELS=torch keeps every op on plain torch (the
reference path; the tests run both).

The build needs a C++ compiler and ninja. Without them, or on a CPU with none of these ISAs, one line
is logged and plain torch serves: slower, the same outputs within floating-point rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from expert_workers import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
ENV = "MOE_SERVE_CPU_KERNELS"  # "auto" (default) or "torch"
# The ISA to build for: this CPU's by default; an older one (e.g. "haswell", AVX2 only) runs that code path
# on this CPU, which is how the tests check the AVX2 kernels on an AVX-512 machine.
MARCH_ENV = "MOE_SERVE_CPU_MARCH"

# The dot backend is register-tiled for a handful of rows and becomes compute-bound past them; above
# this many rows oneDNN's GEMM on prepacked weights is as fast or faster (docs/kernels.md).
DOT_MAX_ROWS = 8
# The fused MoE layer on dot serves a layer while no expert gets more rows than this: decode batches (6 to 20
# rows per expert at 32 to 64 sequences of deepseek-moe-mini, top-6 of 32), where it ran the engine's decode
# 2.3x (bf16) and 2.5x (AVX2 fp32) faster at 32 sequences than the per-expert torch paths, which read each
# expert's weights at a third of the rate. Prefill (about 100 rows per expert at 512 tokens) stays on those:
# there the register tiles are compute-bound (AVX2 fp32 prefill fell from 419 to 275 tokens/s fused).
# (fp32 layers have since moved to the packed fma backend, which serves every row count; dot keeps bf16
# without AMX and the rare fp32 shapes that do not fit panels.)
MOE_DOT_MAX_ROWS = 32
# The batch size oneDNN packs a linear's weight for (torch.ops.mkldnn._reorder_linear_weight): a hint for its
# blocking only, any row count runs on the result. 32 measured as well as the exact size at 12 to 64 rows.
ONEDNN_ROWS_HINT = 32


def onednn_rows(m: int) -> int:
    """The row count a oneDNN linear of m rows runs at: m padded to a multiple of 8 up to 64, of 64 above.
    oneDNN (and torch's ideep over it) caches a compiled primitive per shape, about half a MB each, up to
    1024 of them: without buckets a server seeing many batch sizes and prompt lengths grows by hundreds of
    MB. Padding costs little: at 16 rows and fewer a linear is bound by its weight's bytes, not its rows."""
    return -(-m // 8) * 8 if m <= 64 else -(-m // 64) * 64


@functools.cache
def available_backends() -> tuple[str, ...]:
    """What the built kernels can run in this process: some of "amx", "fma", "dot:bfloat16", "dot:float32"."""
    if os.environ.get(ENV, "auto") == "torch":
        return ()
    if platform.machine() not in ("x86_64", "AMD64"):
        log.info("moe-serve CPU kernels: none for %s; plain torch computes", platform.machine())
        return ()
    missing = native.missing_toolchain()
    if missing:
        log.warning("moe-serve CPU kernels unavailable (no %s on PATH); plain torch computes, more slowly",
                    " or ".join(missing))
        return ()
    try:
        _build()
        return tuple(torch.ops.moe_serve_cpu.backends())
    except Exception as err:  # a failed build must not stop serving
        log.warning("moe-serve CPU kernels failed to build (%s); plain torch computes, more slowly",
                    str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
        return ()


def _build() -> None:
    """Compile (or reuse from the torch extensions cache) and load the kernels for this CPU."""
    # -march=native makes the binary specific to this CPU, so the cache key includes its flags.
    march = os.environ.get(MARCH_ENV, "native")
    native.build("moe_serve_cpu", SOURCE.name, ["-O3", f"-march={march}", "-fopenmp"], ["-fopenmp"],
                 key=_cpu_flags())


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def backend_for(dtype: torch.dtype, device: torch.device) -> str | None:
    """The kernel backend for weights of this dtype on this device, or None for plain torch."""
    if device.type != "cpu":
        return None
    backends = available_backends()
    if dtype == torch.bfloat16 and "amx" in backends:
        return "amx"
    if dtype == torch.float32 and "fma" in backends:
        return "fma"
    name = {torch.bfloat16: "dot:bfloat16", torch.float32: "dot:float32"}.get(dtype)
    return "dot" if name in backends else None


def pack_amx(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] bf16 -> VNNI tiles [..., N/16, K/32, 16, 32]: row kp of tile (nb, kb) holds, for n in 0..15,
    the pair w[16 nb + n, 32 kb + 2 kp + {0, 1}] (TDPBF16PS's B operand). Leading dims (a stack of experts) stay."""
    *lead, N, K = w.shape
    tiles = w.reshape(*lead, N // 16, 16, K // 32, 16, 2)  # [.., nb, n, kb, kp, pair]
    d = len(lead)
    return tiles.permute(*range(d), d, d + 2, d + 3, d + 1, d + 4).reshape(*lead, N // 16, K // 32, 16, 32).contiguous()


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] fp32 -> panels [..., N/16, K, 16]: line k of panel nb holds w[16 nb + c, k] for c in 0..15,
    the 16 outputs one broadcast input element feeds (the fma kernel). Leading dims (a stack of experts) stay."""
    *lead, N, K = w.shape
    return w.reshape(*lead, N // 16, 16, K).transpose(-1, -2).contiguous()


def _fits(backend: str, w: torch.Tensor) -> bool:
    """Whether w [..., N, K] packs for `backend` (dot takes any shape)."""
    if backend == "amx":
        return w.shape[-2] % 16 == 0 and w.shape[-1] % 32 == 0
    if backend == "fma":
        return w.shape[-2] % 16 == 0
    return True


_PACK = {"amx": pack_amx, "fma": pack_panels}
PACKED = frozenset(_PACK)  # backends whose weights only the kernels read: every row count runs on them


@dataclass(frozen=True)
class LinearWeight:
    """A linear's weight made ready once for its backend: `weight` is [N, K], packed tiles for amx, or panels
    [N/16, K, 16] for fma."""

    weight: torch.Tensor
    backend: str  # "amx", "fma" or "dot"
    out_features: int
    # dot: the same weight in oneDNN's own blocked layout, for calls of more than DOT_MAX_ROWS rows, where
    # torch's F.linear would re-lay the plain weight out on every call (twice as slow at 16 to 64 rows).
    # None where torch has no oneDNN. Costs a second copy of the weight in memory.
    onednn: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def prepare_linear(w: torch.Tensor | LinearWeight) -> torch.Tensor | LinearWeight:
    """w [N, K] as the fastest backend here wants it (the tensor itself where plain torch computes)."""
    if isinstance(w, LinearWeight):
        return w
    backend = backend_for(w.dtype, w.device)
    if backend == "fma" and not _fits(backend, w):
        backend = "dot"  # the same fp32 kernels' unpacked form
    if backend is None or not _fits(backend, w):
        return w
    if backend in _PACK:
        return LinearWeight(_PACK[backend](w), backend, w.shape[0])
    return LinearWeight(w.contiguous(), backend, w.shape[0], _onednn_pack(w))


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] prepacked for torch's oneDNN linear (torch.ops.mkldnn), or None where this torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ONEDNN_ROWS_HINT)
    except (RuntimeError, AttributeError) as err:
        log.info("oneDNN weight prepacking unavailable (%s); torch's linear serves large batches", err)
        return None


def linear(x: torch.Tensor, w: torch.Tensor | LinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w^T (+ bias): [..., N], with the kernel `w` was prepared for."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if x.dtype != w.weight.dtype or (w.backend == "dot" and rows.shape[0] > DOT_MAX_ROWS):
        if w.backend in PACKED:  # no torch op reads it; compute in its dtype
            return linear(x.to(w.weight.dtype), w, bias).to(x.dtype)
        if w.onednn is not None and x.dtype == w.weight.dtype:
            m, padded = rows.shape[0], onednn_rows(rows.shape[0])
            if padded != m:
                rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])  # [padded, K]
            y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), w.onednn, bias, "none", [], "")  # [padded, N]
            return y[:m].view(*x.shape[:-1], w.out_features)
        return F.linear(x, w.weight, bias)
    y = torch.ops.moe_serve_cpu.linear(rows, w.weight, w.backend).view(*x.shape[:-1], w.out_features)
    return y if bias is None else y + bias


def prepare_experts(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Stacked experts gate_up [n, 2I, H], down [n, H, I] in the layout of the backend here, and that backend.
    amx packs each expert's matrices into tiles ([n, 2I/16, H/32, 16, 32], [n, H/16, I/32, 16, 32]), fma into
    panels ([n, 2I/16, H, 16], [n, H/16, I, 16]); row operations along dim 0 (select, stack, cat) keep working
    on the packed forms."""
    backend = backend_for(gate_up.dtype, gate_up.device)
    if backend == "fma" and not (_fits(backend, gate_up) and _fits(backend, down)):
        backend = "dot"
    if backend in _PACK:
        if not (_fits(backend, gate_up) and _fits(backend, down)):
            return gate_up, down, None
        return _PACK[backend](gate_up), _PACK[backend](down), backend
    return gate_up, down, backend


def moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, backend: str, row: torch.Tensor,
        token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fused routed-expert FFN (csrc `moe`): out [T, H] = sum over pairs p of weight[p] times hosted row
    row[p]'s swiglu of hidden[token[p]]. Weights as `prepare_experts` left them."""
    return torch.ops.moe_serve_cpu.moe(hidden, gate_up, down, row, token, weight.float(), backend)


def attention_runs_here(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `decode_attention` serves this dtype and device (plain C++, on any CPU the build ran on)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and bool(available_backends())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query row per sequence against its cached keys and values (csrc `decode_attention`): q [B, Q, D];
    one layer of the cache k [S, N, M, D], v [S, N, M, Dv]; slots, lens [B]. Returns [B, Q, Dv]."""
    return torch.ops.moe_serve_cpu.decode_attention(q, k, v, slots, lens, scale)
