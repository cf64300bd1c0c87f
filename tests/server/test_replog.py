"""pserver.replog: one replica's log on disk (recovery and its directory lock)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pserver.protocol.schema import Limits
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
