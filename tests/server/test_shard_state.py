"""Unit tests for pserver.shard.ShardStateMachine (no sockets, no processes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pserver.protocol.errors import InvalidArgument, KeyNotFound, ShapeMismatch, WrongShard
from pserver.protocol.frames import split_frames
from pserver.protocol.schema import KeyRef, TensorMeta, dtype_name
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine

SGD_HALF = {"optimizer": {"name": "sgd", "lr": 0.5}}
SUM = {"optimizer": {"name": "sum"}}


def _meta(key: str, array: np.ndarray[Any, Any], *, nframes: int = 1, part: int = 0,
          dtype: str | None = None, shape: tuple[int, ...] | None = None) -> TensorMeta:
    name = dtype or dtype_name(array.dtype)
    assert name is not None
    return TensorMeta(key, part, name, shape if shape is not None else array.shape, 0,
                      array.size, nframes)


def _frames(array: np.ndarray[Any, Any], frame_bytes: int = 1 << 20) -> list[memoryview]:
    return split_frames(np.ascontiguousarray(array).reshape(-1), frame_bytes)


def _init(sm: ShardStateMachine, arrays: dict[str, np.ndarray[Any, Any]],
          opts: dict[str, Any] | None = None) -> list[bool]:
    """What the server does for an INIT: validate everything, then apply."""
    tensors = [_meta(k, a) for k, a in arrays.items()]
    spec, mode = sm.check_init(tensors, opts or {})
    return sm.apply_init(tensors, [_frames(a) for a in arrays.values()], spec, mode)


def _push(sm: ShardStateMachine, grads: dict[str, np.ndarray[Any, Any]],
          frame_bytes: int = 1 << 20) -> None:
    """What the server does for a PUSH: validate everything, then apply."""
    tensors = []
    data = []
    for k, g in grads.items():
        frames = _frames(g, frame_bytes)
        tensors.append(_meta(k, g, nframes=len(frames)))
        data.append(frames)
    sm.check_push(tensors)
    sm.apply_push(tensors, data)


def _value(sm: ShardStateMachine, key: str, part: int = 0) -> np.ndarray[Any, Any]:
    (slot,) = sm.check_refs([KeyRef(key, part)])
    return slot.value


def _bits(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(a).view(f"u{a.itemsize}")


@pytest.fixture
def sm() -> ShardStateMachine:
    return ShardStateMachine(0, ShardMap.uniform(1))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _key_owned_by(shard_map: ShardMap, owner: int, part: int = 0) -> str:
    return next(f"key-{i}" for i in range(10_000) if shard_map.shard_for(f"key-{i}", part) == owner)


# -- init -------------------------------------------------------------------------


def test_init_creates_the_key_with_a_copy_of_the_data(sm: ShardStateMachine) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert _init(sm, {"w": w}) == [True]
    stored = _value(sm, "w")
    np.testing.assert_array_equal(stored, w.reshape(-1))
    assert not np.shares_memory(stored, w)
    w[:] = -1  # the caller's buffer may be reused at once
    np.testing.assert_array_equal(stored, np.arange(12, dtype=np.float32))
    (slot,) = sm.check_refs([KeyRef("w", 0)])
    assert (slot.dtype, slot.shape, slot.offset, slot.count) == ("float32", (3, 4), 0, 12)
    assert sm.stats()["keys"] == 1
    assert sm.stats()["bytes"] == 48


def test_init_from_several_frames(sm: ShardStateMachine) -> None:
    w = np.arange(100, dtype=np.float64)
    frames = _frames(w, frame_bytes=64)
    assert len(frames) > 1
    t = _meta("w", w, nframes=len(frames))
    spec, mode = sm.check_init([t], {})
    sm.apply_init([t], [frames], spec, mode)
    np.testing.assert_array_equal(_value(sm, "w"), w)


def test_default_optimizer_is_sgd_lr_001(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.ones(2, dtype=np.float32)})
    (slot,) = sm.check_refs([KeyRef("w", 0)])
    wire = slot.optimizer.to_wire()
    assert (wire["name"], wire["lr"], wire["momentum"], wire["weight_decay"]) == (
        "sgd", 0.01, 0.0, 0.0)
    assert slot.mode == "async"


def test_reinit_same_shape_is_a_noop(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)}, SGD_HALF)
    assert _init(sm, {"w": np.full(4, 7.0, dtype=np.float32)}, SUM) == [False]
    np.testing.assert_array_equal(_value(sm, "w"), np.ones(4, dtype=np.float32))
    (slot,) = sm.check_refs([KeyRef("w", 0)])
    assert slot.optimizer.name == "sgd"  # the first init's optimizer stays


def test_reinit_creates_only_the_absent_keys(sm: ShardStateMachine) -> None:
    _init(sm, {"a": np.ones(2, dtype=np.float32)})
    created = _init(sm, {"a": np.zeros(2, dtype=np.float32), "b": np.zeros(3, dtype=np.int64)})
    assert created == [False, True]
    np.testing.assert_array_equal(_value(sm, "a"), [1, 1])
    np.testing.assert_array_equal(_value(sm, "b"), [0, 0, 0])


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(np.ones(5, dtype=np.float32), id="length"),
        pytest.param(np.ones((2, 2), dtype=np.float32), id="same-size-other-shape"),
        pytest.param(np.ones(4, dtype=np.float64), id="dtype"),
    ],
)
def test_reinit_other_shape_raises_and_changes_nothing(sm: ShardStateMachine,
                                                       other: np.ndarray[Any, Any]) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)})
    index = sm.applied_index
    with pytest.raises(ShapeMismatch):
        _init(sm, {"w": other})
    (slot,) = sm.check_refs([KeyRef("w", 0)])
    assert (slot.dtype, slot.shape) == ("float32", (4,))
    np.testing.assert_array_equal(slot.value, np.ones(4, dtype=np.float32))
    assert sm.applied_index == index


def test_reinit_mismatch_in_second_key_creates_no_key(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)})
    with pytest.raises(ShapeMismatch):
        _init(sm, {"new": np.ones(3, dtype=np.float32), "w": np.ones(5, dtype=np.float32)})
    with pytest.raises(KeyNotFound):
        sm.check_refs([KeyRef("new", 0)])


def test_init_without_data_is_refused(sm: ShardStateMachine) -> None:
    with pytest.raises(InvalidArgument):
        sm.check_init([_meta("w", np.ones(2, dtype=np.float32), nframes=0)], {})


# -- push -------------------------------------------------------------------------


@pytest.mark.parametrize("frame_bytes", [1 << 20, 12], ids=["one-frame", "many-frames"])
def test_sgd_push_is_bit_exact(sm: ShardStateMachine, rng: np.random.Generator,
                               frame_bytes: int) -> None:
    w0 = rng.standard_normal((8, 5)).astype(np.float32)
    g = rng.standard_normal((8, 5)).astype(np.float32)
    _init(sm, {"w": w0}, SGD_HALF)
    _push(sm, {"w": g}, frame_bytes)
    want = w0.reshape(-1) - np.float32(0.5) * g.reshape(-1)
    assert want.dtype == np.float32
    np.testing.assert_array_equal(_bits(_value(sm, "w")), _bits(want))


def test_sgd_push_changes_value_by_minus_half_g_exactly(sm: ShardStateMachine) -> None:
    # values where w - 0.5 * g is exactly representable: the change is exactly -0.5 * g
    w0 = np.array([1.0, -2.0, 0.0, 1024.0], dtype=np.float32)
    g = np.array([2.0, 0.5, -3.0, 8.0], dtype=np.float32)
    _init(sm, {"w": w0}, SGD_HALF)
    _push(sm, {"w": g})
    np.testing.assert_array_equal(_value(sm, "w") - w0, -0.5 * g)


def test_sgd_float64_push_is_bit_exact(sm: ShardStateMachine, rng: np.random.Generator) -> None:
    w0 = rng.standard_normal(33)
    g = rng.standard_normal(33)
    _init(sm, {"w": w0}, {"optimizer": {"name": "sgd", "lr": 0.1}})
    _push(sm, {"w": g}, frame_bytes=40)
    np.testing.assert_array_equal(_bits(_value(sm, "w")), _bits(w0 - 0.1 * g))


def test_sum_optimizer_accumulates(sm: ShardStateMachine) -> None:
    _init(sm, {"s": np.zeros(3, dtype=np.float32)}, SUM)
    _push(sm, {"s": np.array([1, 2, 3], dtype=np.float32)})
    _push(sm, {"s": np.array([10, 20, 30], dtype=np.float32)})
    np.testing.assert_array_equal(_value(sm, "s"), [11, 22, 33])


def test_sum_optimizer_on_int64(sm: ShardStateMachine) -> None:
    _init(sm, {"n": np.zeros(2, dtype=np.int64)}, SUM)
    for _ in range(3):
        _push(sm, {"n": np.array([1, -(1 << 40)], dtype=np.int64)})
    np.testing.assert_array_equal(_value(sm, "n"), [3, -3 * (1 << 40)])


def test_push_counts_in_applied_index(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.zeros(2, dtype=np.float32)})
    before = sm.applied_index
    _push(sm, {"w": np.ones(2, dtype=np.float32)})
    assert sm.applied_index == before + 1


def test_push_to_unknown_key_raises_key_not_found(sm: ShardStateMachine) -> None:
    with pytest.raises(KeyNotFound) as info:
        _push(sm, {"missing": np.ones(2, dtype=np.float32)})
    assert isinstance(info.value, KeyError)
    assert "missing" in str(info.value)


def test_pull_of_unknown_key_raises_key_not_found(sm: ShardStateMachine) -> None:
    with pytest.raises(KeyNotFound):
        sm.check_refs([KeyRef("missing", 0)])


@pytest.mark.parametrize(
    ("grad", "dtype", "shape"),
    [
        pytest.param(np.ones(4, dtype=np.float64), None, None, id="dtype-float64"),
        pytest.param(np.ones(4, dtype=np.int32), None, None, id="dtype-int32"),
        pytest.param(np.ones(5, dtype=np.float32), None, None, id="length"),
        pytest.param(np.ones(4, dtype=np.float32), None, (2, 2), id="shape-same-size"),
    ],
)
def test_push_with_wrong_dtype_or_shape_raises_shape_mismatch(
        sm: ShardStateMachine, grad: np.ndarray[Any, Any], dtype: str | None,
        shape: tuple[int, ...] | None) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)})
    with pytest.raises(ShapeMismatch):
        sm.check_push([_meta("w", grad, dtype=dtype, shape=shape)])


def test_push_with_wrong_part_range_raises_shape_mismatch(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)})
    with pytest.raises(ShapeMismatch):
        sm.check_push([TensorMeta("w", 0, "float32", (4,), 1, 3, 1)])


def test_push_without_data_is_refused(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.ones(4, dtype=np.float32)})
    with pytest.raises(InvalidArgument):
        sm.check_push([_meta("w", np.ones(4, dtype=np.float32), nframes=0)])


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(("b", np.ones(3, dtype=np.float64)), id="wrong-dtype"),
        pytest.param(("b", np.ones(7, dtype=np.float32)), id="wrong-shape"),
        pytest.param(("missing", np.ones(3, dtype=np.float32)), id="unknown-key"),
    ],
)
def test_bad_second_tensor_leaves_first_unchanged(
        sm: ShardStateMachine, second: tuple[str, np.ndarray[Any, Any]]) -> None:
    _init(sm, {"a": np.ones(3, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}, SGD_HALF)
    index = sm.applied_index
    with pytest.raises((ShapeMismatch, KeyNotFound)):
        _push(sm, {"a": np.full(3, 2.0, dtype=np.float32), second[0]: second[1]})
    np.testing.assert_array_equal(_value(sm, "a"), np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(_value(sm, "b"), np.ones(3, dtype=np.float32))
    assert sm.applied_index == index


def test_same_commands_give_bit_identical_state(rng: np.random.Generator) -> None:
    w0 = rng.standard_normal(50).astype(np.float32)
    grads = [rng.standard_normal(50).astype(np.float32) for _ in range(5)]
    states = []
    for frame_bytes in (1 << 20, 28):
        sm = ShardStateMachine(0, ShardMap.uniform(1))
        _init(sm, {"w": w0}, {"optimizer": {"name": "sgd", "lr": 0.3}})
        for g in grads:
            _push(sm, {"w": g}, frame_bytes)
        states.append(_bits(_value(sm, "w")).copy())
    np.testing.assert_array_equal(states[0], states[1])


# -- ownership --------------------------------------------------------------------


def test_init_of_a_part_owned_elsewhere_raises_wrong_shard() -> None:
    shard_map = ShardMap.uniform(4, epoch=5)
    sm = ShardStateMachine(0, shard_map)
    key = _key_owned_by(shard_map, 2)
    with pytest.raises(WrongShard) as info:
        _init(sm, {key: np.ones(2, dtype=np.float32)})
    assert info.value.details["owner"] == 2
    assert info.value.details["epoch"] == 5
    assert sm.stats()["parts"] == 0


def test_push_and_pull_of_a_part_owned_elsewhere_raise_wrong_shard() -> None:
    shard_map = ShardMap.uniform(4)
    sm = ShardStateMachine(1, shard_map)
    key = _key_owned_by(shard_map, 3)
    with pytest.raises(WrongShard):
        _push(sm, {key: np.ones(2, dtype=np.float32)})
    with pytest.raises(WrongShard):
        sm.check_refs([KeyRef(key, 0)])


def test_chunk_part_goes_to_its_own_shard() -> None:
    shard_map = ShardMap.uniform(4)
    key = "big"
    owner = shard_map.shard_for(key, 1)
    part1 = TensorMeta(key, 1, "float32", (8,), 4, 4, 1)
    data = [_frames(np.arange(4, dtype=np.float32))]
    right = ShardStateMachine(owner, shard_map, chunk_bytes=16)
    spec, mode = right.check_init([part1], {})
    right.apply_init([part1], data, spec, mode)
    np.testing.assert_array_equal(_value(right, key, 1), [0, 1, 2, 3])
    wrong = ShardStateMachine(shard_map.shard_for(key, 2), shard_map, chunk_bytes=16)
    with pytest.raises(WrongShard):
        wrong.check_init([part1], {})


# -- optimizer and mode validation ------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param({"name": "rmsprop", "lr": 0.1}, id="unknown-name"),
        pytest.param({"name": "SGD", "lr": 0.1}, id="wrong-case-name"),
        pytest.param({"lr": 0.1}, id="missing-name"),
        pytest.param({"name": "sgd", "lr": 0.1, "momentun": 0.9}, id="unknown-hyperparameter"),
        pytest.param({"name": "sgd", "learning_rate": 0.1}, id="keras-style-name"),
        pytest.param({"name": "sum", "lr": 0.1}, id="sum-takes-no-lr"),
        pytest.param({"name": "sgd", "lr": -0.1}, id="negative-lr"),
        pytest.param({"name": "sgd", "lr": float("nan")}, id="nan-lr"),
        pytest.param({"name": "sgd", "lr": float("inf")}, id="inf-lr"),
        pytest.param({"name": "sgd", "lr": "0.1"}, id="str-lr"),
        pytest.param({"name": "sgd", "lr": True}, id="bool-lr"),
        pytest.param({"name": "sgd", "lr": None}, id="none-lr"),
        pytest.param("sgd", id="not-a-dict-str"),
        pytest.param(["sgd", 0.1], id="not-a-dict-list"),
        pytest.param(0.1, id="not-a-dict-float"),
    ],
)
def test_bad_optimizer_raises_invalid_argument(sm: ShardStateMachine, optimizer: Any) -> None:
    with pytest.raises(InvalidArgument):
        sm.check_init([_meta("w", np.ones(2, dtype=np.float32))], {"optimizer": optimizer})


@pytest.mark.parametrize("mode", ["bogus", "ASYNC", 3])
def test_bad_mode_raises_invalid_argument(sm: ShardStateMachine, mode: Any) -> None:
    with pytest.raises(InvalidArgument):
        sm.check_init([_meta("w", np.ones(2, dtype=np.float32))], {"mode": mode})


def test_bad_optimizer_creates_nothing(sm: ShardStateMachine) -> None:
    with pytest.raises(InvalidArgument):
        _init(sm, {"w": np.ones(2, dtype=np.float32)}, {"optimizer": {"name": "nope"}})
    with pytest.raises(KeyNotFound):
        sm.check_refs([KeyRef("w", 0)])


def test_integer_lr_is_accepted(sm: ShardStateMachine) -> None:
    _init(sm, {"w": np.zeros(2, dtype=np.float32)}, {"optimizer": {"name": "sgd", "lr": 1}})
    _push(sm, {"w": np.array([1.0, 2.0], dtype=np.float32)})
    np.testing.assert_array_equal(_value(sm, "w"), [-1.0, -2.0])


def test_init_refuses_a_part_layout_the_chunking_rule_does_not_make() -> None:
    shard_map = ShardMap.uniform(1)
    sm = ShardStateMachine(0, shard_map, chunk_bytes=16)
    bad = TensorMeta("k", 0, "float32", (8,), 0, 3, 1)  # part 0 must hold 4 elements
    with pytest.raises(InvalidArgument):
        sm.check_init([bad], {})
    assert sm.slots == {}


class _Reader:
    """Stands for a zero-copy send in flight: ``done`` once the bytes are gone."""

    def __init__(self) -> None:
        self.done = False


def test_a_write_during_an_active_lease_goes_to_a_copy() -> None:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    t = TensorMeta("w", 0, "float32", (4,), 0, 4, 1)
    spec, mode = sm.check_init([t], {"optimizer": {"name": "sum"}})
    sm.apply_init([t], [_frames(np.zeros(4, np.float32))], spec, mode)
    slot = sm.slots[("w", 0)]
    sent = slot.value
    reader = _Reader()
    slot.lease(reader)
    sm.apply_push([t], [_frames(np.ones(4, np.float32))])
    np.testing.assert_array_equal(sent, np.zeros(4, np.float32))  # what the reader sends
    np.testing.assert_array_equal(slot.value, np.ones(4, np.float32))
    assert slot.value is not sent
    reader2 = _Reader()
    slot.lease(reader2)
    reader2.done = True
    before = slot.value
    sm.apply_push([t], [_frames(np.ones(4, np.float32))])
    assert slot.value is before  # a finished lease costs no copy
    np.testing.assert_array_equal(slot.value, np.full(4, 2, np.float32))


def _topk_key() -> tuple[ShardStateMachine, TensorMeta, TensorMeta]:
    """A state with a 6-element ``sum`` key "w" taking top-k pushes, and descriptors
    of 2 values and their 2 positions."""
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    t = TensorMeta("w", 0, "float32", (6,), 0, 6, 1)
    spec, mode = sm.check_init([t], {"optimizer": {"name": "sum"}})
    sm.apply_init([t], [_frames(np.zeros(6, np.float32))], spec, mode, ("topk", 0.5))
    return (sm, TensorMeta("w", 0, "float32", (2,), 0, 2, 1),
            TensorMeta("w", 0, "int64", (2,), 0, 2, 1))


def test_topk_pushes_are_checked_whole_before_any_part_changes() -> None:
    sm, vals, pos = _topk_key()
    topk = {"encoding": "topk"}
    sm.check_push([vals, pos], topk)
    sm.apply_push([vals, pos], [_frames(np.array([1.5, -2.0], np.float32)),
                                _frames(np.array([1, 4], np.int64))], topk)
    np.testing.assert_array_equal(_value(sm, "w"), [0, 1.5, 0, 0, -2.0, 0])
    with pytest.raises(ShapeMismatch):  # positions must be int64
        sm.check_push([vals, TensorMeta("w", 0, "int32", (2,), 0, 2, 1)], topk)
    with pytest.raises(InvalidArgument):  # a position outside the part
        sm.apply_push([vals, pos], [_frames(np.ones(2, np.float32)),
                                    _frames(np.array([0, 6], np.int64))], topk)
    np.testing.assert_array_equal(_value(sm, "w"), [0, 1.5, 0, 0, -2.0, 0])
    assert sm.slots[("w", 0)].compression == ("topk", 0.5)


def test_topk_positions_must_be_distinct_and_carry_data() -> None:
    sm, vals, pos = _topk_key()
    with pytest.raises(InvalidArgument):
        sm.apply_push([vals, pos], [_frames(np.ones(2, np.float32)),
                                    _frames(np.array([3, 3], np.int64))], {"encoding": "topk"})
    with pytest.raises(ShapeMismatch):
        sm.check_push([vals, TensorMeta("w", 0, "int64", (2,), 0, 2, 0)], {"encoding": "topk"})
    assert not _value(sm, "w").any()


def test_bfloat16_is_not_a_storage_dtype() -> None:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    with pytest.raises(InvalidArgument, match="bfloat16"):
        sm.check_init([TensorMeta("w", 0, "bfloat16", (4,), 0, 4, 1)],
                      {"optimizer": {"name": "sum"}})


# -- digests ----------------------------------------------------------------------


def test_the_digest_is_equal_for_equal_histories_and_differs_otherwise() -> None:
    """Replicas compare digests: the same commands give the same digest, one more
    push (or a dropped worker) gives another."""
    a, b = ShardStateMachine(0, ShardMap.uniform(1)), ShardStateMachine(0, ShardMap.uniform(1))
    w = np.arange(8, dtype=np.float32)
    for sm in (a, b):
        _init(sm, {"w": w})
    assert a.digest() == b.digest()
    t = _meta("w", w)
    a.apply_push([t], [[memoryview(np.ones(8, np.float32))]])
    assert a.digest() != b.digest()
    b.apply_push([t], [[memoryview(np.ones(8, np.float32))]])
    assert a.digest() == b.digest()
    b.drop_worker(3)
    assert a.digest() != b.digest()


def test_the_supervisor_reports_replicas_that_differ_at_the_same_index(
        caplog: pytest.LogCaptureFixture) -> None:
    from pserver.supervisor import _digest_mismatch

    same = [{"applied_index": 5, "digest": "a"}, {"applied_index": 5, "digest": "a"},
            {"applied_index": 7, "digest": "b"}, {"applied_index": None, "digest": None}]
    assert not _digest_mismatch(0, same)
    assert _digest_mismatch(1, [*same, {"applied_index": 5, "digest": "c"}])
    assert "different state" in caplog.text


def test_digest_marks_compare_replicas_at_the_same_log_position(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two replicas apply a DIGEST mark at the same position; the leader's check
    matches the one that holds the same state and is reported by the one that
    does not (loudly: a critical log line and a count in its status)."""
    from pserver import commands
    from pserver.apply import apply_command
    from pserver.protocol.schema import Limits

    same = ShardStateMachine(0, ShardMap.uniform(1))
    differs = ShardStateMachine(0, ShardMap.uniform(1))
    for m in (same, differs):
        m.drop_worker(3)
    differs.drop_worker(4)  # the divergence
    leader = ShardStateMachine(0, ShardMap.uniform(1))
    leader.drop_worker(3)
    mark = commands.Command(commands.DIGEST, (2, 9))
    for m in (leader, same, differs):
        assert apply_command(m, mark, Limits()) == []
    check = commands.Command(commands.DIGEST_CHECK, (2, 9), digest=leader.digest_marks[(2, 9)])
    for m in (leader, same, differs):
        apply_command(m, check, Limits(), shard=0)
    assert (same.digest_checks, same.digest_mismatches) == (1, 0)
    assert (leader.digest_checks, leader.digest_mismatches) == (1, 0)
    assert (differs.digest_checks, differs.digest_mismatches) == (1, 1)
    assert "differs from its leader's" in caplog.text
    assert not same.digest_marks and not differs.digest_marks  # a mark goes with its check
    fresh = ShardStateMachine(0, ShardMap.uniform(1))  # restored after the mark: no verdict
    apply_command(fresh, check, Limits())
    assert (fresh.digest_checks, fresh.digest_mismatches) == (0, 0)
