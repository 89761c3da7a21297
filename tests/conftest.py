"""Fixtures the whole suite shares: the tiny checkpoint and one local Ray instance.

The tiny model is built (about a second) into a per-session cache directory, so
tests never write to the user's `~/.cache/moe-serve`. Tests that need Ray are
marked `cluster` and take `ray_session`: one Ray instance for the whole session,
because starting Ray costs seconds on a small machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One torch thread in the test process: the machine has two cores, and Ray actors
# (routers, expert workers) spawned by cluster tests need the other.
torch.set_num_threads(1)


def pytest_configure(config):
    # Declared in pyproject.toml; registered here too when the ini file is not read (e.g. `pytest -c other.ini`),
    # so that `--strict-markers` never trips over it.
    if not any(line.split(":")[0].strip() == "cluster" for line in config.getini("markers")):
        config.addinivalue_line("markers", "cluster: needs the shared local Ray instance (slower)")


@pytest.fixture(scope="session")
def moe_serve_cache(tmp_path_factory) -> Path:
    """A private MOE_SERVE_CACHE for the session (restored afterwards)."""
    root = tmp_path_factory.mktemp("moe-serve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_SERVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_model(moe_serve_cache) -> str:
    """Directory of the `tiny` DeepSeek-family checkpoint (random weights, DeepSeek-V3 tokenizer)."""
    from cluster.make_model import default_model_dir

    path = default_model_dir("tiny")
    assert path.is_relative_to(moe_serve_cache), f"{path} is outside the session cache {moe_serve_cache}"
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session, in the cluster's namespace."""
    import ray
    from cluster.settings import NAMESPACE

    if ray.is_initialized():  # e.g. a test module started its own; reuse it rather than fail
        yield ray
        return
    ray.init(namespace=NAMESPACE, include_dashboard=False, num_cpus=2, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
