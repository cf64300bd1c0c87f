"""Tensor <-> frame conversion.

Owns how an array's bytes are cut into frames of about ``frame_bytes`` (a whole
number of elements each) and put back together. Outgoing frames are
memoryviews of the caller's array (no copy); incoming frames become
``np.frombuffer`` views or are copied once into a caller-owned array. Imports
numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument
from .schema import DTYPES, dtype_name

DEFAULT_FRAME_BYTES = 1 << 20
DEFAULT_CHUNK_BYTES = 4 << 20

Buffer = bytes | memoryview | Any  # anything exposing the buffer protocol


def wire_dtype(name: str, array: np.ndarray[Any, Any]) -> str:
    """The wire dtype name of ``array`` or an ``InvalidArgument`` naming ``name``."""
    dt = dtype_name(array.dtype)
    if dt is None:
        raise InvalidArgument(
            f"array {name!r} has dtype {array.dtype}, not one of {sorted(DTYPES)}"
        )
    return dt


def require_contiguous(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The flat (1-D) view of a C-contiguous array; non-contiguous arrays are refused,
    because a silent copy would hide a full extra pass over a large tensor."""
    if not isinstance(array, np.ndarray):
        raise InvalidArgument(f"{name!r} must be a numpy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise InvalidArgument(
            f"array {name!r} is not C-contiguous; pass np.ascontiguousarray(...) explicitly"
        )
    return array.reshape(-1)


def chunk_elements(itemsize: int, chunk_bytes: int) -> int:
    """How many elements one chunk (key part) holds."""
    return max(1, chunk_bytes // itemsize)


def part_ranges(size: int, itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(offset, count)] of each part of a flat tensor of ``size`` elements.
    A tensor of at most ``chunk_bytes`` (or empty) is one part."""
    per = chunk_elements(itemsize, chunk_bytes)
    if size <= per:
        return [(0, size)]
    return [(off, min(per, size - off)) for off in range(0, size, per)]


def part_range(size: int, itemsize: int, chunk_bytes: int, part: int) -> tuple[int, int] | None:
    """(offset, count) of ``part`` as ``part_ranges`` cuts it, or None when the
    tensor has no such part."""
    per = chunk_elements(itemsize, chunk_bytes)
    if size <= per:
        return (0, size) if part == 0 else None
    offset = part * per
    if offset >= size:
        return None
    return offset, min(per, size - offset)


def _frame_step(itemsize: int, frame_bytes: int) -> int:
    """Bytes per full frame: the whole elements that fit in ``frame_bytes``, at least one."""
    return max(1, frame_bytes // itemsize) * itemsize


def frame_spans(nbytes: int, itemsize: int, frame_bytes: int) -> list[tuple[int, int]]:
    """The (start, end) byte offsets of the frames ``split_frames`` cuts ``nbytes``
    of data into; one empty frame for none."""
    per = _frame_step(itemsize, frame_bytes)
    return [(a, min(a + per, nbytes)) for a in range(0, nbytes, per)] or [(0, 0)]


def split_frames(flat: np.ndarray[Any, Any], frame_bytes: int) -> list[memoryview]:
    """Zero-copy views of a 1-D contiguous array, each at most ``frame_bytes``
    (and at least one element), covering it in order. An empty array gives one
    empty frame."""
    # via a uint8 view: some dtypes (bfloat16) have no buffer-protocol format
    view = memoryview(flat.view(np.uint8))  # type: ignore[arg-type]
    if len(view) <= _frame_step(flat.itemsize, frame_bytes):
        return [view]
    return [view[a:b] for a, b in frame_spans(len(view), flat.itemsize, frame_bytes)]


def split_rows(rows: np.ndarray[Any, Any], frame_bytes: int) -> list[memoryview]:
    """Zero-copy frames of a C-contiguous 2-D array, each holding whole rows (at
    least one) and at most ``frame_bytes`` where a row fits, so a receiver can
    place each frame's rows without joining frames first."""
    row_bytes = max(1, rows.shape[1] * rows.itemsize)
    per = max(1, frame_bytes // row_bytes)
    if rows.shape[0] <= per:
        return split_frames(rows.reshape(-1), max(frame_bytes, rows.nbytes))
    return [memoryview(rows[i : i + per].reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            for i in range(0, rows.shape[0], per)]


def row_blocks(frames: Sequence[Buffer], dtype: np.dtype[Any], dim: int,
               rows: int) -> list[np.ndarray[Any, Any]]:
    """Frames of a (rows, dim) array as blocks of consecutive rows: a read-only view
    per frame where every frame holds whole rows (as ``split_rows`` cuts them), else
    one joined copy of all of them."""
    row_bytes = dim * dtype.itemsize
    if row_bytes and all(memoryview(f).nbytes % row_bytes == 0 for f in frames):
        return [np.frombuffer(f, dtype).reshape(-1, dim) for f in frames]
    return [join_frames(frames, dtype).reshape(rows, dim)]


def frame_count(nbytes: int, itemsize: int, frame_bytes: int) -> int:
    """How many frames ``split_frames`` makes for ``nbytes`` of data."""
    per = _frame_step(itemsize, frame_bytes)
    return max(1, -(-nbytes // per))


def join_frames(
    frames: Sequence[Buffer], dtype: np.dtype[Any], out: np.ndarray[Any, Any] | None = None
) -> np.ndarray[Any, Any]:
    """Frames -> 1-D array. Without ``out`` a single frame becomes a read-only
    view of the frame's memory (valid while the frame lives); several frames are
    copied into a new array. With ``out`` (1-D, right size) the data is copied
    into it."""
    views = [np.frombuffer(f, dtype=dtype) for f in frames]
    if out is None:
        if len(views) == 1:
            return views[0]
        out = np.empty(sum(v.size for v in views), dtype=dtype)
    pos = 0
    for v in views:
        out[pos : pos + v.size] = v
        pos += v.size
    return out
