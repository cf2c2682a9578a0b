"""Wire types shared by the gateway, the router and the block servers."""

from protocol.errors import (
    CapacityExceeded,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoRouteError,
    PeerUnavailable,
    ProtocolMismatch,
    RequestError,
    SwarmError,
    Unauthorized,
)
from protocol.swarm import ModelRecord, NodeState, ServerRecord, dht_prefix

__all__ = [
    "CapacityExceeded",
    "ContextLengthExceeded",
    "InvalidRequest",
    "ModelNotFound",
    "ModelRecord",
    "NoRouteError",
    "NodeState",
    "PeerUnavailable",
    "ProtocolMismatch",
    "RequestError",
    "ServerRecord",
    "SwarmError",
    "Unauthorized",
    "dht_prefix",
]
