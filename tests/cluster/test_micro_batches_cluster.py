"""Two-micro-batch overlap through a real cluster: 2 expert workers, the socket transport, one router.

The router's engine runs with micro_batches = 2 and must give the single-process engine's greedy
tokens. The prompts are long enough that a prefill step's replies (about 0.5 MiB per worker per
micro-batch) overflow the sockets' buffers, the case where a second request sent before the first
reply is read would stall both ends; no recovery may have happened either.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from cluster.controller import start_cluster, stop_cluster
from cluster.settings import NAMESPACE, ClusterSettings
from router_service.api import generation_pb2 as pb2
from router_service.api import generation_pb2_grpc as pb2_grpc
from router_service.engine import EngineSettings, load_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineSettings(max_model_len=512, max_num_seqs=10, max_batched_tokens=4096)
TOKENS = 8
_g = torch.Generator().manual_seed(1)
# 8 prompts of ~480 tokens prefill in one step: two micro-batches of ~1950 tokens; 2 short ones decode beside.
PROMPTS = [torch.randint(0, 5000, (470 + 3 * i,), generator=_g).tolist() for i in range(8)] + [[7], [9, 8, 7]]


def test_socket_cluster_with_two_micro_batches_matches_the_engine(ray_session, tiny_model):
    import ray

    expected = [c.token_ids for c in load_engine(tiny_model, ENGINE).generate(
        PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True))]
    engine = ENGINE.model_copy(update={"micro_batches": 2})
    controller, ports = start_cluster(ClusterSettings(model=tiny_model, num_workers=2, port=0, engine=engine,
                                                      transport="socket", rebalance_below_balancedness=None))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            futures = [stub.Generate.future(pb2.GenerateRequest(
                token_ids=pb2.TokenIds(ids=p), sampling=pb2.SamplingParams(max_tokens=TOKENS, ignore_eos=True)),
                timeout=120) for p in PROMPTS]
            assert [list(f.result().token_ids) for f in futures] == expected
        router = ray.get_actor("router-0", namespace=NAMESPACE)
        stats = ray.get(router.stats.remote(), timeout=30)
        assert stats["recoveries"] == []  # no worker was taken for dead on the way
        assert ray.get(router.__ray_call__.remote(lambda r: r.engine.engine.model.micro_batches), timeout=30) == 2
    finally:
        stop_cluster(controller)
