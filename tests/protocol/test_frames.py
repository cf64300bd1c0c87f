"""Unit tests for tensor <-> frame conversion."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pserver.protocol.errors import InvalidArgument
from pserver.protocol.frames import (
    frame_count,
    frame_spans,
    join_frames,
    part_ranges,
    require_contiguous,
    split_frames,
    wire_dtype,
)
from pserver.protocol.schema import DTYPES

dtypes = st.sampled_from(sorted(DTYPES)).map(lambda name: DTYPES[name])
sizes = st.integers(0, 3000)
frame_sizes = st.integers(1, 20_000)


def _array(size: int, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    # distinct values in every element so a reordering or overlap shows
    return (np.arange(size) % 1000 + 1).astype(dtype)


@given(size=sizes, dtype=dtypes, frame_bytes=frame_sizes)
def test_split_frames_covers_the_array_in_order(size: int, dtype: np.dtype[Any],
                                                 frame_bytes: int) -> None:
    arr = _array(size, dtype)
    frames = split_frames(arr, frame_bytes)
    assert len(frames) == frame_count(arr.nbytes, dtype.itemsize, frame_bytes)
    assert b"".join(bytes(f) for f in frames) == arr.tobytes()
    limit = max(frame_bytes, dtype.itemsize)  # at least one element per frame
    for f in frames:
        assert f.nbytes % dtype.itemsize == 0
        assert f.nbytes <= limit
        if size:
            assert f.nbytes > 0
    # every frame but the last is full
    assert len({f.nbytes for f in frames[:-1]}) <= 1


@given(size=sizes, dtype=dtypes, frame_bytes=frame_sizes)
def test_frame_spans_are_where_split_frames_cuts(size: int, dtype: np.dtype[Any],
                                                 frame_bytes: int) -> None:
    arr = _array(size, dtype)
    spans = frame_spans(arr.nbytes, dtype.itemsize, frame_bytes)
    raw = arr.tobytes()
    assert [raw[a:b] for a, b in spans] == [bytes(f) for f in split_frames(arr, frame_bytes)]


@given(size=sizes, dtype=dtypes, frame_bytes=frame_sizes)
def test_join_frames_inverts_split_frames(size: int, dtype: np.dtype[Any],
                                          frame_bytes: int) -> None:
    arr = _array(size, dtype)
    frames = split_frames(arr, frame_bytes)
    joined = join_frames(frames, dtype)
    assert joined.dtype == dtype
    assert joined.shape == (size,)
    np.testing.assert_array_equal(joined, arr)

    out = np.zeros(size, dtype=dtype)
    got = join_frames(frames, dtype, out=out)
    assert got is out
    np.testing.assert_array_equal(out, arr)


@given(size=sizes, dtype=dtypes, frame_bytes=frame_sizes)
def test_join_frames_of_copied_bytes(size: int, dtype: np.dtype[Any], frame_bytes: int) -> None:
    """Frames as they arrive off the wire (bytes objects) join to the same array."""
    arr = _array(size, dtype)
    frames = [bytes(f) for f in split_frames(arr, frame_bytes)]
    np.testing.assert_array_equal(join_frames(frames, dtype), arr)


def test_empty_array_is_one_empty_frame() -> None:
    frames = split_frames(np.empty(0, dtype=np.float32), 1024)
    assert [f.nbytes for f in frames] == [0]
    assert frame_count(0, 4, 1024) == 1
    assert join_frames(frames, np.dtype(np.float32)).size == 0


def test_frame_bytes_below_itemsize_gives_one_element_per_frame() -> None:
    arr = _array(5, np.dtype(np.float64))
    frames = split_frames(arr, 3)
    assert [f.nbytes for f in frames] == [8] * 5
    assert frame_count(arr.nbytes, 8, 3) == 5


def test_frame_bytes_rounds_down_to_whole_elements() -> None:
    arr = _array(10, np.dtype(np.float32))  # 40 bytes
    assert [f.nbytes for f in split_frames(arr, 10)] == [8, 8, 8, 8, 8]


@given(size=st.integers(1, 3000), dtype=dtypes, frame_bytes=frame_sizes)
def test_split_frames_is_zero_copy(size: int, dtype: np.dtype[Any], frame_bytes: int) -> None:
    arr = _array(size, dtype)
    frames = split_frames(arr, frame_bytes)
    for f in frames:
        assert isinstance(f, memoryview)
        assert np.shares_memory(np.frombuffer(f, dtype=dtype), arr)
    # a write to the array shows through the frames: they are views, not copies
    arr[-1] = 0
    assert np.frombuffer(frames[-1], dtype=dtype)[-1] == 0


def test_join_single_frame_is_a_view_of_the_frame() -> None:
    arr = _array(16, np.dtype(np.float32))
    (frame,) = split_frames(arr, 1 << 20)
    joined = join_frames([frame], np.dtype(np.float32))
    assert np.shares_memory(joined, arr)


def test_join_single_bytes_frame_is_read_only() -> None:
    joined = join_frames([_array(4, np.dtype(np.int32)).tobytes()], np.dtype(np.int32))
    assert not joined.flags.writeable


def test_join_several_frames_copies() -> None:
    arr = _array(16, np.dtype(np.float32))
    frames = split_frames(arr, 16)
    joined = join_frames(frames, np.dtype(np.float32))
    assert not np.shares_memory(joined, arr)
    arr[0] = -1
    assert joined[0] == 1


# -- part_ranges ----------------------------------------------------------------


@given(size=st.integers(0, 200_000), itemsize=st.sampled_from([2, 4, 8]),
       chunk_bytes=st.integers(64, 100_000))
def test_part_ranges_tile_the_tensor(size: int, itemsize: int, chunk_bytes: int) -> None:
    ranges = part_ranges(size, itemsize, chunk_bytes)
    per = max(1, chunk_bytes // itemsize)
    assert ranges[0][0] == 0
    for (off, count), (next_off, _) in itertools.pairwise(ranges):
        assert off + count == next_off
    assert sum(count for _, count in ranges) == size
    assert ranges[-1][0] + ranges[-1][1] == size
    assert all(count <= per for _, count in ranges)
    if size:
        assert all(count > 0 for _, count in ranges)
    assert len(ranges) == max(1, -(-size // per))


def test_small_and_empty_tensors_are_one_part() -> None:
    assert part_ranges(0, 4, 1024) == [(0, 0)]
    assert part_ranges(256, 4, 1024) == [(0, 256)]
    assert part_ranges(257, 4, 1024) == [(0, 256), (256, 1)]


# -- frame_count ----------------------------------------------------------------


@given(nelem=st.integers(0, 10_000), itemsize=st.sampled_from([2, 4, 8]),
       frame_bytes=frame_sizes)
def test_frame_count_matches_split_frames(nelem: int, itemsize: int, frame_bytes: int) -> None:
    dtype = {2: np.dtype("<f2"), 4: np.dtype("<f4"), 8: np.dtype("<f8")}[itemsize]
    arr = np.zeros(nelem, dtype=dtype)
    assert frame_count(arr.nbytes, itemsize, frame_bytes) == len(split_frames(arr, frame_bytes))


# -- argument checks ------------------------------------------------------------


def test_require_contiguous_returns_a_flat_view() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat = require_contiguous("w", arr)
    assert flat.shape == (12,)
    assert np.shares_memory(flat, arr)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.arange(10, dtype=np.float32)[::2], id="strided"),
        pytest.param(np.asfortranarray(np.ones((3, 4), dtype=np.float32)), id="fortran-order"),
        pytest.param(np.ones((3, 4), dtype=np.float64).T, id="transposed"),
        pytest.param(np.ones((4, 4), dtype=np.float32)[:, 1], id="column"),
    ],
)
def test_require_contiguous_refuses_non_contiguous(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(InvalidArgument, match="'w'"):
        require_contiguous("w", array)


@pytest.mark.parametrize(
    "value",
    [pytest.param([1.0, 2.0], id="list"), pytest.param(3.0, id="float")],
)
def test_require_contiguous_refuses_non_arrays(value: Any) -> None:
    with pytest.raises(InvalidArgument):
        require_contiguous("w", value)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_wire_dtype_accepts_allowed(name: str) -> None:
    assert wire_dtype("w", np.zeros(2, dtype=DTYPES[name])) == name
    assert wire_dtype("w", np.zeros(2, dtype=np.dtype(name))) == name


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(np.complex64, id="complex64"),
        pytest.param(np.int8, id="int8"),
        pytest.param(np.uint8, id="uint8"),
        pytest.param(np.bool_, id="bool"),
        pytest.param(np.int16, id="int16"),
        pytest.param(np.uint32, id="uint32"),
        pytest.param(np.dtype(">f4"), id="big-endian-float32"),
        pytest.param(np.dtype("U3"), id="unicode"),
        pytest.param(np.dtype(object), id="object"),
    ],
)
def test_wire_dtype_refuses(dtype: Any) -> None:
    with pytest.raises(InvalidArgument, match="'grad'"):
        wire_dtype("grad", np.zeros(2, dtype=dtype))
