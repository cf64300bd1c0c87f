"""pserver.protocol: the wire contract shared by servers and clients.

Schema, codec, frame conversion, the key->shard map, error types and the
ZeroMQ transport. A leaf package: it imports neither ``pserver.kernels`` nor
the server or client modules. See PROTOCOL.md for the byte-level spec.
"""

from .errors import (
    ErrorCode,
    InternalError,
    InvalidArgument,
    KeyNotFound,
    NotLeader,
    ProtocolError,
    PServerError,
    RequestTooLarge,
    ShapeMismatch,
    Unavailable,
    UnknownKind,
    UnsupportedVersion,
    WrongShard,
)
from .schema import PROTOCOL_VERSION, Header, KeyRef, Kind, Limits, TensorMeta
from .shardmap import ShardMap

__all__ = [
    "PROTOCOL_VERSION",
    "ErrorCode",
    "Header",
    "InternalError",
    "InvalidArgument",
    "KeyNotFound",
    "KeyRef",
    "Kind",
    "Limits",
    "NotLeader",
    "PServerError",
    "ProtocolError",
    "RequestTooLarge",
    "ShapeMismatch",
    "ShardMap",
    "TensorMeta",
    "Unavailable",
    "UnknownKind",
    "UnsupportedVersion",
    "WrongShard",
]
