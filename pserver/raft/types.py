"""Raft's value types: entries, messages, hard state, configuration, Ready.

Frozen dataclasses and enums, and ``Payload``; imports nothing but the standard
library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class MsgType(IntEnum):
    """Message types (the paper's RPCs, each request and its response)."""

    APP = 1  # AppendEntries (§5.3)
    APP_RESP = 2
    VOTE = 3  # RequestVote (§5.2)
    VOTE_RESP = 4
    PRE_VOTE = 5  # PreVote (Ongaro's thesis §9.6): a trial election without a term bump
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # an empty AppendEntries carrying the commit index
    HEARTBEAT_RESP = 8
    TIMEOUT_NOW = 9  # leadership transfer: campaign now (thesis §3.10)
    SNAP = 10  # InstallSnapshot (§7): one chunk of the snapshot, for entries compacted away
    SNAP_RESP = 11  # how many bytes of the snapshot the follower holds


class Payload:
    """An entry's data kept as the buffers it was made of, never joined: the leader's
    command batch (its description, then the clients' tensor frames) and a
    follower's entry as its frames arrived. ``len`` is the total size; ``bytes()``
    joins the parts (a copy, for whoever needs one buffer). The parts are read-only
    views: an entry may be sent or applied again, so its bytes must never change."""

    __slots__ = ("_len", "parts")

    def __init__(self, parts: Iterable[Any]) -> None:
        self.parts: tuple[memoryview, ...] = tuple(
            memoryview(p).cast("B").toreadonly() for p in parts)
        self._len = sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self._len

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Payload):
            return len(self) == len(other) and bytes(self) == bytes(other)
        if isinstance(other, bytes | bytearray | memoryview):
            return len(self) == memoryview(other).nbytes and bytes(self) == bytes(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __repr__(self) -> str:
        return f"Payload({len(self.parts)} parts, {self._len} bytes)"


EntryData = bytes | memoryview | Payload


def data_parts(data: EntryData) -> tuple[bytes | memoryview, ...]:
    """An entry's data as consecutive buffers (one unless it is a ``Payload``)."""
    return data.parts if isinstance(data, Payload) else (data,)


@dataclass(frozen=True)
class Entry:
    """One log entry; ``data`` empty is the leader's no-op of its term (§8)."""

    term: int
    index: int
    data: EntryData = b""


@dataclass(frozen=True)
class Snapshot:
    """The state machine as of entry ``index`` (of ``term``): what replaces the log
    up to there (§7). ``data`` is the state machine's own encoding."""

    index: int
    term: int
    data: bytes | memoryview = b""


@dataclass(frozen=True)
class Message:
    """A message between nodes. ``index``/``log_term`` locate the entry before
    ``entries`` (APP) or the sender's last entry (VOTE); responses carry the
    matched or hinted index."""

    type: MsgType
    frm: int
    to: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None  # SNAP: index, term and this chunk as ``data``
    snap_offset: int = 0  # SNAP: where the chunk starts; SNAP_RESP: bytes held
    snap_total: int = 0  # SNAP: the snapshot's size in bytes
    snap_crc: int = 0  # SNAP: CRC-32 of the whole snapshot
    context: bytes = b""  # HEARTBEAT(_RESP): the ReadIndex request it confirms
    stamp: int = 0  # HEARTBEAT(_RESP): the leader's heartbeat round (leases)


@dataclass(frozen=True)
class HardState:
    """What must be on disk before a node answers: term, vote and commit index."""

    term: int = 0
    vote: int = 0
    commit: int = 0


@dataclass(frozen=True)
class Config:
    """One node's settings; ticks are the driver's clock unit (e.g. 50 ms)."""

    id: int
    peers: tuple[int, ...]  # every voter, this node included
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 64
    max_bytes_per_msg: int = 1 << 20  # entry data per AppendEntries (at least one entry)
    max_inflight: int = 64  # AppendEntries with entries unacknowledged per follower
    snapshot_chunk_bytes: int = 1 << 20  # InstallSnapshot chunk size
    # Leader leases (thesis §6.4.1): the leader tells the driver which heartbeat round
    # a quorum acknowledged (``lease_stamp``), and a node refuses votes for its first
    # election timeout, since before a restart it may have acknowledged a lease.
    # Needs check_quorum (a node that heard from a leader within an election timeout
    # refuses votes).
    lease_reads: bool = False


@dataclass
class Ready:
    """Work for the driver: persist ``snapshot`` (and restore the state machine from
    it), ``hard_state`` and ``entries`` (fsync), then send ``messages``, then apply
    ``committed``, then call ``advance``."""

    hard_state: HardState | None = None
    snapshot: Snapshot | None = None  # persist and restore it before the entries
    entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    # ReadIndex (thesis §6.4): (context, index) of reads a quorum confirmed; serve each
    # once the state machine has applied ``index``.
    reads: list[tuple[bytes, int]] = field(default_factory=list)
    # Whether ``hard_state`` and ``entries`` must be fsynced before anything is sent or
    # applied: new entries, a new term or a new vote (etcd's MustSync). A hard state
    # that only moves the commit index may wait for the next sync: a node that loses
    # it in a crash learns the commit index again.
    must_sync: bool = False
