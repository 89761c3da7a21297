"""The CLI client's failover between routers, against real gRPC servers on loopback (no cluster): an UNAVAILABLE
from a router that cannot take the call moves on to the next target; one the controller caused, which every
router would give alike, does not, so a Rebalance is never run twice."""

from __future__ import annotations

import argparse
from concurrent import futures

import grpc
import pytest

from cluster.client import rebalance
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.api import cluster_admin_pb2_grpc as admin_grpc
from router_service.errors import CONTROLLER_UNAVAILABLE_METADATA


class Admin(admin_grpc.ClusterAdminServicer):
    """Answers Rebalance, or refuses it UNAVAILABLE with the given trailing metadata; counts the calls."""

    def __init__(self, refuse_with: tuple | None):
        self.refuse_with, self.calls = refuse_with, 0

    def Rebalance(self, request, context):
        self.calls += 1
        if self.refuse_with is not None:
            context.set_trailing_metadata(self.refuse_with)
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")
        return admin_pb2.RebalanceResponse(old_plan_version=3, new_plan_version=3, balancedness_before=0.9)


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        admin_grpc.add_ClusterAdminServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def args_for(*targets: str) -> argparse.Namespace:
    return argparse.Namespace(target=",".join(targets), reason="test", token=None, tls_ca=None, tls_cert=None,
                              tls_key=None)


def test_a_router_that_cannot_take_the_call_hands_it_to_the_next(serve, capsys):
    first, second = Admin(refuse_with=()), Admin(refuse_with=None)
    assert rebalance(args_for(serve(first), serve(second))) == 0
    assert (first.calls, second.calls) == (1, 1)
    assert "trying" in capsys.readouterr().err


def test_the_controller_unavailable_is_not_retried_on_another_router(serve, capsys):
    first, second = Admin(refuse_with=(CONTROLLER_UNAVAILABLE_METADATA,)), Admin(refuse_with=None)
    assert rebalance(args_for(serve(first), serve(second))) == 1
    assert (first.calls, second.calls) == (1, 0)
    assert "UNAVAILABLE: refused by the test" in capsys.readouterr().err
