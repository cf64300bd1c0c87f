"""The Cython row index, id dedup and segment sums against their dict/numpy twins.

Owns the checks of kernels/_rowindex.pyx through the dispatch front: a
hypothesis state machine against ``reference.RowIndexModel`` (inserts, lookups,
deletes, growth over many resizes, snapshots), deterministic slots across
replicas, dedup and fixed-order segment sums bit for bit against numpy, and
``KernelError`` on bad input.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from pserver import kernels
from pserver.kernels import KernelError, _rowindex, reference

Array = np.ndarray[Any, Any]
U64_MAX = (1 << 64) - 1
SPECIAL_IDS = [0, 1, 2, U64_MAX, U64_MAX - 1, 1 << 63, (1 << 63) - 1, 1 << 32]

id_values = st.one_of(st.sampled_from(SPECIAL_IDS), st.integers(0, U64_MAX),
                      st.integers(0, 64))
id_lists = st.lists(id_values, max_size=60)


def u64(xs: list[int]) -> Array:
    return np.array(xs, dtype=np.uint64)


def check_same_state(index: kernels.RowIndex, model: reference.RowIndexModel) -> None:
    assert len(index) == len(model)
    assert index.num_slots == model.num_slots
    ids, slots = index.items()
    want_ids, want_slots = model.items()
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(slots, want_slots)
    np.testing.assert_array_equal(index.ids(), want_ids)
    np.testing.assert_array_equal(index.slots(), want_slots)
    np.testing.assert_array_equal(index.free_slots(), np.array(model.free, dtype=np.int64))
    cap = index.capacity
    assert cap >= 16
    assert cap & (cap - 1) == 0
    assert len(index) <= cap * 7 // 10


class RowIndexMachine(RuleBasedStateMachine):
    """The Cython index and the dict model take the same batches and must agree."""

    known = Bundle("known")

    def __init__(self) -> None:
        super().__init__()
        self.index = kernels.new_row_index()
        self.model = reference.RowIndexModel()
        self.resizes = 0

    @initialize(target=known, hint=st.sampled_from([0, 0, 1, 16, 100, 5000]),
                xs=st.lists(id_values, min_size=1, max_size=200))
    def start(self, hint: int, xs: list[int]) -> Any:
        self.index = kernels.new_row_index(capacity_hint=hint)
        ids = self._insert(u64(xs))
        return multiple(*set(ids.tolist()))

    def _insert(self, ids: Array) -> Array:
        cap = self.index.capacity
        as_int64 = ids.size % 2 == 1  # int64 ids are read as their uint64 bits
        slots, created = self.index.lookup_or_insert(ids.view(np.int64) if as_int64 else ids)
        want_slots, want_created = self.model.lookup_or_insert(ids)
        np.testing.assert_array_equal(slots, want_slots)
        np.testing.assert_array_equal(created, want_created)
        assert slots.dtype == np.int64
        if self.index.capacity != cap:
            self.resizes += 1
            event("resized in a batch")
        return ids

    @rule(target=known, xs=id_lists)
    def insert(self, xs: list[int]) -> Any:
        ids = self._insert(u64(xs))
        return multiple(*set(ids.tolist()))

    @rule(xs=st.lists(known, max_size=20), ys=id_lists, data=st.data())
    def insert_mixed(self, xs: list[int], ys: list[int], data: st.DataObject) -> None:
        """Known and new ids, repeated and shuffled within one batch."""
        batch = data.draw(st.permutations(xs + ys + xs))
        self._insert(u64(batch))

    @rule(start=st.integers(0, U64_MAX - 5000), count=st.integers(200, 3000),
          stride=st.sampled_from([1, 2, 1 << 32, 0x9E3779B97F4A7C15]))
    def grow(self, start: int, count: int, stride: int) -> None:
        """A large batch: several resizes in one call, and patterned ids."""
        ids = (np.uint64(start) + np.arange(count, dtype=np.uint64) * np.uint64(stride))
        self._insert(ids)

    @rule(xs=st.lists(known, max_size=30), ys=id_lists)
    def lookup(self, xs: list[int], ys: list[int]) -> None:
        ids = u64(xs + ys)
        out = np.full(ids.size, 7, dtype=np.int64)
        got = self.index.lookup(ids, out=out)
        assert got is out
        np.testing.assert_array_equal(got, self.model.lookup(ids))

    @rule(xs=st.lists(known, max_size=20), ys=id_lists)
    def delete(self, xs: list[int], ys: list[int]) -> None:
        ids = u64(xs + ys + xs)  # absent and repeated ids are ignored
        assert self.index.delete(ids) == self.model.delete(ids)

    @precondition(lambda self: len(self.model) > 0)
    @rule(fraction=st.floats(0.1, 1.0))
    def delete_many(self, fraction: float) -> None:
        ids, _ = self.model.items()
        ids = ids[: max(1, int(ids.size * fraction))]
        assert self.index.delete(ids[::-1]) == self.model.delete(ids[::-1])

    @rule()
    def snapshot_restore(self) -> None:
        """A replica restored from a snapshot continues with the same slots."""
        ids, slots = self.index.items()
        fresh = kernels.new_row_index()
        fresh.restore(ids, slots, self.index.num_slots, self.index.free_slots())
        self.index = fresh

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self) -> None:
        cap = self.index.capacity
        self.index.clear()
        self.model.clear()
        assert self.index.capacity == cap

    @invariant()
    def agrees(self) -> None:
        check_same_state(self.index, self.model)

    def teardown(self) -> None:
        event(f"resizes per run: {min(self.resizes, 5)}{'+' if self.resizes >= 5 else ''}")


TestRowIndexMachine = RowIndexMachine.TestCase
TestRowIndexMachine.settings = settings(max_examples=100, stateful_step_count=50)


def test_growth_across_many_resizes() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, U64_MAX, 200_000, dtype=np.uint64, endpoint=True)
    ids = ids[np.sort(np.unique(ids, return_index=True)[1])]
    index = kernels.new_row_index()
    caps = set()
    cuts = np.unique(np.geomspace(1, ids.size, 80).astype(np.int64))
    for chunk in np.split(ids, cuts):
        index.lookup_or_insert(chunk)
        caps.add(index.capacity)
    assert len(caps) >= 10
    np.testing.assert_array_equal(index.lookup(ids), np.arange(ids.size))
    assert len(index) == index.num_slots == ids.size
    # One batch of fresh ids: grown once for the rest of the batch, same slots.
    one = kernels.new_row_index()
    slots, created = one.lookup_or_insert(ids)
    np.testing.assert_array_equal(slots, np.arange(ids.size))
    np.testing.assert_array_equal(created, np.arange(ids.size))
    assert one.capacity <= 2 * index.capacity


def test_growth_within_a_batch_of_repeated_ids_stays_bounded() -> None:
    """Repeats make a batch's early rate of new ids overestimate the rest; growth
    is then capped (64x the size per step) instead of sized for the whole batch."""
    rng = np.random.default_rng(3)
    distinct = rng.integers(0, U64_MAX, 1000, dtype=np.uint64, endpoint=True)
    ids = distinct[rng.integers(0, distinct.size, 200_000)]
    index = kernels.new_row_index()
    slots, created = index.lookup_or_insert(ids)
    assert len(index) == created.size == np.unique(ids).size
    np.testing.assert_array_equal(slots, reference.dedup_segments(ids)[1])
    assert index.capacity <= 2**17  # a whole-batch estimate would give 2**19


def test_extreme_ids_and_repeats_in_one_batch() -> None:
    index = kernels.new_row_index()
    ids = u64([U64_MAX, 0, U64_MAX, 0, 5, U64_MAX])
    slots, created = index.lookup_or_insert(ids)
    np.testing.assert_array_equal(slots, [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(created, [0, 1, 4])
    np.testing.assert_array_equal(index.lookup(np.array([-1, 0, 4], dtype=np.int64)), [0, 1, -1])
    assert index.delete(u64([0, 0, 9])) == 1
    assert index.delete(u64([U64_MAX])) == 1
    # LIFO reuse: the slot of U64_MAX (freed last) first, then that of 0.
    slots, _ = index.lookup_or_insert(u64([7, 8, 9]))
    np.testing.assert_array_equal(slots, [0, 1, 3])
    assert index.num_slots == 4


def test_empty_batches() -> None:
    index = kernels.new_row_index()
    empty = u64([])
    slots, created = index.lookup_or_insert(empty)
    assert slots.shape == created.shape == (0,)
    assert index.lookup(empty).shape == (0,)
    assert index.delete(empty) == 0
    unique, inverse = kernels.dedup_ids(empty)
    assert unique.shape == inverse.shape == (0,)
    out = kernels.segment_sum(np.empty((0, 3), np.float32), np.empty(0, np.int64), 2)
    np.testing.assert_array_equal(out, np.zeros((2, 3), np.float32))


batches = st.lists(st.tuples(st.sampled_from(["insert", "delete"]), id_lists), max_size=12)


@given(batches=batches, hints=st.tuples(st.integers(0, 3000), st.integers(0, 3000)))
def test_replicas_assign_identical_slots(batches: list[tuple[str, list[int]]],
                                         hints: tuple[int, int]) -> None:
    """Slots depend on the batches only, not on capacity or growth history."""
    a, b = (kernels.new_row_index(capacity_hint=h) for h in hints)
    for op, xs in batches:
        ids = u64(xs)
        if op == "insert":
            sa, ca = a.lookup_or_insert(ids)
            sb, cb = b.lookup_or_insert(ids)
            np.testing.assert_array_equal(sa, sb)
            np.testing.assert_array_equal(ca, cb)
        else:
            assert a.delete(ids) == b.delete(ids)
    for x, y in zip(a.items(), b.items(), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.free_slots(), b.free_slots())
    assert a.num_slots == b.num_slots


def test_concurrent_threads_are_serialised() -> None:
    index = kernels.new_row_index()
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 50_000, 20_000, dtype=np.uint64) for _ in range(8)]

    def work(ids: Array) -> None:
        for _ in range(3):
            index.lookup_or_insert(ids)
            index.lookup(ids)

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = np.unique(np.concatenate(batches))
    assert len(index) == index.num_slots == everything.size
    slots = index.lookup(everything)
    np.testing.assert_array_equal(np.sort(slots), np.arange(everything.size))


# --- dedup and segment sums ------------------------------------------------------------


@given(xs=st.lists(st.one_of(id_values, st.integers(0, 8)), max_size=300))
@example(xs=[])
@example(xs=[U64_MAX, 0, U64_MAX, 0])
def test_dedup_matches_numpy(xs: list[int]) -> None:
    ids = u64(xs)
    unique, inverse = kernels.dedup_ids(ids)
    want_unique, want_inverse = reference.dedup_segments(ids)
    np.testing.assert_array_equal(unique, want_unique)
    np.testing.assert_array_equal(inverse, want_inverse)
    assert unique.dtype == np.uint64
    assert inverse.dtype == np.int64
    np.testing.assert_array_equal(unique[inverse], ids)
    # first-appearance order, by a plain dict
    assert unique.tolist() == list(dict.fromkeys(xs))


@given(batches=st.lists(id_lists, min_size=1, max_size=6))
def test_dedup_with_caller_buffers_and_scratch(batches: list[list[int]]) -> None:
    scratch = kernels.new_row_index()
    scratch.lookup_or_insert(u64([1, 2, 3]))  # contents are discarded
    for xs in batches:
        ids = u64(xs)
        inverse = np.full(ids.size, -5, np.int64)
        unique_buf = np.zeros(ids.size, np.uint64)
        unique, inv = kernels.dedup_ids(ids.view(np.int64), inverse=inverse, unique=unique_buf,
                                        scratch=scratch)
        assert inv is inverse
        assert unique.base is unique_buf
        want_unique, want_inverse = reference.dedup_segments(ids)
        np.testing.assert_array_equal(unique, want_unique)
        np.testing.assert_array_equal(inv, want_inverse)


finite32 = st.floats(-(2.0**100), 2.0**100, width=32)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 200),
    dim=st.sampled_from([0, 1, 3, 7, 16, 33]),
    num_ids=st.integers(1, 20),
    extra=st.integers(0, 3),
    dtype=st.sampled_from([np.float32, np.float64]),
)
@example(seed=0, n=0, dim=4, num_ids=1, extra=0, dtype=np.float32)
@example(seed=0, n=1, dim=1, num_ids=1, extra=0, dtype=np.float64)
def test_segment_sum_is_bit_identical_to_numpy(seed: int, n: int, dim: int, num_ids: int,
                                               extra: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    # Mixed magnitudes so that a different order of additions gives different bits.
    values = (rng.standard_normal((n, dim)) * 10.0 ** rng.integers(-8, 9, (n, dim)))
    values = values.astype(dtype)
    ids = rng.integers(0, num_ids, n, dtype=np.uint64)
    unique, inverse = kernels.dedup_ids(ids)
    m = unique.size + extra
    got = kernels.segment_sum(values, inverse, m)
    want = reference.segment_sum(values, inverse, m)
    assert got.dtype == values.dtype
    assert got.shape == (m, dim)
    assert got.tobytes() == want.tobytes()
    # The same as a plain loop in input order, in the values' dtype.
    loop = np.zeros((m, dim), dtype)
    for i in range(n):
        loop[inverse[i]] += values[i]
    assert got.tobytes() == loop.tobytes()


@given(rows=st.lists(st.lists(finite32, min_size=2, max_size=2), min_size=1, max_size=30),
       data=st.data())
def test_segment_sum_writes_into_out(rows: list[list[float]], data: st.DataObject) -> None:
    values = np.array(rows, dtype=np.float32)
    inverse = np.array(data.draw(st.lists(st.integers(0, 4), min_size=len(rows),
                                          max_size=len(rows))), dtype=np.int64)
    out = np.full((5, 2), np.nan, np.float32)
    got = kernels.segment_sum(values, inverse, 5, out=out)
    assert got is out
    assert out.tobytes() == reference.segment_sum(values, inverse, 5).tobytes()


def test_segment_sum_order_is_the_input_order() -> None:
    values = np.array([[1e8], [1.0], [-1e8], [1.0]], dtype=np.float32)
    inverse = np.zeros(4, np.int64)
    # ((1e8 + 1) - 1e8) + 1 in float32 is 1; a sorted or pairwise order gives 0 or 2.
    assert kernels.segment_sum(values, inverse, 1)[0, 0] == np.float32(1.0)
    twice = kernels.segment_sum(values, inverse, 1)
    assert twice.tobytes() == kernels.segment_sum(values, inverse, 1).tobytes()


# --- bad input ---------------------------------------------------------------------


def test_bad_ids_raise() -> None:
    index = kernels.new_row_index()
    for bad in (np.zeros((2, 2), np.uint64), np.zeros(3, np.float64), np.zeros(3, np.int32)):
        with pytest.raises(KernelError):
            index.lookup_or_insert(bad)
        with pytest.raises(KernelError):
            index.lookup(bad)
        with pytest.raises(KernelError):
            index.delete(bad)
        with pytest.raises(KernelError):
            kernels.dedup_ids(bad)


def test_bad_outputs_raise() -> None:
    index = kernels.new_row_index()
    ids = u64([1, 2, 3])
    for bad in (np.zeros(2, np.int64), np.zeros(3, np.int32), np.zeros(6, np.int64)[::2],
                np.zeros(3, np.uint64)):
        with pytest.raises(KernelError):
            index.lookup(ids, out=bad)
        with pytest.raises(KernelError):
            index.lookup_or_insert(ids, out=bad)
        with pytest.raises(KernelError):
            index.lookup_or_insert(ids, created=bad)
        with pytest.raises(KernelError):
            kernels.dedup_ids(ids, inverse=bad)
    frozen = np.zeros(3, np.int64)
    frozen.flags.writeable = False
    with pytest.raises(KernelError):
        index.lookup(ids, out=frozen)
    with pytest.raises(KernelError):
        kernels.dedup_ids(ids, unique=np.zeros(3, np.int64))
    assert len(index) == 0  # nothing was inserted by the failed calls
    with pytest.raises(KernelError):
        kernels.new_row_index(capacity_hint=-1)
    with pytest.raises(KernelError):
        index.reserve(-1)


def test_bad_segment_sum_arguments_raise() -> None:
    values = np.ones((4, 3), np.float32)
    inverse = np.array([0, 1, 0, 1], np.int64)
    cases: list[tuple[Array, Array, int, Array | None]] = [
        (np.ones(4, np.float32), inverse, 2, None),                     # 1-D values
        (np.ones((4, 3), np.float16), inverse, 2, None),                # float16
        (np.ones((4, 3), np.int64), inverse, 2, None),                  # integers
        (np.ones((3, 4), np.float32).T, inverse, 2, None),              # not C-contiguous
        (values, inverse.astype(np.int32), 2, None),                    # inverse dtype
        (values, inverse[:3], 2, None),                                 # inverse length
        (values, inverse, -1, None),                                    # num_segments
        (values, inverse, 2, np.zeros((2, 3), np.float64)),             # out dtype
        (values, inverse, 2, np.zeros((3, 3), np.float32)),             # out shape
        (values, inverse, 2, np.zeros((2, 6), np.float32)[:, ::2]),     # out strided
    ]
    for v, inv, m, out in cases:
        with pytest.raises(KernelError):
            kernels.segment_sum(v, inv, m, out=out)


@pytest.mark.parametrize("bad_index", [-1, 2, 1 << 40])
def test_out_of_range_inverse_raises_before_writing(bad_index: int) -> None:
    values = np.ones((4, 2), np.float64)
    inverse = np.array([0, 1, bad_index, 0], np.int64)
    out = np.full((2, 2), 42.0)
    with pytest.raises(KernelError, match="inverse"):
        kernels.segment_sum(values, inverse, 2, out=out)
    np.testing.assert_array_equal(out, np.full((2, 2), 42.0))


def test_bad_snapshots_raise_and_leave_the_index_as_it_was() -> None:
    source = kernels.new_row_index()
    source.lookup_or_insert(u64([10, 20, 30, 40]))
    source.delete(u64([20]))
    ids, slots = source.items()
    free = source.free_slots()
    good = kernels.new_row_index()
    good.restore(ids, slots, source.num_slots, free)
    np.testing.assert_array_equal(good.lookup_or_insert(u64([50, 60]))[0], [1, 4])
    bad_cases = [
        (ids, slots, 5, free),                                   # num_slots too large
        (ids, slots, 4, np.array([], np.int64)),                 # free slot missing
        (ids, np.array([0, 0, 3], np.int64), 4, free),           # repeated slot
        (ids, np.array([0, 2, 9], np.int64), 4, free),           # slot out of range
        (u64([10, 10, 40]), slots, 4, free),                     # repeated id
        (ids, slots[:2], 4, free),                               # lengths differ
        (ids, slots.astype(np.int32), 4, free),                  # slot dtype
    ]
    for i, s, m, f in bad_cases:
        target = kernels.new_row_index()
        target.lookup_or_insert(u64([1, 2]))
        with pytest.raises(KernelError):
            target.restore(i, s, m, f)
        np.testing.assert_array_equal(target.lookup(u64([1, 2, 10])), [0, 1, -1])


def test_raw_module_checks_lengths() -> None:
    raw = _rowindex.RowIndex()
    with pytest.raises(ValueError, match="out"):
        raw.lookup(u64([1, 2]), np.empty(1, np.int64))
    with pytest.raises(ValueError, match="created"):
        raw.lookup_or_insert(u64([1, 2]), np.empty(2, np.int64), np.empty(1, np.int64))
    out = np.empty(2, np.int64)
    assert raw.lookup_or_insert(u64([1, 1]), out) == 1
    np.testing.assert_array_equal(out, [0, 0])
    with pytest.raises(ValueError, match="inverse"):
        _rowindex.dedup_segments(u64([1]), np.empty(2, np.int64), np.empty(1, np.uint64))


# --- repeated slots ----------------------------------------------------------------------


@given(xs=st.lists(st.integers(0, 40), max_size=80))
@example(xs=[])
@example(xs=[40, 40])
def test_has_repeats_answers_as_a_set_and_leaves_its_scratch_zero(xs: list[int]) -> None:
    marks = np.zeros(41, np.uint8)
    assert kernels.has_repeats(np.array(xs, np.int64), marks) == (len(set(xs)) != len(xs))
    assert not marks.any()


@pytest.mark.parametrize("bad", [41, -1])
def test_has_repeats_refuses_a_slot_outside_its_scratch(bad: int) -> None:
    marks = np.zeros(41, np.uint8)
    with pytest.raises(KernelError, match="outside"):
        kernels.has_repeats(np.array([3, 7, bad, 9], np.int64), marks)
    assert not marks.any()  # the slots marked before the bad one are cleared
    with pytest.raises(KernelError):
        kernels.has_repeats(np.array([1], np.int32), marks)
    with pytest.raises(KernelError):
        kernels.has_repeats(np.array([1], np.int64), np.zeros(4, np.int8))
