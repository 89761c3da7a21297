"""Python stubs of the moeserve.v1 gRPC API (proto/moeserve/v1/*.proto).

    from router_service.api import generation_pb2, generation_pb2_grpc
    from router_service.api import cluster_admin_pb2, cluster_admin_pb2_grpc

The stub modules are generated (`python -m router_service.api.regenerate`) and
checked in; edit the .proto files, never the stubs. They are imported on first
access rather than here, so that the regenerate module, which lives in this
package, still runs when the checked-in stubs are missing or fail to import
(e.g. they were generated for a newer protobuf than the one installed).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "cluster_admin_pb2",
    "cluster_admin_pb2_grpc",
    "generation_pb2",
    "generation_pb2_grpc",
]

if TYPE_CHECKING:
    from . import cluster_admin_pb2, cluster_admin_pb2_grpc, generation_pb2, generation_pb2_grpc


def __getattr__(name: str) -> ModuleType:
    # Module-level __getattr__ (PEP 562) runs only for names not yet set; importing
    # a submodule sets it as an attribute, so each stub is imported once.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
