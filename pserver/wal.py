"""The write-ahead log: Raft's entries and hard state on disk.

Owns one replica's log directory: segment files of length-prefixed records,
each with a CRC32C, appended in order and made durable by ``sync`` (one fsync
serves every record appended since the last: group commit). Record kinds:
ENTRY (term, index, data), STATE (term, vote, commit) and BASE (index, term: the
entries up to there live in a snapshot). Replaying the records in order
rebuilds the log: an ENTRY whose index is at or below the last one cuts the log
there first (Raft replaced a conflicting suffix), a BASE empties the log and
sets where it starts, and the last STATE wins. ``compact`` bounds the log once
a snapshot covers it: it writes a new segment that starts with a BASE record
and holds the entries after it; the older segments are then recycled (up to
``keep_free`` of them) or deleted.

Recycling: a dead segment is renamed to ``*.free`` and later renamed to the next
segment and overwritten from its start, as databases do with their logs.
Writing over a file's existing blocks and cached pages costs about 10 ms per
16 MiB record with its fsync here, against about 17 ms for a fresh file (and
no unlink of a 64 MiB file). Each record's header names its segment, and its
CRC covers that number, so the old records after the new ones are never taken
for part of the log. A segment is truncated to its records when the log moves
on to the next one, so only the last segment can hold old records at its end.

Recovery cuts a torn tail (a last record that is incomplete or fails its CRC,
or an old record of a recycled segment, with nothing valid after it) and
refuses to open a log with a bad record followed by a valid one. A failed
write or fsync stops the log: every later call raises, so nothing unpersisted
is ever acknowledged; a full disk raises ``WALFull`` (retryable once space is
freed and the replica restarts).
Durable file replacement (write, fsync, rename, fsync the directory) is
``atomic_write``. May import ``pserver.raft.types``; no sockets or threads.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from pserver.raft.types import Entry, HardState, data_parts

log = logging.getLogger(__name__)

# payload length, crc32c(kind + segment + payload), kind, segment number
_HEADER = struct.Struct("<IIBQ")
_SEGMENT = struct.Struct("<Q")
_SEGMENT_AT = 9  # where the segment number sits in the header
_ENTRY = struct.Struct("<QQ")  # term, index; data follows
_STATE = struct.Struct("<QQQ")  # term, vote, commit
_BASE = struct.Struct("<QQ")  # index, term
ENTRY, STATE, BASE = 1, 2, 3
SEGMENT_BYTES = 64 << 20
KEEP_FREE = 4  # dead segments kept for reuse
MAX_RECORD = 1 << 31


class WALError(Exception):
    """The log cannot be used: corrupt on disk, or a write/fsync failed."""


class WALFull(WALError):
    """The disk is full: nothing was acknowledged; retry after freeing space."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file,
    never a mix: write a temporary file, fsync it, rename it, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_CRC_PIECE = 1 << 20


def _crc(kind: int, segment: int, *parts: bytes | memoryview) -> int:
    """crc32c of the kind byte, the segment number and the payload, given as
    consecutive parts. google-crc32c
    takes only ``bytes``: another buffer (an entry kept as a view of the message it came
    in) goes through in 1 MiB pieces copied to ``bytes`` in cache, not as one copy."""
    crc = google_crc32c.value(bytes([kind]) + _SEGMENT.pack(segment))
    for part in parts:
        if isinstance(part, bytes):
            crc = google_crc32c.extend(crc, part)
            continue
        view = memoryview(part).cast("B")
        for i in range(0, len(view), _CRC_PIECE):
            crc = google_crc32c.extend(crc, bytes(view[i:i + _CRC_PIECE]))
    return crc  # type: ignore[no-any-return]


def record_parts(kind: int, segment: int, *payload: bytes | memoryview) -> list[
        bytes | memoryview]:
    """One record of segment ``segment`` as the pieces to write one after the other:
    its header, then the payload's parts, never joined (an entry's tensors are not
    copied again)."""
    size = sum(len(p) for p in payload)
    return [_HEADER.pack(size, _crc(kind, segment, *payload), kind, segment), *payload]


@dataclass
class Recovered:
    """What the log held: the last hard state and the entries after ``base_index``
    (entry ``base_index + 1`` first; 0 when nothing was compacted)."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    base_index: int = 0
    base_term: int = 0


def _segment_name(seq: int) -> str:
    return f"{seq:016x}.wal"


def _free_segments(directory: Path, keep: int) -> list[Path]:
    """The recyclable files of ``directory``, newest first; those beyond ``keep``
    are deleted."""
    free = sorted((p for p in directory.iterdir() if p.suffix == ".free"), reverse=True)
    for p in free[keep:]:
        p.unlink(missing_ok=True)
    return free[:keep]


class WAL:
    """An open log directory; use ``WAL.open``."""

    def __init__(self, directory: Path, seq: int, segment_bytes: int,
                 keep_free: int = KEEP_FREE) -> None:
        self.dir = directory
        self.seq = seq
        self.segment_bytes = segment_bytes
        self.keep_free = keep_free
        self._free = _free_segments(directory, keep_free)  # to reuse, newest first
        self._fh: BinaryIO = open(self.dir / _segment_name(seq), "ab")  # noqa: SIM115
        self._size = self._fh.tell()
        self._recycled = False  # the current segment may hold old records after _size
        self.synced_size = self._size  # bytes of the current segment known durable
        self._dirty = False
        self._failed: BaseException | None = None
        self._stale: list[Path] = []  # segments a compaction left dead (``tidy``)
        self.syncs = 0

    @classmethod
    def open(cls, directory: str | Path, segment_bytes: int = SEGMENT_BYTES,
             keep_free: int = KEEP_FREE) -> tuple[WAL, Recovered]:
        """Open (creating) ``directory``; return the log and what it recovered.
        ``keep_free``: how many dead segments to keep for reuse."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        segments = sorted(p for p in d.iterdir() if p.suffix == ".wal")
        recovered = Recovered()
        for i, seg in enumerate(segments):
            _replay(seg, recovered, last=i == len(segments) - 1)
        seq = int(segments[-1].stem, 16) if segments else 0
        wal = cls(d, seq, segment_bytes, keep_free)
        if not segments:
            fsync_dir(d)
        return wal, recovered

    # -- writing -------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """A write or fsync failed: the log takes no more records."""
        return self._failed is not None

    def _check(self) -> None:
        if self._failed is not None:
            raise WALError(f"the log stopped after a failed write: {self._failed}")

    def _write(self, kind: int, *payload: bytes | memoryview) -> None:
        """Append one record."""
        self._check()
        size = _HEADER.size + sum(len(p) for p in payload)
        try:
            if self._size + size > self.segment_bytes and self._size:
                self._rotate()
            for p in record_parts(kind, self.seq, *payload):
                self._fh.write(p)
        except OSError as exc:
            self._fail(exc)
        self._size += size
        self._dirty = True

    def _rotate(self) -> None:
        """Start a new segment: make the current one durable (cut to its records),
        then create the next, reusing a dead segment's file when there is one."""
        self._fh.flush()
        if self._recycled:
            self._fh.truncate(self._size)
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.seq += 1
        path = self.dir / _segment_name(self.seq)
        if self._free:
            os.replace(self._free.pop(0), path)
            self._fh = open(path, "r+b")  # noqa: SIM115 - overwritten from its start
        else:
            self._fh = open(path, "ab")  # noqa: SIM115
        self._recycled = bool(self._fh.seek(0, os.SEEK_END))
        self._fh.seek(0)
        self._size = self.synced_size = 0
        fsync_dir(self.dir)

    def _fail(self, exc: OSError) -> None:
        self._failed = exc
        if exc.errno == errno.ENOSPC:
            raise WALFull(f"no space left for the log in {self.dir}") from exc
        raise WALError(f"writing the log in {self.dir} failed: {exc}") from exc

    def append(self, entries: Sequence[Entry] = (), hard_state: HardState | None = None) -> None:
        """Buffer records for ``entries`` (an index at or below the last one replaces
        the log from there on) and ``hard_state``; durable only after ``sync``."""
        for e in entries:
            if len(e.data) > MAX_RECORD:
                raise WALError(f"entry {e.index} of {len(e.data)} bytes is too large")
            self._write(ENTRY, _ENTRY.pack(e.term, e.index), *data_parts(e.data))
        if hard_state is not None:
            hs = hard_state
            self._write(STATE, _STATE.pack(hs.term, hs.vote, hs.commit))

    def sync(self) -> None:
        """fsync what ``append`` buffered: after it returns, the records survive a crash."""
        self._check()
        if not self._dirty:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._fail(exc)
        self._dirty = False
        self.synced_size = self._size
        self.syncs += 1

    def compact(self, index: int, term: int, keep: Sequence[Entry],
                hard_state: HardState) -> None:
        """A snapshot now covers the log up to entry ``index`` (of ``term``): start a
        new segment holding a BASE record, the entries ``keep`` after it and the hard
        state, make it durable, then delete every older segment."""
        self._check()
        old = self.seq
        try:
            if self._size:
                self._rotate()
            self._write(BASE, _BASE.pack(index, term))
            self.append(keep, hard_state)
            self.sync()
        except OSError as exc:
            self._fail(exc)
        # The old segments are dead now; ``tidy`` recycles or deletes them, one per
        # call (an unlink of a 64 MiB segment takes ~20 ms, and a replica's loop
        # must keep its heartbeats going). Newest first: a crash part way leaves a
        # prefix of them, which replays (the new segment's BASE then resets the log).
        self._stale = sorted((p for p in self.dir.iterdir() if p.suffix == ".wal"
                              and int(p.stem, 16) <= old and int(p.stem, 16) != self.seq),
                             reverse=True)

    def tidy(self) -> bool:
        """Recycle (rename to ``*.free``) or delete the newest segment a compaction left
        dead; False when none is left."""
        if not self._stale:
            return False
        try:
            dead = self._stale.pop(0)
            if len(self._free) < self.keep_free:
                free = dead.with_suffix(".free")
                os.replace(dead, free)
                self._free.append(free)
            else:
                dead.unlink(missing_ok=True)
            if not self._stale:
                fsync_dir(self.dir)
        except OSError as exc:
            log.warning("%s: recycling a compacted log segment failed: %s", self.dir, exc)
            self._stale.clear()
        return True

    def close(self) -> None:
        if not self._fh.closed:
            if self._failed is None:
                if self._recycled:  # the old records after ours: not for the next open
                    self._fh.flush()
                    self._fh.truncate(self._size)
                    self._dirty = True
                self.sync()
            try:
                self._fh.close()
            except OSError:
                if self._failed is None:
                    raise
                # A failed log's buffered bytes cannot be written either; they were
                # never acknowledged, and recovery cuts whatever part of them landed.


def _replay(path: Path, into: Recovered, last: bool) -> None:
    data = path.read_bytes()
    segment = int(path.stem, 16)
    pos = 0
    while pos < len(data):
        end = _record_end(data, pos, segment)
        if end is None:  # bad or incomplete record at pos
            rest = data[pos:]
            torn = last and _nothing_valid_after(data, pos, segment)
            if not torn:
                raise WALError(
                    f"{path}: corrupt record at byte {pos} with more data after it; refusing "
                    "to start (this is not a torn write: restore the replica from a peer)")
            if _record_end(data, pos, _segment_of(data, pos)) is not None:
                log.info("%s: %d bytes of a recycled segment's old records after byte %d "
                         "cut", path, len(rest), pos)
            else:
                log.warning("%s: cutting a torn tail of %d bytes at byte %d", path, len(rest),
                            pos)
            with open(path, "r+b") as fh:
                fh.truncate(pos)
                fh.flush()
                os.fsync(fh.fileno())
            return
        kind = _HEADER.unpack_from(data, pos)[2]
        payload = data[pos + _HEADER.size:end]
        if kind == ENTRY:
            term, index = _ENTRY.unpack_from(payload)
            entry = Entry(term, index, payload[_ENTRY.size:])
            base = into.base_index
            if index > base + len(into.entries) + 1 or index <= base:
                raise WALError(f"{path}: entry {index} does not follow entry "
                               f"{base + len(into.entries)}")
            del into.entries[index - base - 1:]
            into.entries.append(entry)
        elif kind == BASE:
            into.base_index, into.base_term = _BASE.unpack_from(payload)
            into.entries = []
        elif kind == STATE:
            into.hard_state = HardState(*_STATE.unpack_from(payload))
        else:
            raise WALError(f"{path}: unknown record kind {kind} at byte {pos}")
        pos = end


def _segment_of(data: bytes, pos: int) -> int:
    """The segment number in the header at ``pos`` (-1 if there is none)."""
    if pos + _HEADER.size > len(data):
        return -1
    return int(_SEGMENT.unpack_from(data, pos + _SEGMENT_AT)[0])


def _record_end(data: bytes, pos: int, segment: int) -> int | None:
    """The end of a valid record of ``segment`` at ``pos``, or None."""
    if pos < 0 or pos + _HEADER.size > len(data):
        return None
    length, crc, kind, seg = _HEADER.unpack_from(data, pos)
    end: int = pos + _HEADER.size + length
    if seg != segment or end > len(data) or kind not in (ENTRY, STATE, BASE):
        return None
    if _crc(kind, segment, memoryview(data)[pos + _HEADER.size:end]) != crc:
        return None
    return end


def _nothing_valid_after(data: bytes, pos: int, segment: int) -> bool:
    """A torn tail: no valid record of ``segment`` starts anywhere after ``pos``. A
    record's header holds its segment's number, so only where those 8 bytes occur
    can one start (a recycled segment's megabytes of old records are skipped in C)."""
    mark = _SEGMENT.pack(segment)
    at = data.find(mark, pos + 1 + _SEGMENT_AT)
    while at != -1:
        if _record_end(data, at - _SEGMENT_AT, segment) is not None:
            return False
        at = data.find(mark, at + 1)
    return True
