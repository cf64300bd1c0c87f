"""gather_rows / scatter_rows (Cython, one memcpy per row) against numpy's
np.take and fancy assignment: random shapes and dtypes, empty and zero-width
arrays, and every bad input rejected with KernelError before a byte moves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pserver.kernels import KernelError, gather_rows, scatter_rows

DTYPES = (np.float32, np.float64, np.float16, np.uint64, np.int32)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 300), width=st.integers(0, 70), n=st.integers(0, 400),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_gather_matches_np_take(rows: int, width: int, n: int, dtype: type,
                                seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 1000, (rows, width)).astype(dtype)
    pos = rng.integers(0, rows, n).astype(np.int64)
    got = gather_rows(src, pos)
    assert got.dtype == src.dtype
    np.testing.assert_array_equal(got, np.take(src, pos, axis=0))
    out = np.full((n, width), 7, dtype)
    assert gather_rows(src, pos, out) is out
    np.testing.assert_array_equal(out, np.take(src, pos, axis=0))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 300), width=st.integers(0, 70), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_scatter_matches_fancy_assignment(rows: int, width: int, data: st.DataObject,
                                          dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(0, rows))
    pos = rng.permutation(rows)[:n].astype(np.int64)  # distinct, as pull_rows' positions
    src = rng.integers(0, 1000, (n, width)).astype(dtype)
    out = rng.integers(0, 1000, (rows, width)).astype(dtype)
    want = out.copy()
    want[pos] = src
    scatter_rows(out, pos, src)
    np.testing.assert_array_equal(out, want)


def test_positions_outside_the_rows_are_refused_before_anything_is_copied() -> None:
    src = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = np.zeros((2, 3), np.float32)
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(KernelError, match="outside 4 rows"):
            gather_rows(src, np.array(bad, np.int64), out)
        with pytest.raises(KernelError, match="outside 4 rows"):
            scatter_rows(src.copy(), np.array(bad, np.int64), out)
    assert not out.any()
    before = src.copy()
    with pytest.raises(KernelError):
        scatter_rows(src, np.array([1, 9], np.int64), np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(src, before)  # the valid first row was not written


@pytest.mark.parametrize("call", [
    lambda s, o: gather_rows(s, np.array([0], np.int32), o),  # positions must be int64
    lambda s, o: gather_rows(s, np.array([0], np.int64), np.zeros((1, 3), np.float64)),
    lambda s, o: gather_rows(s, np.array([0, 1], np.int64), o),  # out has one row
    lambda s, o: gather_rows(s[:, ::2], np.array([0], np.int64)),  # not contiguous
    lambda s, o: gather_rows(s, np.array([0], np.int64),
                             np.zeros((1, 6), np.float32)[:, ::2]),  # out not contiguous
    lambda s, o: scatter_rows(s, np.array([0], np.int64), np.zeros((1, 2), np.float32)),
    lambda s, o: scatter_rows(np.zeros(3, np.float32), np.array([0], np.int64), o),
    lambda s, o: scatter_rows(s.copy().view(np.float32), np.array([[0]], np.int64), o),
])
def test_wrong_arrays_are_refused(call: object) -> None:
    src = np.arange(12, dtype=np.float32).reshape(4, 3)
    with pytest.raises(KernelError):
        call(src, np.zeros((1, 3), np.float32))  # type: ignore[operator]


def test_a_read_only_output_is_refused() -> None:
    out = np.zeros((4, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(KernelError, match="writeable"):
        scatter_rows(out, np.array([0], np.int64), np.ones((1, 3), np.float32))
