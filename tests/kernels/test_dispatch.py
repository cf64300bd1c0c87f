"""The compiled kernels against their numpy twins in kernels/reference.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pserver import kernels
from pserver.kernels import KernelError, reference

U64_MAX = (1 << 64) - 1

id_values = st.one_of(st.sampled_from([0, 1, U64_MAX, U64_MAX - 1, 1 << 63]),
                      st.integers(0, U64_MAX))
id_arrays = st.lists(id_values, max_size=300).map(lambda xs: np.array(xs, dtype=np.uint64))
seeds = st.integers(0, U64_MAX)
shard_counts = st.integers(1, 17)


@given(ids=id_arrays, seed=seeds, num_shards=shard_counts)
@example(ids=np.array([], dtype=np.uint64), seed=0, num_shards=1)
@example(ids=np.array([0, U64_MAX], dtype=np.uint64), seed=U64_MAX, num_shards=17)
@example(ids=np.array([7], dtype=np.uint64), seed=0, num_shards=3)
def test_shard_of_ids_matches_reference(ids: np.ndarray[Any, Any], seed: int,
                                        num_shards: int) -> None:
    got = kernels.shard_of_ids(ids, seed, num_shards)
    want = (reference.hash_ids(ids, seed) % np.uint64(num_shards)).astype(np.int64)
    assert got.dtype == np.int64
    assert got.shape == ids.shape
    np.testing.assert_array_equal(got, want)
    assert ((got >= 0) & (got < num_shards)).all()


@given(ids=id_arrays, seed=seeds, num_shards=shard_counts)
def test_shard_of_ids_writes_into_out(ids: np.ndarray[Any, Any], seed: int,
                                      num_shards: int) -> None:
    out = np.full(ids.shape[0], -1, dtype=np.int64)
    got = kernels.shard_of_ids(ids, seed, num_shards, out=out)
    assert got is out
    np.testing.assert_array_equal(out, kernels.shard_of_ids(ids, seed, num_shards))


@given(ids=id_arrays, seed=seeds, num_shards=shard_counts)
def test_int64_ids_are_read_as_their_uint64_bits(ids: np.ndarray[Any, Any], seed: int,
                                                 num_shards: int) -> None:
    as_int64 = ids.view(np.int64)  # 2**64-1 becomes -1 and so on
    np.testing.assert_array_equal(kernels.shard_of_ids(as_int64, seed, num_shards),
                                  kernels.shard_of_ids(ids, seed, num_shards))
    for got, want in zip(kernels.partition_by_shard(as_int64, seed, num_shards),
                         kernels.partition_by_shard(ids, seed, num_shards), strict=True):
        np.testing.assert_array_equal(got, want)


def test_negative_int64_ids_match_reference() -> None:
    ids = np.array([-1, -2, 0, 5, np.iinfo(np.int64).min], dtype=np.int64)
    want = (reference.hash_ids(ids.view(np.uint64), 3) % np.uint64(5)).astype(np.int64)
    np.testing.assert_array_equal(kernels.shard_of_ids(ids, 3, 5), want)


def test_non_contiguous_ids_are_accepted() -> None:
    ids = np.arange(40, dtype=np.uint64)[::3]
    np.testing.assert_array_equal(kernels.shard_of_ids(ids, 1, 4),
                                  kernels.shard_of_ids(ids.copy(), 1, 4))


@given(ids=id_arrays, seed=seeds, num_shards=shard_counts)
@example(ids=np.array([], dtype=np.uint64), seed=0, num_shards=4)
@example(ids=np.array([U64_MAX], dtype=np.uint64), seed=0, num_shards=1)
def test_partition_by_shard_matches_reference(ids: np.ndarray[Any, Any], seed: int,
                                              num_shards: int) -> None:
    order, offsets = kernels.partition_by_shard(ids, seed, num_shards)
    want_order, want_offsets = reference.partition_by_shard(ids, seed, num_shards)
    assert order.dtype == np.int64
    assert offsets.dtype == np.int64
    np.testing.assert_array_equal(order, want_order)
    np.testing.assert_array_equal(offsets, want_offsets)


@given(ids=id_arrays, seed=seeds, num_shards=shard_counts)
def test_partition_is_stable_and_offsets_are_right(ids: np.ndarray[Any, Any], seed: int,
                                                  num_shards: int) -> None:
    order, offsets = kernels.partition_by_shard(ids, seed, num_shards)
    shard = kernels.shard_of_ids(ids, seed, num_shards)
    n = ids.shape[0]
    assert offsets.shape == (num_shards + 1,)
    assert offsets[0] == 0
    assert offsets[-1] == n
    assert (np.diff(offsets) >= 0).all()
    # order is a permutation of the positions
    assert sorted(order.tolist()) == list(range(n))
    for s in range(num_shards):
        group = order[offsets[s] : offsets[s + 1]]
        assert (shard[group] == s).all()
        assert (np.diff(group) > 0).all()  # input order kept within a shard
        assert group.size == int((shard == s).sum())


def test_one_shard_keeps_everything_in_order() -> None:
    ids = np.array([9, 3, 3, U64_MAX, 0], dtype=np.uint64)
    order, offsets = kernels.partition_by_shard(ids, 42, 1)
    np.testing.assert_array_equal(order, np.arange(5))
    np.testing.assert_array_equal(offsets, [0, 5])
    np.testing.assert_array_equal(kernels.shard_of_ids(ids, 42, 1), np.zeros(5))


def test_hash_spreads_consecutive_ids_evenly() -> None:
    shard = kernels.shard_of_ids(np.arange(40_000, dtype=np.uint64), 0, 4)
    counts = np.bincount(shard, minlength=4)
    assert (counts > 9_000).all(), counts
    assert (counts < 11_000).all(), counts


def test_seed_changes_placement() -> None:
    ids = np.arange(1000, dtype=np.uint64)
    assert (kernels.shard_of_ids(ids, 0, 8) != kernels.shard_of_ids(ids, 1, 8)).any()


BAD_IDS: list[Any] = [
    pytest.param(np.zeros((2, 3), dtype=np.uint64), id="2-D"),
    pytest.param(np.zeros(3, dtype=np.float64), id="float64"),
    pytest.param(np.zeros(3, dtype=np.float32), id="float32"),
    pytest.param(np.zeros(3, dtype=np.int32), id="int32"),
    pytest.param(np.zeros(3, dtype=np.uint32), id="uint32"),
    pytest.param(np.zeros((), dtype=np.uint64), id="0-D"),
]


@pytest.mark.parametrize("ids", BAD_IDS)
def test_shard_of_ids_rejects_bad_ids(ids: np.ndarray[Any, Any]) -> None:
    with pytest.raises(KernelError):
        kernels.shard_of_ids(ids, 0, 4)


@pytest.mark.parametrize("ids", BAD_IDS)
def test_partition_by_shard_rejects_bad_ids(ids: np.ndarray[Any, Any]) -> None:
    with pytest.raises(KernelError):
        kernels.partition_by_shard(ids, 0, 4)


@pytest.mark.parametrize("num_shards", [0, -1], ids=["zero", "negative"])
def test_partition_by_shard_rejects_bad_shard_count(num_shards: int) -> None:
    with pytest.raises(KernelError):
        kernels.partition_by_shard(np.arange(4, dtype=np.uint64), 0, num_shards)


@pytest.mark.parametrize("num_shards", [0, -1], ids=["zero", "negative"])
def test_shard_of_ids_rejects_bad_shard_count(num_shards: int) -> None:
    with pytest.raises(KernelError):
        kernels.shard_of_ids(np.arange(4, dtype=np.uint64), 0, num_shards)


# -- dense update kernels --------------------------------------------------------

FLOATS = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
float_lists = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=64)


@pytest.mark.parametrize("dtype", FLOATS)
@given(values=float_lists, lr=st.floats(0, 10, allow_nan=False), data=st.data())
def test_sgd_matches_reference_bit_for_bit(dtype: Any, values: list[float], lr: float,
                                           data: st.DataObject) -> None:
    param = np.array(values, dtype=dtype)
    grad = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(values),
                                       max_size=len(values))), dtype=dtype)
    want = param.copy()
    reference.sgd_step(want, grad, None, lr=lr, weight_decay=0.0, momentum=0.0,
                       dampening=0.0, nesterov=False, first=True)
    kernels.sgd(param, grad, lr=lr)
    assert param.dtype == dtype
    np.testing.assert_array_equal(param.view(f"u{param.itemsize}"),
                                  want.view(f"u{want.itemsize}"))
    # and reference itself is the documented formula in the parameter's dtype
    again = np.array(values, dtype=dtype)
    np.testing.assert_array_equal(want, again - dtype(lr) * grad)


@pytest.mark.parametrize("dtype", FLOATS)
@given(values=float_lists, data=st.data())
def test_accumulate_matches_reference_bit_for_bit(dtype: Any, values: list[float],
                                                  data: st.DataObject) -> None:
    param = np.array(values, dtype=dtype)
    grad = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(values),
                                       max_size=len(values))), dtype=dtype)
    want = param.copy()
    reference.accumulate(want, grad)
    kernels.accumulate(param, grad)
    np.testing.assert_array_equal(param.view(f"u{param.itemsize}"),
                                  want.view(f"u{want.itemsize}"))
    np.testing.assert_array_equal(want, np.array(values, dtype=dtype) + grad)


def test_sgd_updates_a_slice_in_place() -> None:
    param = np.ones(8, dtype=np.float32)
    kernels.sgd(param[2:5], np.full(3, 2.0, dtype=np.float32), lr=0.5)
    np.testing.assert_array_equal(param, [1, 1, 0, 0, 0, 1, 1, 1])


OPS: dict[str, Any] = {
    "sgd": lambda param, grad: kernels.sgd(param, grad, lr=0.1),
    "accumulate": kernels.accumulate,
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize(
    ("pshape", "gshape"),
    [pytest.param((4,), (3,), id="length"), pytest.param((2, 2), (4,), id="rank"),
     pytest.param((4,), (), id="scalar-grad")],
)
def test_shape_mismatch_raises_kernel_error(op: str, pshape: tuple[int, ...],
                                            gshape: tuple[int, ...]) -> None:
    param = np.ones(pshape, dtype=np.float32)
    grad = np.ones(gshape, dtype=np.float32)
    before = param.copy()
    with pytest.raises(KernelError):
        OPS[op](param, grad)
    np.testing.assert_array_equal(param, before)


@pytest.mark.parametrize("op", sorted(OPS))
def test_read_only_param_raises_kernel_error(op: str) -> None:
    param = np.frombuffer(np.ones(4, dtype=np.float32).tobytes(), dtype=np.float32)
    grad = np.ones(4, dtype=np.float32)
    with pytest.raises(KernelError):
        OPS[op](param, grad)
