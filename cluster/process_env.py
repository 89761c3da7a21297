"""The process environment the decode step is measured in, given to every process moe-serve starts.

Two libraries change a CPU decode step's speed without changing its results, and both must be in place
before the process starts (the dynamic loader reads LD_PRELOAD once):
    tcmalloc      the OS's libtcmalloc_minimal (Debian/Ubuntu: libtcmalloc-minimal4): a step allocates
                  hundreds of short-lived tensors, and glibc's malloc returns their pages to the OS and
                  faults them back in
    Intel OpenMP  libiomp5 from the `intel-openmp` wheel (a dependency on x86-64): torch's and our kernels'
                  parallel regions start and end once per linear; its runtime hands out work with less
                  overhead than GNU's, which it replaces through the same GOMP entry points

`preload_env()` is what a process needs on top of its own environment; the CLI re-executes itself with
it (`reexec_with_preload`), the controller passes it to every Ray actor as a runtime environment, and the
Dockerfile and KubeRay manifests set the same. A library that is not installed is logged once and
skipped: results are the same without it. MOE_SERVE_PRELOAD=0 turns all of this off.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
SWITCH = "MOE_SERVE_PRELOAD"  # "0" turns preloading off
_MARK = "MOE_SERVE_PRELOADED"  # set in a re-executed process, so that it does not exec again


@functools.cache
def preload_libraries() -> tuple[str, ...]:
    """The allocator and OpenMP runtime found on this machine, in LD_PRELOAD order; logs what is missing."""
    found, missing = [], []
    tcmalloc = next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)
    (found if tcmalloc else missing).append(tcmalloc or "tcmalloc (apt install libtcmalloc-minimal4)")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    (found if iomp.exists() else missing).append(str(iomp) if iomp.exists() else "libiomp5 (pip install intel-openmp)")
    if missing:
        log.info("moe-serve runs without %s: same results, a slower CPU decode step", " and ".join(missing))
    return tuple(found)


def preload_env() -> dict[str, str]:
    """Environment variables to add to a new process (empty when turned off or nothing was found)."""
    if os.environ.get(SWITCH, "1") == "0":
        return {}
    libs = preload_libraries()
    if not libs:
        return {}
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    env = {"LD_PRELOAD": ":".join(list(libs) + [p for p in current if p not in libs])}
    if any("iomp" in lib for lib in libs):
        # Intel's runtime spins 200 ms after a parallel region by default; decode steps come every few ms,
        # but so do the other processes' on a shared node, so spin briefly and then yield the core.
        env.setdefault("KMP_BLOCKTIME", os.environ.get("KMP_BLOCKTIME", "1"))
    return env


def missing_from_this_process() -> dict[str, str]:
    """What preload_env adds that this process was not started with."""
    loaded = set(os.environ.get("LD_PRELOAD", "").split(":"))
    env = preload_env()
    if env and set(env["LD_PRELOAD"].split(":")) <= loaded:
        return {}
    return env


def reexec_with_preload(argv: list[str]) -> None:
    """Replace this process by itself with the preloads in place, if they are missing (the CLI's first step).
    Returns only when nothing needs doing: already preloaded, turned off, or nothing installed."""
    if os.environ.get(_MARK) == "1":
        return
    env = missing_from_this_process()
    if not env:
        return
    os.environ.update(env)
    os.environ[_MARK] = "1"
    os.execv(sys.executable, [sys.executable, *argv])


def actor_runtime_env() -> dict:
    """The Ray runtime environment that gives an actor's worker process the preloads."""
    env = preload_env()
    return {"env_vars": env} if env else {}
