"""Building the project's C++ op libraries (`csrc/`) on first use, and loading them into this process.

Each library is compiled by torch's extension builder for this torch (and, where a caller says so, this
CPU), cached under torch's extensions directory by a key of its source and build inputs, and loaded as a
library of torch ops (`torch.ops.<namespace>`). Callers fall back to Python or plain torch where a build
is impossible: no compiler or ninja on PATH, or a failed build (logged once by the caller).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")


def missing_toolchain() -> list[str]:
    """The build tools that are not on PATH (empty when a build can be tried)."""
    return [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]


def build(name: str, source: str, cflags: list[str], ldflags: list[str] = (), key: str = "") -> str:
    """Compile csrc/`source` (or reuse the cached build) and load it; returns the library's path.

    `key`: whatever else makes the binary specific (CPU flags for -march=native builds)."""
    from torch.utils.cpp_extension import load

    path = CSRC / source
    digest = hashlib.sha256(path.read_bytes() + torch.__version__.encode() + key.encode()
                            + " ".join(cflags).encode()).hexdigest()[:12]
    return load(name=f"{name}_{digest}", sources=[str(path)], is_python_module=False, extra_cflags=list(cflags),
                extra_ldflags=list(ldflags), verbose=False)
