"""One replica's replicated log: Raft core, WAL, Raft snapshot file, state machine.

Owns what a replica keeps on disk and the order of work on each Raft ``Ready``
(etcd's RawNode): persist the snapshot, then the entries and hard state with one
fsync, then send the messages, then apply the committed entries' commands to
the shard state machine (``apply.apply_command``), then ``advance``. Also
recovery at start (snapshot into the state machine, WAL entries after it into
the core) and compaction (snapshot the state, ``WAL.compact``). No sockets and
no clock (time is read only to log how long a compaction took): the replica
driver (``replica.py``) and the deterministic simulation in the tests run this
same code; the driver has the snapshot file written by a thread
(``save_in_background``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pserver.protocol.schema import Limits

from . import commands, snapshot
from .apply import Outcome, apply_command
from .commands import Command
from .raft import Config, Entry, HardState, Message, MsgType, RaftCore, Role, Snapshot
from .shard import ShardStateMachine
from .wal import WAL, WALError, atomic_write

log = logging.getLogger(__name__)

RAFT_SNAPSHOT = "raft.snap"
_LEADER_EARLY = (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP)
_SNAP_MAGIC = b"PSRAFT1\n"
_SNAP_HEAD = struct.Struct("<QQ")  # index, term

OutcomeCallback = Callable[[Command, list[Outcome]], None]


def save_raft_snapshot(path: Path, snap: Snapshot) -> None:
    atomic_write(path, _SNAP_MAGIC + _SNAP_HEAD.pack(snap.index, snap.term) + snap.data)


def load_raft_snapshot(path: Path) -> Snapshot | None:
    if not path.exists():
        return None
    raw = path.read_bytes()
    if not raw.startswith(_SNAP_MAGIC):
        raise snapshot.SnapshotError(f"{path} is not a Raft snapshot of pserver")
    index, term = _SNAP_HEAD.unpack_from(raw, len(_SNAP_MAGIC))
    return Snapshot(index, term, raw[len(_SNAP_MAGIC) + _SNAP_HEAD.size:])


def _lock_dir(directory: Path) -> int:
    """Hold an exclusive lock on ``directory/LOCK`` for the life of the process (the
    kernel drops it when the process dies, even by SIGKILL): two processes on one
    log would corrupt it."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise WALError(f"{directory} is in use by another replica process") from None
    return fd


class ReplicatedLog:
    """The log of one replica in ``directory`` (``wal/`` and ``raft.snap``), applying
    to ``state``. ``cfg`` and ``rng`` configure the Raft core."""

    def __init__(self, directory: Path, state: ShardStateMachine, cfg: Config,
                 rng: random.Random, limits: Limits, *, workers: int = 1,
                 staleness: int = 0, shard_id: int = 0,
                 snapshot_log_bytes: int = 256 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_dir(self.dir)
        self.state = state
        self.limits = limits
        self.workers, self.staleness = workers, staleness
        self.shard_id = shard_id
        self.snap_path = self.dir / RAFT_SNAPSHOT
        self.before_sync: Callable[[], None] | None = None  # the simulation's crash point
        self.on_apply: Callable[[Entry], None] | None = None  # sees every applied entry
        self.unreadable_entries = 0  # committed entries skipped as unreadable
        self.wal, self.core = self._recover(cfg, rng)
        self.log_bytes = sum(len(e.data) for e in self.core.log)
        # Replicas under the same load would all compact at the same entry, and a
        # compaction stalls a replica's loop for a while: each replica (and shard)
        # compacts at its own point between 1x and 1.5x the setting instead, so the
        # others keep committing meanwhile.
        self.compact_at = snapshot_log_bytes * (8 + (3 * shard_id + self.core.id) % 5) // 8
        # The replica process writes the snapshot file on a thread of its own, so its
        # loop keeps answering (a leader stalled for the write of a 16 MiB snapshot on
        # a loaded host lost its followers' votes); the simulation writes it in line.
        self.save_in_background = False
        self._saving: threading.Thread | None = None
        self._save_error: OSError | None = None
        # (index, term, when it started, how long it held the loop) of the compaction
        # whose snapshot file is being written; its bytes once written
        self._compacting: tuple[int, int, float, float] | None = None
        self._saved: bytes | None = None

    def _recover(self, cfg: Config, rng: random.Random) -> tuple[WAL, RaftCore]:
        """Rebuild from disk: the Raft snapshot into the state machine, then the WAL's
        hard state and the entries after the snapshot into the core (committed ones
        are applied again by the first Ready)."""
        snap = load_raft_snapshot(self.snap_path)
        wal, rec = WAL.open(self.dir / "wal")
        snap_index = snap.index if snap else 0
        if rec.base_index > snap_index:
            wal.close()
            raise WALError(f"{self.dir}: the log was compacted up to entry {rec.base_index} but "
                           f"the snapshot holds only {snap_index}; refusing to start")
        if snap is not None:
            snapshot.decode(snap.data, self.state, str(self.snap_path))
            self.state.applied_index = snap.index
        entries = [e for e in rec.entries if e.index > snap_index]
        if entries and entries[0].index != snap_index + 1:
            entries = []  # the snapshot came from a leader past the end of this log
        last = entries[-1].index if entries else snap_index
        hs = rec.hard_state
        hs = HardState(hs.term, hs.vote, max(snap_index, min(hs.commit, last)))
        core = RaftCore(cfg, rng, hs, entries, applied=snap_index, snapshot=snap)
        log.info("shard %d replica %d: recovered term %d, snapshot at %d, %d entries, "
                 "commit %d", self.shard_id, cfg.id - 1, hs.term, snap_index, len(entries),
                 hs.commit)
        return wal, core

    def drive(self, send: Callable[[Message], None],
              on_outcome: OutcomeCallback) -> list[tuple[bytes, int]]:
        """Handle every Ready until the core is quiet; returns the ReadIndex
        confirmations ``(context, index)`` it carried. Raises ``WALError`` when the
        disk fails: nothing unpersisted has been sent or applied then."""
        core = self.core
        reads: list[tuple[bytes, int]] = []
        while core.has_ready():
            rd = core.ready()
            # A leader's appends go out before its own fsync, so the followers write
            # while it writes (thesis §10.2.1): it counts itself in the quorum only
            # once its entries are on disk (``advance``), and no acknowledgement is
            # read before this loop returns. Every other message waits for the disk.
            leading = core.role == Role.LEADER and rd.snapshot is None
            later = []
            for m in rd.messages:
                if leading and m.type in _LEADER_EARLY:
                    send(m)
                else:
                    later.append(m)
            if rd.snapshot is not None:
                self._install(rd.snapshot, rd.hard_state or HardState(core.term, core.vote,
                                                                      core.commit))
            if rd.entries or rd.hard_state is not None:
                self.wal.append(rd.entries, rd.hard_state)
                if rd.must_sync:
                    if self.before_sync is not None:
                        self.before_sync()
                    self.wal.sync()
                self.log_bytes += sum(len(e.data) for e in rd.entries)
            for m in later:
                send(m)
            for e in rd.committed:
                if e.data:
                    for cmd in self._commands(e):
                        on_outcome(cmd, apply_command(
                            self.state, cmd, self.limits, workers=self.workers,
                            staleness=self.staleness, shard=self.shard_id))
                self.state.applied_index = e.index
                if self.on_apply is not None:
                    self.on_apply(e)
            reads.extend(rd.reads)
            core.advance(rd)
        return reads

    def _commands(self, e: Entry) -> list[Command]:
        """The commands of a committed entry. One that cannot be read (a Python
        replica never proposes one: it would come from a foreign or broken peer) is
        skipped, the same way on every replica that has it, rather than stop the
        replica at every start as it is applied again."""
        try:
            return commands.decode(e.data)
        except commands.CommandError as exc:
            self.unreadable_entries += 1
            log.error("shard %d replica %d: committed entry %d (term %d) skipped: %s",
                      self.shard_id, self.core.id - 1, e.index, e.term, exc)
            return []

    def _install(self, snap: Snapshot, hs: HardState) -> None:
        """A snapshot from the leader replaces this replica's state and log."""
        self._settle()  # one writer of the snapshot file at a time, in order
        save_raft_snapshot(self.snap_path, snap)
        snapshot.decode(snap.data, self.state, "snapshot from the leader")
        self.state.applied_index = snap.index
        self.wal.compact(snap.index, snap.term, [], hs)
        self.log_bytes = 0
        log.info("shard %d replica %d: installed the leader's snapshot at entry %d "
                 "(%d bytes)", self.shard_id, self.core.id - 1, snap.index, len(snap.data))

    def maybe_compact(self) -> None:
        """Compact once the log holds ``compact_at`` bytes (or finish a compaction whose
        snapshot file is written); otherwise delete one segment an earlier compaction
        left dead (one per call: see ``WAL.tidy``)."""
        if self._compacting is not None:
            if self._saving is None or not self._saving.is_alive():
                self._finish_compaction()
        elif self.log_bytes > self.compact_at and self.core.applied > self.core.snap_index:
            self.compact(wait=not self.save_in_background)
        else:
            self.wal.tidy()

    def compact(self, wait: bool = True) -> None:
        """Snapshot the state machine at the applied index; drop the log up to there.
        Unless ``wait``, this thread only copies the state (``snapshot.capture``): a
        thread encodes it and writes the snapshot file, and a later ``maybe_compact``
        drops the entries and cuts the WAL once that file is durable. Until then a
        restart recovers from the old snapshot and the whole log."""
        self._settle()
        core = self.core
        index = core.applied
        if index <= core.snap_index:
            return  # the compaction just finished covered it
        term = core.term_at(index)
        assert term is not None
        started = time.monotonic()
        captured = snapshot.capture(self.state, copy=not wait)
        self._compacting = (index, term, started, time.monotonic() - started)
        if wait:
            self._save(captured, index, term)
            self._compacting = (index, term, started, time.monotonic() - started)
            self._finish_compaction()
        else:
            self._saving = threading.Thread(target=self._save, args=(captured, index, term),
                                            daemon=True, name=f"pserver-snapshot-{self.shard_id}")
            self._saving.start()

    def _save(self, captured: snapshot.Captured, index: int, term: int) -> None:
        try:
            data = captured.encode()
            save_raft_snapshot(self.snap_path, Snapshot(index, term, data))
            self._saved = data
        except OSError as exc:  # raised on the replica's thread by _finish_compaction
            self._save_error = exc

    def _settle(self) -> None:
        """Wait for a snapshot file being written, and finish its compaction."""
        if self._compacting is not None:
            self._finish_compaction()

    def _finish_compaction(self) -> None:
        """The snapshot file is durable: drop the entries it covers and cut the WAL
        behind it (the entries after it, appended meanwhile too, go into the new
        segment)."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        error, self._save_error = self._save_error, None
        data, self._saved = self._saved, None
        assert self._compacting is not None
        (index, _term, started, stalled), self._compacting = self._compacting, None
        if error is not None or data is None:
            raise WALError(f"{self.snap_path}: writing the snapshot failed: {error}")
        core = self.core
        if index <= core.snap_index:
            # A snapshot from the leader replaced the log meanwhile (``_install`` is
            # about to write it over this one and cut the WAL behind it).
            log.info("shard %d replica %d: the snapshot at entry %d is superseded by the "
                     "leader's at %d", self.shard_id, core.id - 1, index, core.snap_index)
            return
        finishing = time.monotonic()
        snap = core.compact(index, data)
        self.log_bytes = sum(len(e.data) for e in core.log)
        self.wal.compact(snap.index, snap.term, core.log,
                         HardState(core.term, core.vote, core.commit))
        now = time.monotonic()
        log.info("shard %d replica %d: log compacted into a snapshot at entry %d (%d bytes) "
                 "in %.0f ms (%.0f ms in the replica's loop: the copy, then %d entries "
                 "moved to the new WAL segment)", self.shard_id, core.id - 1, snap.index,
                 len(snap.data), (now - started) * 1e3, (stalled + now - finishing) * 1e3,
                 len(core.log))

    def close(self) -> None:
        if self._saving is not None:
            self._saving.join()
        self.wal.close()
        os.close(self._lock)
