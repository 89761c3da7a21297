# Generated from proto/moeserve/v1/cluster_admin.proto by `python -m router_service.api.regenerate`. Do not edit.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
    WORKER_STATE_DEAD: _ClassVar[WorkerState]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_DRAINING: WorkerState
WORKER_STATE_DEAD: WorkerState

class GetPlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "actor_name", "node_id", "device", "state", "replicas")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    actor_name: str
    node_id: str
    device: str
    state: WorkerState
    replicas: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    def __init__(self, worker_id: _Optional[str] = ..., actor_name: _Optional[str] = ..., node_id: _Optional[str] = ..., device: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., replicas: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ...) -> None: ...

class Router(_message.Message):
    __slots__ = ("router_id", "node_id", "grpc_address", "http_address")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    node_id: str
    grpc_address: str
    http_address: str
    def __init__(self, router_id: _Optional[str] = ..., node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("plan_version", "workers", "routers")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    routers: _containers.RepeatedCompositeFieldContainer[Router]
    def __init__(self, plan_version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., routers: _Optional[_Iterable[_Union[Router, _Mapping]]] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertLoadEntry(_message.Message):
    __slots__ = ("layer", "expert", "tokens", "replicas")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    replicas: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("window_seconds", "plan_version", "experts", "workers", "balancedness")
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: float
    plan_version: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertLoadEntry]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    balancedness: float
    def __init__(self, window_seconds: _Optional[float] = ..., plan_version: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertLoadEntry, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., balancedness: _Optional[float] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("old_plan_version", "new_plan_version", "balancedness_before", "balancedness_after", "bytes_moved", "dropped")
    OLD_PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    old_plan_version: int
    new_plan_version: int
    balancedness_before: float
    balancedness_after: float
    bytes_moved: int
    dropped: bool
    def __init__(self, old_plan_version: _Optional[int] = ..., new_plan_version: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., bytes_moved: _Optional[int] = ..., dropped: _Optional[bool] = ...) -> None: ...

class GetAutoscalingPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AutoscalingPolicy(_message.Message):
    __slots__ = ("min_workers", "max_workers", "high_watermark_tokens_per_worker_per_second", "low_watermark_tokens_per_worker_per_second", "cooldown_seconds", "enabled")
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_TOKENS_PER_WORKER_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LOW_WATERMARK_TOKENS_PER_WORKER_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    min_workers: int
    max_workers: int
    high_watermark_tokens_per_worker_per_second: float
    low_watermark_tokens_per_worker_per_second: float
    cooldown_seconds: float
    enabled: bool
    def __init__(self, min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., high_watermark_tokens_per_worker_per_second: _Optional[float] = ..., low_watermark_tokens_per_worker_per_second: _Optional[float] = ..., cooldown_seconds: _Optional[float] = ..., enabled: _Optional[bool] = ...) -> None: ...
