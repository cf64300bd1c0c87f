"""pserver.tables and the table commands of the shard state machine."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from pserver.kernels import reference
from pserver.protocol.errors import InvalidArgument, KeyNotFound, ShapeMismatch, WrongShard
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine
from pserver.tables import Table, TableSpec


def _table(**opts: Any) -> Table:
    return Table(TableSpec.parse({"table": "emb", "dim": 4, **opts}))


def test_rows_never_pushed_read_as_their_initial_value_without_being_created() -> None:
    t = _table(init=["normal", 0.1])
    ids = np.array([3, 2**63, 3], np.uint64)
    first = t.pull(ids)
    np.testing.assert_array_equal(first[0], first[2])
    assert len(t) == 0  # a read creates nothing
    np.testing.assert_array_equal(t.pull(ids), first)


def test_repeated_ids_in_one_push_are_summed_before_one_update() -> None:
    t = _table(optimizer={"name": "sgd", "lr": 0.5})
    ids = np.array([7, 8, 7], np.uint64)
    grads = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]], np.float32)
    t.push(ids, grads)
    np.testing.assert_array_equal(t.pull(np.array([7, 8], np.uint64)),
                                  [[-2.0] * 4, [-1.0] * 4])
    assert len(t) == 2


def test_slots_and_steps_follow_first_appearance_with_repeats_of_old_and_new_ids() -> None:
    """A push that repeats rows (old ones and ones it creates) maps ids to slots as
    if its distinct ids were inserted in first-appearance order, counts one step
    per distinct row, and sums the repeats: a dict model of all three."""
    t = _table(optimizer={"name": "sgd", "lr": 1.0})
    rng = np.random.default_rng(11)
    model_slots: dict[int, int] = {}
    model_steps: dict[int, int] = {}
    model_values: dict[int, np.ndarray] = {}
    for _ in range(6):
        ids = rng.integers(0, 30, rng.integers(1, 25)).astype(np.uint64)
        grads = rng.integers(-3, 4, (ids.size, 4)).astype(np.float32)
        t.push_blocks(ids, [grads[:5], grads[5:]])
        summed: dict[int, np.ndarray] = {}
        for i, g in zip(ids.tolist(), grads, strict=True):
            model_slots.setdefault(i, len(model_slots))
            summed[i] = summed.get(i, np.zeros(4, np.float32)) + g
        for i, g in summed.items():
            model_steps[i] = model_steps.get(i, 0) + 1
            model_values[i] = model_values.get(i, np.zeros(4, np.float32)) - g
    held, slots = t.index.items()
    assert dict(zip(held.tolist(), slots.tolist(), strict=True)) == model_slots
    for i, slot in model_slots.items():
        assert t.steps[slot] == model_steps[i]
    probe = np.array(sorted(model_slots), np.uint64)
    np.testing.assert_array_equal(t.pull(probe), [model_values[i] for i in probe.tolist()])


def test_adagrad_is_the_default_and_follows_the_reference_per_row() -> None:
    t = _table(init=["uniform", -1, 1])
    rng = np.random.default_rng(0)
    ids = np.array([1, 2], np.uint64)
    want = t.pull(ids)
    acc = np.zeros_like(want)
    for step in range(1, 6):
        g = rng.standard_normal((2, 4)).astype(np.float32)
        t.push(ids, g)
        for r in range(2):
            reference.adagrad_step(want[r], g[r], acc[r], step=step, lr=0.01, lr_decay=0.0,
                                   weight_decay=0.0, eps=1e-10)
    np.testing.assert_allclose(t.pull(ids), want, rtol=1e-5, atol=1e-6)
    assert t.spec.optimizer.name == "adagrad"


def test_tables_grow_past_their_first_allocation_and_keep_rows() -> None:
    t = _table(optimizer={"name": "sum"})
    ids = np.arange(5000, dtype=np.uint64)
    t.push(ids, np.ones((5000, 4), np.float32))
    t.push(ids[:10], np.ones((10, 4), np.float32))
    got = t.pull(ids)
    np.testing.assert_array_equal(got[:10], 2.0)
    np.testing.assert_array_equal(got[10:], 1.0)
    assert t.capacity >= 5000


@pytest.mark.parametrize("opts", [
    {"dim": 0}, {"dim": 2**20}, {"dtype": "int32"}, {"init": ["uniform", 1, 0]},
    {"init": ["normal"]}, {"init": ["xavier", 1]}, {"optimizer": {"name": "rmsprop"}},
    {"table": ""},
], ids=lambda o: next(iter(o)))
def test_bad_table_specs_are_refused(opts: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        TableSpec.parse({"table": "emb", "dim": 4, **opts})


def test_the_state_machine_creates_checks_and_owns_rows() -> None:
    sm = ShardStateMachine(1, ShardMap.uniform(4))
    spec = sm.check_create_table({"table": "emb", "dim": 4})
    assert sm.apply_create_table(spec) is True
    assert sm.apply_create_table(sm.check_create_table({"table": "emb", "dim": 4})) is False
    with pytest.raises(ShapeMismatch):
        sm.check_create_table({"table": "emb", "dim": 5})
    with pytest.raises(KeyNotFound):
        sm.table("other")
    from pserver import kernels

    ids = np.arange(64, dtype=np.uint64)
    owners = kernels.shard_of_ids(ids, 0, 4)
    mine, theirs = ids[owners == 1], ids[owners != 1]
    assert sm.check_rows("emb", mine) is sm.tables["emb"]
    with pytest.raises(WrongShard):
        sm.check_rows("emb", theirs)
    before = sm.stats()
    sm.apply_push_rows(sm.tables["emb"], mine, np.ones((mine.size, 4), np.float32))
    after = sm.stats()
    assert after["rows"] == mine.size and after["tables"] == 1
    assert after["bytes"] > before["bytes"]


@pytest.mark.parametrize("init", [[["normal"], 1], [{"a": 1}], "normal", []], ids=repr)
def test_malformed_initializers_are_invalid_arguments(init: Any) -> None:
    with pytest.raises(InvalidArgument):
        TableSpec.parse({"table": "emb", "dim": 4, "init": init})


@pytest.mark.parametrize("repeats", [False, True], ids=["distinct", "repeated-ids"])
@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "sum"])
def test_a_push_in_blocks_of_rows_equals_the_push_of_the_joined_rows(
        optimizer: str, repeats: bool) -> None:
    """Frames of a message are applied where they lie (no join) unless ids repeat;
    either way every row ends bit for bit as after one push of the whole array."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50 if repeats else 2**63, 200).astype(np.uint64)
    if not repeats:
        ids = np.unique(ids)
        rng.shuffle(ids)
    grads = rng.standard_normal((ids.size, 4)).astype(np.float32)
    whole, blocked = _table(optimizer={"name": optimizer}), _table(optimizer={"name": optimizer})
    cuts = [0, 1, 60, 61, ids.size]
    for _ in range(3):
        whole.push(ids, grads)
        blocked.push_blocks(ids, [grads[a:b] for a, b in itertools.pairwise(cuts)])
    probe = np.unique(ids)
    np.testing.assert_array_equal(blocked.pull(probe), whole.pull(probe))
    np.testing.assert_array_equal(blocked.steps, whole.steps)


def test_blocks_that_do_not_add_up_to_the_ids_are_refused() -> None:
    t = _table()
    ids = np.array([1, 2, 3], np.uint64)
    for blocks in ([np.ones((2, 4), np.float32)],
                   [np.ones((2, 4), np.float32), np.ones((1, 3), np.float32)],
                   [np.ones((1, 4), np.float32), np.ones((2, 4), np.float64)]):
        with pytest.raises(ShapeMismatch):
            t.check_push(ids, blocks)
    t.check_push(ids, [np.ones((1, 4), np.float32), np.ones((2, 4), np.float32)])


def test_a_push_rows_message_gives_one_block_per_frame_of_whole_rows() -> None:
    """The shard reads row gradients where the frames hold them (views, no copy);
    frames cut inside a row are joined into one block."""
    from pserver.apply import rows_request
    from pserver.protocol.schema import Header, Kind, TensorMeta

    ids = np.arange(5, dtype=np.uint64)
    grads = np.arange(20, dtype=np.float32).reshape(5, 4)
    raw = memoryview(grads.reshape(-1).view(np.uint8))

    def request(frames: list[memoryview]) -> list[np.ndarray]:
        header = Header(Kind.PUSH_ROWS, 1, tensors=(
            TensorMeta("emb", 0, "uint64", (5,), 0, 5, 1),
            TensorMeta("emb", 0, "float32", (5, 4), 0, 20, len(frames))), opts={"table": "emb"})
        name, got_ids, blocks = rows_request(header, [[memoryview(ids.view(np.uint8))], frames],
                                             with_grads=True)
        assert name == "emb"
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(np.concatenate(blocks), grads)
        return blocks

    whole_rows = request([raw[:32], raw[32:]])  # rows 0-1 and 2-4
    assert [b.shape for b in whole_rows] == [(2, 4), (3, 4)]
    assert all(np.shares_memory(b, grads) for b in whole_rows)
    cut_in_a_row = request([raw[:24], raw[24:]])
    assert [b.shape for b in cut_in_a_row] == [(5, 4)]
    assert not np.shares_memory(cut_in_a_row[0], grads)
