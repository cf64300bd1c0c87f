"""The wire schema: message kinds, tensor descriptors, limits and the header.

Owns the vocabulary of the protocol (see PROTOCOL.md) as frozen dataclasses
and enums. No encoding happens here (``codec.py``), no sockets
(``transport.py``). Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import ml_dtypes
import numpy as np

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class Kind(IntEnum):
    """Message kinds. Requests are < 100; every reply has kind REPLY."""

    PING = 1
    MAP = 2
    STATUS = 3
    INIT = 10
    PUSH = 11
    PULL = 12
    PUSH_PULL = 13
    META = 14
    CREATE_TABLE = 15
    PULL_ROWS = 16
    PUSH_ROWS = 17
    TABLE_META = 18
    BARRIER = 19
    HEARTBEAT = 20
    KEYS = 21
    RAFT = 22  # between the replicas of one shard: a Raft message (PROTOCOL.md)
    PEER_DOWN = 23  # from the supervisor to a replica: another replica's process died
    REPLY = 100


# Worker ids are 0 .. MAX_WORKERS - 1, and no key or barrier has more workers: a
# shard tracks each worker it hears from, so the ids it accepts are bounded.
MAX_WORKERS = 4096

MUTATING_KINDS = frozenset({Kind.INIT, Kind.PUSH, Kind.PUSH_PULL, Kind.CREATE_TABLE,
                            Kind.PUSH_ROWS})

# dtype names on the wire -> numpy dtypes (always little-endian).
DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint64": np.dtype("<u8"),
}


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The wire name of ``dtype``, or None when it is not on the allow-list."""
    for name, allowed in DTYPES.items():
        if dtype == allowed:
            return name
    return None


@dataclass(frozen=True)
class Limits:
    """Caps enforced before any allocation (server) and before sending (client)."""

    max_header_bytes: int = 1 << 20
    max_frames: int = 8192
    max_frame_bytes: int = 64 << 20
    max_keys: int = 4096
    max_key_bytes: int = 1024
    max_request_bytes: int = 256 << 20
    max_rank: int = 32

    def to_wire(self) -> dict[str, int]:
        return {
            "max_header_bytes": self.max_header_bytes,
            "max_frames": self.max_frames,
            "max_frame_bytes": self.max_frame_bytes,
            "max_keys": self.max_keys,
            "max_key_bytes": self.max_key_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_rank": self.max_rank,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Limits:
        known = {k: int(v) for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(slots=True)
class TensorMeta:
    """One tensor part in a message: elements [offset, offset+count) of ``key``'s
    flattened array, whose full shape and dtype are given, carried in ``nframes``
    consecutive frames (0 when the message carries no data for it). Treat as
    immutable (not frozen for speed, like ``Header``)."""

    key: str
    part: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    count: int
    nframes: int

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.count * self.np_dtype.itemsize

    def to_wire(self) -> list[Any]:
        return [
            self.key,
            self.part,
            self.dtype,
            list(self.shape),
            self.offset,
            self.count,
            self.nframes,
        ]


@dataclass(frozen=True)
class KeyRef:
    """A reference to one part of a key, without data (pull and meta requests)."""

    key: str
    part: int

    def to_wire(self) -> list[Any]:
        return [self.key, self.part]


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Where a message's data frames lie in shared memory instead of following the
    header (PROTOCOL.md §4.6): segment ``name``, one (offset, length) span per data
    frame, and a region (offset, length) the reply's values may be written to."""

    name: str
    spans: tuple[tuple[int, int], ...] = ()
    out: tuple[int, int] | None = None

    def to_wire(self) -> list[Any]:
        return [self.name, [list(s) for s in self.spans],
                list(self.out) if self.out is not None else None]


@dataclass(slots=True)
class Header:
    """A decoded message header. ``tensors`` describe the data frames in order;
    ``refs`` name parts without data; ``opts`` holds kind-specific fields.
    Treat it as immutable once sent; only the client's I/O engine fills in
    ``seq`` of a mutation before its first send (not frozen: a frozen dataclass
    costs a microsecond more per message on both sides)."""

    kind: Kind
    request_id: int
    version: int = PROTOCOL_VERSION
    client_id: bytes = b""
    seq: int = 0
    tensors: tuple[TensorMeta, ...] = ()
    refs: tuple[KeyRef, ...] = ()
    opts: dict[str, Any] = field(default_factory=dict)
    error: int = 0
    message: str = ""
    shm: ShmRef | None = None

    @property
    def nframes(self) -> int:
        return sum(t.nframes for t in self.tensors)
