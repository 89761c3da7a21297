"""The preloads every moe-serve process gets (cluster/process_env.py): found, skipped, re-executed into,
and applied by Ray to an actor's own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import process_env


def _maps() -> str:
    return Path("/proc/self/maps").read_text()


def test_preload_env_names_only_installed_libraries(monkeypatch):
    monkeypatch.delenv(process_env.SWITCH, raising=False)
    env = process_env.preload_env()
    libs = env.get("LD_PRELOAD", "").split(":") if env else []
    assert all(Path(lib).exists() for lib in libs if lib)
    assert set(process_env.preload_libraries()) <= set(libs)
    monkeypatch.setenv(process_env.SWITCH, "0")
    assert process_env.preload_env() == {} and process_env.actor_runtime_env() == {}


def test_reexec_loads_the_libraries_into_the_process(tmp_path):
    if not process_env.preload_libraries():
        pytest.skip("neither tcmalloc nor libiomp5 is installed here: nothing to preload")
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom cluster.process_env import reexec_with_preload\nreexec_with_preload(sys.argv)\n"
                      "print(open('/proc/self/maps').read())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MOE_SERVE_PRELOADED")}
    maps = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout
    for lib in process_env.preload_libraries():
        assert Path(lib).name in maps, lib


@pytest.mark.cluster
def test_ray_actors_start_with_the_preloads(ray_session):
    if not process_env.preload_libraries():
        pytest.skip("neither tcmalloc nor libiomp5 is installed here: nothing to preload")

    @ray_session.remote(num_cpus=0)
    class Probe:
        def maps(self) -> str:
            return _maps()

    probe = Probe.options(runtime_env=process_env.actor_runtime_env()).remote()
    try:
        maps = ray_session.get(probe.maps.remote(), timeout=120)
    finally:
        ray_session.kill(probe)
    for lib in process_env.preload_libraries():
        assert Path(lib).name in maps, lib


def test_torch_threads_default_to_the_cpus_ray_reserves():
    from expert_workers.worker import host_cpus, threads_for_cpus, torch_threads_for

    assert [threads_for_cpus(c) for c in (0.25, 0.5, 1, 2, 3.7)] == [1, 1, 1, 2, 3]
    assert torch_threads_for(3) == 3  # a setting wins
    assert 1 <= host_cpus() <= (os.cpu_count() or 1)
