"""Helpers shared by the benchmark suites: model resolution, timing, reports."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def resolve_model(model: str | None, preset: str) -> Path:
    """--model DIR if given, else the preset built once into the cache."""
    if model:
        return Path(model)
    from cluster.make_model import default_model_dir

    return default_model_dir(preset)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path


def median(xs: list[float]) -> float:
    return percentile(xs, 50)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) of xs, numpy's (linear between closest ranks): every suite's one helper."""
    if len(xs) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(xs, q))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
