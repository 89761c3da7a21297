"""Fixtures the whole suite shares: the tiny checkpoint and one local Ray instance.

The tiny model is built (about a second) into a per-session cache directory, so
tests never write to the user's `~/.cache/moe-serve`. Tests that need Ray are
marked `cluster` and take `ray_session`: one Ray instance for the whole session,
because starting Ray costs seconds on a small machine.
"""

from __future__ import annotations

import os
from pathlib import Path

# oneDNN, and torch's ideep over it, keep a compiled primitive per GEMM shape (about half a MB each, up to 1024
# of each by default). The fuzz test's memory bound looks for leaks across hundreds of requests of random
# lengths; the caches would pass for one. Read when oneDNN first runs, so set before torch computes anything.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests start many clusters: their routers' OpenAI HTTP servers take free ports rather than the default 8000
# (a test that wants a given port says so in its ClusterSettings).
os.environ.setdefault("MOE_SERVE_HTTP_PORT", "0")

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
def ray_cluster():
    """One local Ray cluster for the whole session, the driver connected in the cluster's namespace.

    It starts as one head node (2 CPUs); multi-node tests add nodes to it (`ray_cluster.add_node(...)`, each
    its own raylet with its own resources) and remove them again, so every test shares one GCS.
    """
    import ray
    from ray.cluster_utils import Cluster

    from cluster.settings import NAMESPACE

    global _RAY_METRICS_PORT
    _RAY_METRICS_PORT = _free_port()  # Prometheus endpoint of the head node's Ray metrics agent
    # A node whose raylet is killed counts as dead after 3 missed health checks 0.5 s apart (Ray's default waits
    # longer), so multi-node tests see a lost node's actors rescheduled within seconds.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "metrics_export_port": _RAY_METRICS_PORT,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The session's Ray (see ray_cluster), for tests that need Ray but not its nodes."""
    import ray

    return ray


_RAY_METRICS_PORT: int | None = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_metrics_port(ray_session) -> int:
    """Port of the session's Ray metrics endpoint (http://127.0.0.1:PORT/metrics)."""
    assert _RAY_METRICS_PORT is not None, "Ray was started outside ray_session, without a known metrics port"
    return _RAY_METRICS_PORT


# --- a router's gRPC server in this process, without Ray ----------------------------------------------


class LocalServer:
    """A tiny-model engine behind `start_server` (gRPC) and `start_http_server` (the OpenAI API), on its own
    asyncio loop in a background thread, as in a router.

    Tests talk to it over real channels and read `engine` (the synchronous Engine) directly, e.g. to check
    that every KV slot is free again. `run(coro)` runs a coroutine on the server's loop (e.g. `server.drain`).
    """

    def __init__(self, model_dir: str, settings, security=None, admin=None):
        import asyncio
        import threading

        from router_service.async_engine import AsyncEngine
        from router_service.engine import load_engine
        from router_service.http_server import start_http_server
        from router_service.server import start_server

        self.engine = load_engine(model_dir, settings)
        self.security = security
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self._thread.start()

        async def start():
            async_engine = AsyncEngine(self.engine, asyncio.get_running_loop())  # needs the loop it runs on
            server, port, health = await start_server(async_engine, admin, "127.0.0.1", 0, "tiny", model_dir,
                                                      security=security)
            http = await start_http_server(async_engine, "127.0.0.1", 0, "tiny", security=security)
            return async_engine, server, port, health, http

        self.async_engine, self.server, self.port, self.health, self.http = self.run(start(), 60)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI API (http://127.0.0.1:PORT; https when the server has TLS)."""
        return f"http{'s' if self.security is not None and self.security.tls else ''}://127.0.0.1:{self.http.port}"

    def run(self, coro, timeout: float = 60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.async_engine.stop()
        self.run(self.server.stop(1), 30)
        self.run(self.http.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def local_server(tiny_model):
    """Factory of LocalServer on the tiny model: `srv = local_server(EngineSettings(...), security=...)`;
    the caller closes it (`srv.close()`), typically in a module-scoped fixture."""

    def start(settings=None, security=None, admin=None) -> LocalServer:
        from router_service.engine import EngineSettings

        return LocalServer(tiny_model, settings or EngineSettings(max_model_len=128), security, admin)

    return start
