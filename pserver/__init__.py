"""pserver: a sharded parameter server for distributed training.

The public surface for users: ``connect`` and ``Client`` (from
``pserver.clients``) and the error types (from ``pserver.protocol``). The
server side lives in the submodules (``supervisor``, ``server``, ``shard``) and
is started with the ``pserver`` command.
"""

from pserver.clients import Client, connect
from pserver.protocol.errors import (
    InternalError,
    InvalidArgument,
    KeyNotFound,
    NotLeader,
    ProtocolError,
    PServerError,
    RequestTooLarge,
    ShapeMismatch,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "InternalError",
    "InvalidArgument",
    "KeyNotFound",
    "NotLeader",
    "PServerError",
    "ProtocolError",
    "RequestTooLarge",
    "ShapeMismatch",
    "Unavailable",
    "__version__",
    "connect",
]
