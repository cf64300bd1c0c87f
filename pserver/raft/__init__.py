"""pserver.raft: the consensus core as a pure state machine (as etcd's raft).

``RaftCore`` only changes state: ``step(message)``, ``tick()``, ``propose(data)``;
``ready()`` hands the driver the entries and hard state to persist, the messages
to send and the committed entries to apply; ``advance(ready)`` acknowledges
them. No sockets, clocks, threads or files; randomness is injected.
"""

from .core import RaftCore, Role
from .types import (
    Config,
    Entry,
    EntryData,
    HardState,
    Message,
    MsgType,
    Payload,
    Ready,
    Snapshot,
    data_parts,
)

__all__ = [
    "Config",
    "Entry",
    "EntryData",
    "HardState",
    "Message",
    "MsgType",
    "Payload",
    "RaftCore",
    "Ready",
    "Role",
    "Snapshot",
    "data_parts",
]
