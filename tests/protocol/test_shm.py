"""Shared-memory segments (protocol/shm.py) and the header's 'x' field: the client's
arena (blocks, coalescing, the limit, clean-up) and a shard's checked mappings."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from pserver.protocol import shm
from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.errors import ProtocolError, RequestTooLarge, SharedMemoryUnavailable
from pserver.protocol.schema import Header, Kind, Limits, ShmRef
from pserver.protocol.shm import (
    ALIGN,
    MIN_SEGMENT_BYTES,
    Arena,
    Mappings,
    sweep,
)

LIMITS = Limits()


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    a = Arena(directory=str(tmp_path))
    yield a
    a.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_blocks_are_aligned_disjoint_and_reused_after_free(arena: Arena) -> None:
    a, b, c = (arena.alloc(n) for n in (100, 1, 5000))
    assert a and b and c
    spans = sorted((x.offset, x.offset + x.nbytes) for x in (a, b, c))
    assert all(off % ALIGN == 0 for off, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    for x in (b, a, c):  # freed out of order: the free space coalesces back into one
        arena.free(x)
    assert arena.blocks_out == 0
    whole = arena.alloc(MIN_SEGMENT_BYTES)
    assert whole is not None and whole.offset == 0
    assert len(os.listdir(arena.directory)) == 1  # still the one segment


def test_a_block_is_shared_with_whoever_maps_the_segment(arena: Arena, tmp_path: Path) -> None:
    block = arena.alloc(4096)
    assert block is not None
    data = (np.arange(4096) % 251).astype(np.uint8)
    block.array(block.offset, 4096)[:] = data
    maps = Mappings(directory=str(tmp_path))
    (view,) = maps.spans(block.name, ((block.offset, 4096),))
    assert bytes(view) == data.tobytes()
    maps.region(block.name, block.offset, 16)[:] = 7  # the shard writes a reply
    assert list(block.array(block.offset, 16)) == [7] * 16


def test_segments_grow_up_to_the_limit_then_alloc_says_no(tmp_path: Path) -> None:
    arena = Arena(limit_bytes=MIN_SEGMENT_BYTES * 3, directory=str(tmp_path))
    try:
        first = arena.alloc(MIN_SEGMENT_BYTES)
        second = arena.alloc(MIN_SEGMENT_BYTES)  # a second, larger segment (up to the limit)
        assert first and second and first.name != second.name
        assert arena.reserved_bytes <= 3 * MIN_SEGMENT_BYTES
        assert arena.alloc(2 * MIN_SEGMENT_BYTES) is None  # over the limit: use the socket
        arena.free(first)
        assert arena.alloc(MIN_SEGMENT_BYTES) is not None
    finally:
        arena.close()


def test_segments_take_at_most_half_the_free_space(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's /dev/shm may hold 64 MiB: segments shrink to fit it."""
    monkeypatch.setattr(shm, "_room", lambda _d: 16 << 20)
    arena = Arena(directory=str(tmp_path))
    try:
        block = arena.alloc(1 << 20)
        assert block is not None and arena.reserved_bytes == 8 << 20
        assert arena.alloc(9 << 20) is None  # more than half of what is left
    finally:
        arena.close()


def test_close_unlinks_the_segments(tmp_path: Path) -> None:
    arena = Arena(directory=str(tmp_path))
    assert arena.alloc(10) is not None
    assert len(os.listdir(tmp_path)) == 1
    arena.close()
    assert os.listdir(tmp_path) == []
    assert arena.alloc(10) is None


def test_no_shared_memory_directory_means_no_blocks(tmp_path: Path) -> None:
    arena = Arena(directory=str(tmp_path / "missing"))
    assert arena.alloc(10) is None
    arena.close()


def test_sweep_removes_segments_of_exited_processes_only(tmp_path: Path) -> None:
    dead = tmp_path / f"pserver-{_dead_pid()}-0123456789abcdef"
    live = tmp_path / f"pserver-{os.getpid()}-0123456789abcdef"
    other = tmp_path / "pserver-notasegment"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    assert sweep(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_new_arena_sweeps_what_a_killed_client_left(tmp_path: Path) -> None:
    left = tmp_path / f"pserver-{_dead_pid()}-00000000000000ff"
    left.write_bytes(b"\0" * 64)
    Arena(directory=str(tmp_path)).close()
    assert not left.exists()


@pytest.mark.parametrize("name", ["pserver-1-abc", "../etc/passwd", "pserver-1-0123456789abcdeF",
                                  "x" * 300])
def test_mappings_refuse_names_that_are_not_segments(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProtocolError):
        Mappings(directory=str(tmp_path)).spans(name, ((0, 1),))


def test_mappings_refuse_missing_links_and_empty_files(tmp_path: Path) -> None:
    maps = Mappings(directory=str(tmp_path))
    name = "pserver-1-0123456789abcdef"
    with pytest.raises(SharedMemoryUnavailable):
        maps.spans(name, ((0, 1),))  # no such segment
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 4096)
    (tmp_path / name).symlink_to(target)
    with pytest.raises(SharedMemoryUnavailable):
        maps.spans(name, ((0, 1),))  # a link is not followed
    (tmp_path / name).unlink()
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(SharedMemoryUnavailable):
        maps.spans(name, ((0, 1),))


def test_spans_and_regions_must_lie_inside_the_segment(arena: Arena, tmp_path: Path) -> None:
    block = arena.alloc(64)
    assert block is not None
    maps = Mappings(directory=str(tmp_path))
    size = MIN_SEGMENT_BYTES
    assert len(maps.spans(block.name, ((size - 8, 8),))[0]) == 8
    with pytest.raises(ProtocolError):
        maps.spans(block.name, ((size - 8, 9),))
    with pytest.raises(ProtocolError):
        maps.region(block.name, size, 1)


def test_a_segment_that_shrank_is_refused_not_touched(arena: Arena, tmp_path: Path) -> None:
    """Reading a mapped page past the end of a shrunk file is a SIGBUS: a shard
    checks the size at each use and refuses the segment instead."""
    block = arena.alloc(64)
    assert block is not None
    maps = Mappings(directory=str(tmp_path))
    maps.spans(block.name, ((0, 64),))
    os.truncate(tmp_path / block.name, 4096)
    with pytest.raises(SharedMemoryUnavailable, match="shrank"):
        maps.spans(block.name, ((0, 64),))
    assert len(maps) == 0
    # mapped again at its new size: in bounds works, beyond is refused
    assert len(maps.spans(block.name, ((0, 64),))[0]) == 64
    with pytest.raises(ProtocolError):
        maps.region(block.name, 4096, 64)


def test_mappings_of_exited_clients_are_dropped_and_unlinked(tmp_path: Path) -> None:
    maps = Mappings(directory=str(tmp_path))
    dead = f"pserver-{_dead_pid()}-0123456789abcdef"
    live = f"pserver-{os.getpid()}-0123456789abcdef"
    for name in (dead, live):
        (tmp_path / name).write_bytes(b"\0" * 4096)
        maps.spans(name, ((0, 8),))
    assert maps.drop_dead() == 1
    assert len(maps) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [live]


def test_mappings_keep_the_most_recent_segments(tmp_path: Path) -> None:
    arenas = [Arena(directory=str(tmp_path)) for _ in range(3)]
    try:
        blocks = [a.alloc(8) for a in arenas]
        maps = Mappings(keep=2, directory=str(tmp_path))
        views = [maps.spans(b.name, ((0, 8),))[0] for b in blocks if b is not None]
        assert len(maps) == 2
        assert all(len(v) == 8 for v in views)  # a dropped mapping lives while views do
    finally:
        for a in arenas:
            a.close()


# -- the header's 'x' field -------------------------------------------------------------


def test_shm_ref_round_trips() -> None:
    ref = ShmRef("pserver-12-0123456789abcdef", ((0, 4096), (4096, 64)), (4160, 8192))
    h = decode_header(encode_header(Header(Kind.PUSH_PULL, 5, shm=ref)), LIMITS)
    assert h.shm == ref
    h = decode_header(encode_header(Header(Kind.REPLY, 5, shm=ShmRef(ref.name, ref.spans))),
                      LIMITS)
    assert h.shm == ShmRef(ref.name, ref.spans, None)
    assert decode_header(encode_header(Header(Kind.PUSH, 6)), LIMITS).shm is None


@pytest.mark.parametrize("x", [
    "pserver-1-0123456789abcdef",  # not a list
    ["pserver-1-0123456789abcdef", []],  # two fields
    ["../x", [], None],
    [7, [], None],
    ["pserver-1-0123456789abcdef", [[0]], None],
    ["pserver-1-0123456789abcdef", [[-1, 4]], None],
    ["pserver-1-0123456789abcdef", [[0, "4"]], None],
    ["pserver-1-0123456789abcdef", {}, None],
    ["pserver-1-0123456789abcdef", [], [0, 1, 2]],
])
def test_malformed_shm_fields_are_protocol_errors(x: object) -> None:
    raw = msgpack.packb({"v": 1, "k": int(Kind.PUSH), "id": 9, "x": x})
    with pytest.raises(ProtocolError) as err:
        decode_header(raw, LIMITS)
    assert err.value.details.get("request_id") == 9


def test_too_many_or_too_long_spans_are_too_large() -> None:
    name = "pserver-1-0123456789abcdef"
    many = msgpack.packb({"v": 1, "k": int(Kind.PUSH), "id": 1,
                          "x": [name, [[0, 1]] * (LIMITS.max_frames + 1), None]})
    with pytest.raises(RequestTooLarge):
        decode_header(many, LIMITS)
    long = msgpack.packb({"v": 1, "k": int(Kind.PUSH), "id": 1,
                          "x": [name, [[0, LIMITS.max_request_bytes + 1]], None]})
    with pytest.raises(ProtocolError):
        decode_header(long, LIMITS)
