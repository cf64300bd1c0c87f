"""pserver.replog: one replica's log on disk (recovery, its directory lock, compaction
with the snapshot file written in the background)."""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from pserver import commands
from pserver import replog as replog_module
from pserver.protocol.schema import Limits, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.raft import Config
from pserver.replog import ReplicatedLog
from pserver.shard import ShardStateMachine
from pserver.wal import WALError


def _open(path: Path) -> ReplicatedLog:
    return ReplicatedLog(path, ShardStateMachine(0, ShardMap.uniform(1)), Config(1, (1,)),
                         random.Random(0), Limits())


def test_a_second_process_on_the_same_log_is_refused(tmp_path: Path) -> None:
    first = _open(tmp_path)
    with pytest.raises(WALError, match="in use"):
        _open(tmp_path)
    first.close()
    _open(tmp_path).close()  # free again once the first is gone


def test_a_single_replica_log_commits_applies_and_recovers(tmp_path: Path) -> None:
    log = _open(tmp_path)
    for _ in range(20):
        log.core.tick()
        log.drive(lambda m: None, lambda c, o: None)
    assert log.core.role.value == "leader"
    index = log.core.propose(b"")
    log.drive(lambda m: None, lambda c, o: None)
    assert log.core.applied == index
    log.compact()
    log.close()
    again = _open(tmp_path)
    assert again.core.snap_index == index and again.core.commit == index
    again.close()


def test_one_fsync_per_batch_the_commit_index_rides_on_the_next(tmp_path: Path) -> None:
    """New entries (and a new term or vote) are synced before anything is sent or
    applied; a Ready that only moves the commit index is not synced by itself (as
    etcd's MustSync). A group of one proposing one entry at a time: one fsync each,
    not two. After a crash the recovered commit index may lag; the entries do not."""
    log = _open(tmp_path)
    for _ in range(20):
        log.core.tick()
        log.drive(lambda m: None, lambda c, o: None)
    assert log.core.role.value == "leader"
    before = log.wal.syncs
    for _ in range(10):
        index = log.core.propose(b"")
        log.drive(lambda m: None, lambda c, o: None)
        assert log.core.applied == index
    assert log.wal.syncs - before == 10
    log.close()  # a crash would keep the synced entries; the commit index may lag
    again = _open(tmp_path)
    assert again.core.last_index == index
    again.close()


def _leader(tmp_path: Path) -> ReplicatedLog:
    log = _open(tmp_path)
    for _ in range(20):
        log.core.tick()
        log.drive(lambda m: None, lambda c, o: None)
    assert log.core.role.value == "leader"
    return log


def test_a_committed_entry_that_is_no_command_batch_is_skipped_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Python replica never proposes such an entry; one from a foreign or broken
    peer is logged and skipped (the same on every replica that has it), instead of
    stopping the replica at every start as the entry is applied again."""
    garbage = [b"\xde\xad\xbe\xef" * 4,  # a length past the end
               struct.pack("<I", 1) + msgpack.packb(5),  # not a list
               struct.pack("<I", 3) + msgpack.packb([[7]]),  # a command without fields
               struct.pack("<I", 6) + msgpack.packb([["zz", 1]])]  # an unknown command
    applied: list[commands.Command] = []
    log = _leader(tmp_path)
    for data in garbage:
        log.core.propose(data)
    index = log.core.propose(commands.encode([commands.Command(commands.DROP_WORKER,
                                                               worker=3)]))
    with caplog.at_level(logging.ERROR, logger="pserver.replog"):
        log.drive(lambda m: None, lambda c, o: applied.append(c))
    assert log.core.applied == index and log.state.applied_index == index
    assert log.unreadable_entries == len(garbage)
    assert [(c.op, c.worker) for c in applied] == [(commands.DROP_WORKER, 3)]
    assert sum("skipped" in r.getMessage() for r in caplog.records) == len(garbage)
    log.close()
    again = _leader(tmp_path)  # the entries are applied again at start: still no stop
    assert again.core.applied >= index and again.unreadable_entries == len(garbage)
    again.close()


def _leader_with_a_key(path: Path) -> tuple[ReplicatedLog, int]:
    """A group of one that leads, holds key ``w`` (float32, 4 zeros) and has applied
    an entry after it; returns the log and that entry's index."""
    log = _open(path)
    for _ in range(20):
        log.core.tick()
        log.drive(lambda m: None, lambda c, o: None)
    t = TensorMeta("w", 0, "float32", (4,), 0, 4, 1)
    spec, mode = log.state.check_init([t], {"optimizer": {"name": "sum"}})
    log.state.apply_init([t], [[memoryview(np.zeros(4, np.float32).tobytes())]], spec, mode)
    index = log.core.propose(b"")
    log.drive(lambda m: None, lambda c, o: None)
    assert log.core.applied == index
    return log, index


def _value(log: ReplicatedLog) -> list[float]:
    return [float(x) for x in log.state.slots[("w", 0)].value]


def test_a_background_compaction_snapshots_the_state_as_it_was_when_it_began(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's thread only copies the state; the snapshot file is written by
    another thread, and the WAL is cut only once that file is durable. Changes
    made meanwhile are not in the snapshot, and entries appended meanwhile are
    kept in the new WAL segment."""
    log, index = _leader_with_a_key(tmp_path)
    written = threading.Event()
    real_save = replog_module.save_raft_snapshot

    def slow_save(path: Path, snap: Any) -> None:
        assert written.wait(10)
        real_save(path, snap)

    monkeypatch.setattr(replog_module, "save_raft_snapshot", slow_save)
    log.save_in_background = True
    log.log_bytes = log.compact_at + 1
    log.maybe_compact()  # starts the compaction
    log.state.slots[("w", 0)].value[:] = 5.0  # after the copy: not in the snapshot
    later = log.core.propose(b"")
    log.drive(lambda m: None, lambda c, o: None)
    log.maybe_compact()  # the file is not written yet: nothing changes
    assert log.core.snap_index == 0 and not (tmp_path / "raft.snap").exists()
    written.set()
    deadline = time.monotonic() + 10
    while log.core.snap_index != index:
        assert time.monotonic() < deadline, "the compaction did not finish"
        time.sleep(0.01)
        log.maybe_compact()
    log.close()
    again = _open(tmp_path)
    assert again.core.snap_index == index and _value(again) == [0.0] * 4
    assert [e.index for e in again.core.log] == [later]  # replayed from the new segment
    again.close()


def test_a_failed_background_snapshot_leaves_the_log_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, index = _leader_with_a_key(tmp_path)

    def failing_save(path: Path, snap: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(replog_module, "save_raft_snapshot", failing_save)
    log.save_in_background = True
    log.compact(wait=False)
    assert log._saving is not None
    log._saving.join(10)  # the thread failed; the replica's thread learns it next
    with pytest.raises(WALError, match="writing the snapshot failed"):
        log.maybe_compact()
    assert log.core.snap_index == 0  # nothing dropped
    log.close()
    again = _open(tmp_path)
    assert again.core.snap_index == 0 and again.core.commit == index
    again.close()
