"""pserver.snapshot: the whole shard state machine saved and loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pserver.protocol.frames import split_frames
from pserver.protocol.schema import TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine
from pserver.snapshot import SnapshotError, load, save


def _frames(a: np.ndarray[Any, Any]) -> list[memoryview]:
    return split_frames(np.ascontiguousarray(a).reshape(-1), 1 << 20)


def _machine() -> ShardStateMachine:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    t = TensorMeta("w", 0, "float32", (5,), 0, 5, 1)
    spec, mode = sm.check_init([t], {"optimizer": {"name": "adam", "lr": 0.1}})
    sm.apply_init([t], [_frames(np.arange(5, dtype=np.float32))], spec, mode, ("float16",))
    sm.apply_push([t], [_frames(np.ones(5, np.float32))])
    spec_t = sm.check_create_table({"table": "emb", "dim": 3, "init": ["uniform", -1, 1]})
    sm.apply_create_table(spec_t)
    table = sm.tables["emb"]
    sm.apply_push_rows(table, np.array([7, 9, 7], np.uint64), np.ones((3, 3), np.float32))
    sm.sessions.record(b"client", 4, {"created": [True]})
    return sm


def test_a_saved_shard_loads_back_identical(tmp_path: Path) -> None:
    sm = _machine()
    path = tmp_path / "s.snap"
    save(sm, path)
    other = ShardStateMachine(0, ShardMap.uniform(1))
    load(path, other)
    a, b = sm.slots[("w", 0)], other.slots[("w", 0)]
    assert a.value.tobytes() == b.value.tobytes() and a.step == b.step == 1
    assert {k: v.tobytes() for k, v in a.state.items()} == {
        k: v.tobytes() for k, v in b.state.items()}
    assert b.compression == ("float16",) and b.optimizer == a.optimizer
    ids = np.array([7, 9, 123], np.uint64)
    np.testing.assert_array_equal(sm.tables["emb"].pull(ids), other.tables["emb"].pull(ids))
    # the restored row index hands out the next slot as the original would
    new = np.array([55], np.uint64)
    assert sm.tables["emb"].index.lookup_or_insert(new)[0].tolist() == \
        other.tables["emb"].index.lookup_or_insert(new)[0].tolist()
    assert other.sessions.duplicate(b"client", 4) == {"created": [True]}
    assert other.applied_index == sm.applied_index


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_a_damaged_snapshot_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.snap"
    save(_machine(), path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    else:
        data[:4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        load(path, ShardStateMachine(0, ShardMap.uniform(1)))


def test_a_half_done_sync_step_survives_a_restart(tmp_path: Path) -> None:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    t = TensorMeta("s", 0, "float32", (4,), 0, 4, 1)
    spec, mode = sm.check_init([t], {"optimizer": {"name": "sgd", "lr": 1.0}, "mode": "sync"})
    sm.apply_init([t], [_frames(np.zeros(4, np.float32))], spec, mode, workers=2)
    sm.apply_push([t], [_frames(np.full(4, 2.0, np.float32))], {"worker": 0})
    save(sm, tmp_path / "s.snap")
    other = ShardStateMachine(0, ShardMap.uniform(1))
    load(tmp_path / "s.snap", other)
    assert not other.slots[("s", 0)].ready_for(0) and other.slots[("s", 0)].ready_for(1)
    other.apply_push([t], [_frames(np.full(4, 4.0, np.float32))], {"worker": 1})
    np.testing.assert_array_equal(other.slots[("s", 0)].value, np.full(4, -3.0, np.float32))
