"""Every supported MoE family through a 2-worker cluster: greedy tokens over gRPC equal the single-process
engine's (random-weight presets) and transformers' (a transformers-written DeepSeek-V2 checkpoint with
group-limited routing).

One cluster at a time (the controller is a named detached actor): each test starts its own and stops it
in `finally` before the next begins. Small prompts and few new tokens keep the module near a minute.
"""

from __future__ import annotations

import grpc
import pytest

from cluster.controller import start_cluster, stop_cluster
from cluster.make_model import make_model
from cluster.settings import ClusterSettings
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=128, max_num_seqs=8)
NUM_WORKERS = 2
MAX_TOKENS = 6
RPC_TIMEOUT = 120
# ids below 320: valid for the presets' DeepSeek-V3 vocabulary and the transformers reference's 320
PROMPTS = [[5, 17, 300, 42], [7], [100, 200, 30, 40, 50, 60, 70, 80, 90], [9, 9]]
PRESET_NAMES = ["mixtral-tiny", "qwen2-moe-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny", "phimoe-tiny"]


def cluster_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Start a 2-worker cluster on `model_dir`, send every prompt concurrently, stop the cluster."""
    controller, ports = start_cluster(ClusterSettings(model=model_dir, num_workers=NUM_WORKERS, port=0,
                                                      engine=ENGINE, rebalance_below_balancedness=None))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            futures = [stub.Generate.future(pb2.GenerateRequest(
                token_ids=pb2.TokenIds(ids=p), sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                timeout=RPC_TIMEOUT) for p in prompts]
            return [list(f.result().token_ids) for f in futures]
    finally:
        stop_cluster(controller)


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(make_model(name, tmp_path_factory.mktemp(name) / "model"))
        return built[name]

    return get


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_cluster_matches_single_process_engine(ray_session, preset_dir, preset):
    model_dir = preset_dir(preset)
    expected = [c.token_ids for c in load_engine(model_dir, ENGINE).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    assert all(len(t) == MAX_TOKENS for t in expected)
    assert cluster_greedy(model_dir, PROMPTS, MAX_TOKENS) == expected, preset


def test_cluster_matches_transformers_on_group_limited_deepseek_v2(ray_session, tmp_path_factory):
    """transformers' DeepseekV2ForCausalLM (top-3 within the best 2 of 4 groups), written by save_pretrained."""
    from tests.router_service.test_deepseek_v2_v3 import build_v2_group
    from tests.router_service.test_reference_equivalence import MAX_NEW, MIN_GREEDY_MARGIN
    from tests.router_service.test_reference_equivalence import PROMPTS as REF_PROMPTS

    ref = build_v2_group(tmp_path_factory.mktemp("v2-group"))
    want = []
    for prompt in REF_PROMPTS:
        tokens, step_logits = ref.greedy(prompt, MAX_NEW)
        top2 = step_logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min().item() > MIN_GREEDY_MARGIN, "reference greedy margin too small"
        want.append(tokens)
    assert cluster_greedy(str(ref.ckpt), REF_PROMPTS, MAX_NEW) == want
