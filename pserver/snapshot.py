"""Shard snapshots: the whole shard state machine in one checksummed file.

Owns the file format and the save/load of a ``ShardStateMachine``: every key
part (value, optimizer state and step, optimizer, mode, compression), every
table (row index with its free list, rows, state, per-row steps) and the
session table. Layout: ``MAGIC``, a u64 header length, a msgpack header naming
each array's dtype, shape and byte range, the raw array bytes, and a CRC32C of
everything before it. Written through ``wal.atomic_write`` semantics (temporary
file, fsync, rename, fsync the directory), so a crash leaves the old snapshot
or the new one. ``encode``/``decode`` give the same bytes in memory: the data of
a replicated shard's Raft snapshots. An unreplicated shard saves one file when
it stops cleanly and loads it when it starts.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import msgpack
import numpy as np

from pserver.protocol.schema import DTYPES

from .optim import OptimizerSpec
from .shard import ShardStateMachine, Slot, joined, widened
from .tables import Table, TableSpec
from .wal import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"PSNAP01\n"
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_BLOCK = 16 << 20


class SnapshotError(Exception):
    """A snapshot file is unreadable or corrupt."""


class _Writer:
    """Collects arrays: their descriptors go to the header, their bytes follow it.
    With ``copy`` it keeps copies, which stay as they are while the state changes."""

    def __init__(self, copy: bool = False) -> None:
        self.arrays: list[np.ndarray[Any, Any]] = []
        self.offset = 0
        self.copy = copy

    def add(self, a: np.ndarray[Any, Any]) -> list[Any]:
        a = np.array(a, order="C") if self.copy else np.asarray(a, order="C")  # 0-d stays 0-d
        name = next((n for n, d in DTYPES.items() if d == a.dtype), None) or a.dtype.str
        desc = [name, list(a.shape), self.offset, a.nbytes]
        self.arrays.append(a)
        self.offset += a.nbytes
        return desc


def save(sm: ShardStateMachine, path: Path) -> int:
    """Write ``sm`` to ``path`` atomically; returns the file's size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        _write(sm, fh)
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def encode(sm: ShardStateMachine) -> bytes:
    """``sm`` in the snapshot format, in memory (a Raft snapshot's data)."""
    return capture(sm).encode()


def _write(sm: ShardStateMachine, fh: BinaryIO) -> None:
    capture(sm).write(fh)


@dataclass
class Captured:
    """A shard's state ready to be written: the header and the arrays (views of the
    state, or copies that no later update touches)."""

    header: bytes
    arrays: list[np.ndarray[Any, Any]]

    def encode(self) -> bytes:
        """The snapshot's bytes (what ``encode`` gives for the state captured)."""
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()

    def write(self, fh: BinaryIO) -> None:
        crc = 0
        for chunk in (MAGIC, _LEN.pack(len(self.header)), self.header):
            fh.write(chunk)
            crc = google_crc32c.extend(crc, chunk)
        for a in self.arrays:
            view = memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            for i in range(0, len(view), _BLOCK):  # google_crc32c takes bytes only
                block = bytes(view[i:i + _BLOCK])
                fh.write(block)
                crc = google_crc32c.extend(crc, block)
        fh.write(_CRC.pack(crc))


def capture(sm: ShardStateMachine, copy: bool = False) -> Captured:
    """``sm``'s state for a snapshot. With ``copy`` every array is copied (one pass
    over the state): the snapshot can then be encoded and written on another thread
    while ``sm`` goes on changing."""
    w = _Writer(copy)
    read = sm.memory.read
    slots = [{
        "key": s.key, "part": s.part, "dtype": s.dtype, "shape": list(s.shape),
        "offset": s.offset, "count": s.count, "optimizer": s.optimizer.to_wire(),
        "mode": s.mode, "compression": list(s.compression), "step": s.step,
        "workers": s.workers, "staleness": s.staleness, "sync_step": s.sync_step,
        "worker_steps": [[w, n] for w, n in s.worker_steps.items()],
        "pending": [[step, wk, w.add(widened(joined(g, s.value.dtype), s.value.dtype))]
                    for step, grads in s.pending.items() for wk, g in grads.items()],
        "value": w.add(read(s.value)),
        "state": {k: w.add(read(v)) for k, v in s.state.items()},
    } for s in sm.slots.values()]
    tables = []
    for t in sm.tables.values():
        ids, slot_ids = t.index.items()
        n = t.index.num_slots
        tables.append({
            "spec": t.spec.to_wire(), "num_slots": n,
            "ids": w.add(ids), "slots": w.add(slot_ids), "free": w.add(t.index.free_slots()),
            "values": w.add(t.values[:n]), "steps": w.add(t.steps[:n]),
            "state": {k: w.add(v[:n]) for k, v in t.state.items()},
        })
    header = msgpack.packb({"applied_index": sm.applied_index, "slots": slots,
                            "tables": tables, "sessions": sm.sessions.to_wire(),
                            "dropped": sorted(sm.dropped)},
                           use_bin_type=True)
    return Captured(header, w.arrays)


def load(path: Path, sm: ShardStateMachine) -> None:
    """Replace ``sm``'s state with the snapshot at ``path`` (checked first)."""
    decode(path.read_bytes(), sm, str(path))


def decode(data: bytes | memoryview, sm: ShardStateMachine, source: str = "snapshot") -> None:
    """Replace ``sm``'s state with the snapshot ``data`` (checked first)."""
    if not isinstance(data, bytes):
        data = bytes(data)  # google-crc32c takes bytes
    if len(data) < len(MAGIC) + _LEN.size + _CRC.size or not data.startswith(MAGIC):
        raise SnapshotError(f"{source} is not a pserver snapshot")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if google_crc32c.value(body) != crc:
        raise SnapshotError(f"{source}: checksum mismatch; the snapshot is corrupt")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    header = msgpack.unpackb(data[start:start + hlen], raw=False)
    base = start + hlen

    def array(desc: list[Any]) -> np.ndarray[Any, Any]:
        dtype = DTYPES[desc[0]] if desc[0] in DTYPES else np.dtype(desc[0])
        off, n = base + desc[2], desc[3]
        return np.frombuffer(data[off:off + n], dtype=dtype).reshape(desc[1]).copy()

    adopt = sm.memory.adopt
    sm.slots.clear()
    for s in header["slots"]:
        slot = Slot(s["key"], s["part"], s["dtype"], tuple(s["shape"]), s["offset"], s["count"],
                    adopt(array(s["value"])), OptimizerSpec.parse(s["optimizer"]), s["mode"],
                    tuple(s["compression"]))
        slot.state = {k: adopt(array(v)) for k, v in s["state"].items()}
        slot.step = s["step"]
        slot.workers, slot.staleness = s["workers"], s["staleness"]
        slot.sync_step = s["sync_step"]
        slot.worker_steps = {int(w): int(n) for w, n in s["worker_steps"]}
        for step, w, g in s["pending"]:
            slot.pending.setdefault(int(step), {})[int(w)] = [array(g)]
        sm.slots[(slot.key, slot.part)] = slot
    sm.tables.clear()
    for t in header["tables"]:
        spec = TableSpec.parse(t["spec"])
        table = Table(spec)
        n = t["num_slots"]
        table.index.restore(array(t["ids"]), array(t["slots"]), n, array(t["free"]))
        table.reserve(n)
        table.values[:n] = array(t["values"])
        table.steps[:n] = array(t["steps"])
        for k, v in t["state"].items():
            table.state[k][:n] = array(v)
        sm.tables[spec.name] = table
    sm.sessions.load_wire(header["sessions"])
    sm.dropped = {int(w) for w in header.get("dropped", ())}
    sm.applied_index = header["applied_index"]
