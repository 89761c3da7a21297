"""The reference transport (one Ray call per worker per MoE layer) gives the same tokens as the fast one.

test_cluster_serving.py runs the default socket transport against the single-process
engine; this module runs the Ray-call transport against the same reference.
"""

from __future__ import annotations

import grpc
import pytest

from cluster.controller import start_cluster, stop_cluster
from cluster.settings import ClusterSettings
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=128, max_num_seqs=8)
PROMPTS = [[5, 17, 300, 42], [7], [1000, 2000, 3000, 4000, 5000], [9, 9]]


def test_ray_call_transport_matches_the_single_process_engine(ray_session, tiny_model):
    expected = [c.token_ids for c in load_engine(tiny_model, ENGINE).generate(
        PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))]
    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=3, port=0, engine=ENGINE,
                                                      transport="ray", rebalance_below_balancedness=None))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            futures = [stub.Generate.future(pb2.GenerateRequest(
                token_ids=pb2.TokenIds(ids=p), sampling=pb2.SamplingParams(max_tokens=10, ignore_eos=True)),
                timeout=120) for p in PROMPTS]
            assert [list(f.result().token_ids) for f in futures] == expected
    finally:
        stop_cluster(controller)
