"""pserver.wal: durable Raft log records, torn tails, corruption, group commit."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pserver.raft.types import Entry, HardState, Payload
from pserver.wal import WAL, WALError, WALFull, atomic_write


def _recover(path: Path, **kw: Any) -> Any:
    """What a fresh open of ``path`` recovers (the log is closed again)."""
    wal, rec = WAL.open(path, **kw)
    wal.close()
    return rec


def _entries(n: int, term: int = 1, start: int = 1) -> list[Entry]:
    return [Entry(term, i, f"data-{term}-{i}".encode() * (i % 5)) for i in range(start, start + n)]


def test_entries_and_hard_state_survive_a_reopen(tmp_path: Path) -> None:
    wal, rec = WAL.open(tmp_path)
    assert rec.entries == [] and rec.hard_state == HardState()
    wal.append(_entries(10), HardState(term=1, vote=2, commit=4))
    wal.sync()
    wal.close()
    rec = _recover(tmp_path)
    assert rec.entries == _entries(10)
    assert rec.hard_state == HardState(1, 2, 4)


def test_an_entry_kept_as_parts_is_written_as_one_record(tmp_path: Path) -> None:
    """A leader's entry (a Payload of the clients' frames) is logged part by part,
    checksummed over all of them, and read back as one buffer with the same bytes."""
    parts = [b"head", memoryview(bytearray(range(256)) * 8000), b"", b"tail" * 100]
    entry = Entry(2, 1, Payload(parts))
    wal, _ = WAL.open(tmp_path)
    wal.append([entry, Entry(2, 2, b"after")])
    wal.sync()
    wal.close()
    rec = _recover(tmp_path)
    assert rec.entries == [entry, Entry(2, 2, b"after")]
    assert bytes(rec.entries[0].data) == b"".join(bytes(p) for p in parts)


def test_an_entry_at_or_below_the_last_index_replaces_the_log_from_there(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path)
    wal.append(_entries(5))
    wal.append([Entry(2, 3, b"new")])
    wal.sync()
    wal.close()
    rec = _recover(tmp_path)
    assert [(e.term, e.index) for e in rec.entries] == [(1, 1), (1, 2), (2, 3)]


def test_a_gap_in_the_indices_refuses_to_open(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path)
    wal.append([Entry(1, 1), Entry(1, 3)])
    wal.sync()
    wal.close()
    with pytest.raises(WALError, match="does not follow"):
        _recover(tmp_path)


def test_a_torn_tail_is_cut_at_every_byte(tmp_path: Path) -> None:
    """A crash mid-write leaves any prefix of the last record: recovery keeps every
    earlier record, cuts the rest, and the log takes appends again."""
    base = tmp_path / "base"
    wal, _ = WAL.open(base)
    wal.append(_entries(3), HardState(1, 1, 2))
    wal.sync()
    good = (base / "0000000000000000.wal").stat().st_size
    wal.append([Entry(1, 4, b"x" * 40)])
    wal.sync()
    wal.close()
    full = (base / "0000000000000000.wal").read_bytes()
    for cut in range(good, len(full)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "0000000000000000.wal").write_bytes(full[:cut])
        w2, rec = WAL.open(d)
        assert rec.entries == _entries(3), cut
        assert rec.hard_state == HardState(1, 1, 2)
        assert (d / "0000000000000000.wal").stat().st_size == good
        w2.append([Entry(1, 4, b"again")])
        w2.sync()
        w2.close()
        assert _recover(d).entries[-1] == Entry(1, 4, b"again")


def test_a_bad_record_followed_by_good_ones_refuses_to_start(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path)
    wal.append(_entries(5))
    wal.sync()
    wal.close()
    seg = tmp_path / "0000000000000000.wal"
    data = bytearray(seg.read_bytes())
    data[20] ^= 0xFF  # inside the first record's payload (after its 17-byte header)
    seg.write_bytes(bytes(data))
    with pytest.raises(WALError, match="corrupt record at byte 0"):
        _recover(tmp_path)


def test_segments_rotate_and_replay_in_order(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, segment_bytes=200)
    for i in range(1, 41):
        wal.append([Entry(1, i, b"y" * 30)])
    wal.append([Entry(2, 35, b"z")], HardState(2, 1, 30))
    wal.sync()
    wal.close()
    assert len(list(tmp_path.glob("*.wal"))) > 5
    rec = _recover(tmp_path, segment_bytes=200)
    assert len(rec.entries) == 35 and rec.entries[-1] == Entry(2, 35, b"z")
    assert rec.hard_state == HardState(2, 1, 30)


def test_one_fsync_serves_a_whole_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: records appended together become durable with one fsync."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    wal, _ = WAL.open(tmp_path)
    monkeypatch.setattr(os, "fsync", counting)
    wal.append(_entries(100), HardState(1, 1, 50))
    wal.sync()
    wal.sync()  # nothing new: no fsync
    assert len(calls) == 1 and wal.syncs == 1
    wal.close()


@pytest.mark.parametrize(("err", "exc"), [(errno.ENOSPC, WALFull), (errno.EIO, WALError)])
def test_a_failed_fsync_stops_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      err: int, exc: Any) -> None:
    wal, _ = WAL.open(tmp_path)

    def failing(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing)
    wal.append(_entries(2))
    with pytest.raises(exc):
        wal.sync()
    monkeypatch.undo()
    with pytest.raises(WALError):  # stopped: nothing after a failure is acknowledged
        wal.append(_entries(1, start=3))
    with pytest.raises(WALError):
        wal.sync()
    wal.close()


_WRITE_FAILS = """
import resource, signal, sys
from pathlib import Path
from pserver.raft.types import Entry
from pserver.wal import WAL, WALError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
wal, _ = WAL.open(Path(sys.argv[1]))
wal.append([Entry(1, 1, b"a" * 100)])
wal.sync()
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
try:
    wal.append([Entry(1, 2, b"b" * 150)])  # buffered: refused at the flush
    wal.sync()
except WALError as exc:
    print("failed:", exc)
try:
    wal.append([Entry(1, 3, b"c")])
except WALError:
    print("stopped")
wal.close()  # the buffered record cannot be written: dropped, no exception
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
again, rec = WAL.open(Path(sys.argv[1]))
print("recovered", [e.index for e in rec.entries])
again.close()
"""


def test_a_real_failed_write_stops_the_log_and_close_drops_the_rest(tmp_path: Path) -> None:
    """A write the OS refuses (EFBIG under a file-size limit, in a process of its own)
    stops the log; closing it drops what could not be written instead of raising
    (a replica stopping on a failed write exits with its own code), and the log
    reopens with the records synced before the failure, the torn part cut."""
    res = subprocess.run([sys.executable, "-c", _WRITE_FAILS, str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("failed: ") and "File too large" in lines[0], lines
    assert lines[1:] == ["stopped", "recovered [1]"], lines


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "snapshot"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot"]


def test_atomic_write_syncs_the_data_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order that makes a crash leave the old file or the new one: the new
    bytes are durable before the rename, and the rename is durable (the directory
    synced) before atomic_write returns. The real calls run; they are recorded."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "snapshot"
    atomic_write(target, b"new contents")
    tmp = str(target) + ".tmp"
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert target.read_bytes() == b"new contents"


def test_compaction_keeps_only_the_entries_after_the_snapshot(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, segment_bytes=256)
    wal.append(_entries(30), HardState(1, 1, 30))
    wal.sync()
    before = set(tmp_path.glob("*.wal"))
    assert len(before) > 1
    wal.compact(20, 1, _entries(10, start=21), HardState(1, 1, 30))
    wal.append(_entries(2, term=2, start=31))
    wal.sync()
    assert before <= set(tmp_path.glob("*.wal"))  # dead, deleted by tidy, one per call
    assert _recover(tmp_path).entries == _entries(10, start=21) + _entries(2, term=2, start=31)
    deleted = 0
    while wal.tidy():
        deleted += 1
        assert len(before & set(tmp_path.glob("*.wal"))) == len(before) - deleted
    assert deleted == len(before)
    wal.close()
    assert not before & set(tmp_path.glob("*.wal"))  # the old segments are gone
    rec = _recover(tmp_path)
    assert (rec.base_index, rec.base_term) == (20, 1)
    assert rec.entries == _entries(10, start=21) + _entries(2, term=2, start=31)
    assert rec.hard_state == HardState(1, 1, 30)


def test_a_crash_during_compaction_leaves_a_log_that_replays(tmp_path: Path) -> None:
    """Old segments are deleted newest first: whatever prefix of them a crash leaves
    replays, and the new segment's BASE record then resets the log."""
    wal, _ = WAL.open(tmp_path, segment_bytes=256)
    wal.append(_entries(30), HardState(1, 1, 30))
    wal.sync()
    old = sorted(tmp_path.glob("*.wal"))
    saved = {p: p.read_bytes() for p in old[:2]}
    wal.compact(25, 1, _entries(5, start=26), HardState(1, 1, 30))
    wal.close()
    for p, data in saved.items():  # as if the deletion stopped part way
        p.write_bytes(data)
    rec = _recover(tmp_path)
    assert rec.base_index == 25 and rec.entries == _entries(5, start=26)


def test_an_entry_at_or_below_the_base_refuses_to_open(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path)
    wal.compact(10, 1, [], HardState(1, 0, 10))
    wal.append([Entry(1, 5, b"x")])
    wal.sync()
    wal.close()
    with pytest.raises(WALError, match="does not follow"):
        _recover(tmp_path)


def test_an_entry_held_as_a_view_of_its_message_is_logged_and_recovered(
        tmp_path: Path) -> None:
    """Followers keep an entry as a view of the frame it arrived in (no copy): a
    writable buffer of several CRC pieces is logged and reads back byte for byte."""
    received = bytearray(range(256)) * ((3 << 20) // 256 + 7)  # > 3 pieces, odd end
    entry = Entry(1, 1, memoryview(received).toreadonly())  # type: ignore[arg-type]
    wal, _ = WAL.open(tmp_path)
    wal.append([entry, Entry(1, 2, b"small")], HardState(1, 1, 2))
    wal.sync()
    wal.close()
    rec = _recover(tmp_path)
    assert [bytes(e.data) for e in rec.entries] == [bytes(received), b"small"]


def _compacted(path: Path, keep_free: int = 4) -> tuple[WAL, int]:
    """A log whose first 30 entries (of 200 bytes: a segment each) went into a
    snapshot, every dead segment tidied. Returns the open log and how many
    segments died."""
    wal, _ = WAL.open(path, segment_bytes=256, keep_free=keep_free)
    wal.append([Entry(1, i, b"o" * 200) for i in range(1, 31)])
    wal.sync()
    dead = len(list(path.glob("*.wal"))) - 1
    wal.compact(30, 1, [], HardState(1, 1, 30))
    while wal.tidy():
        pass
    return wal, dead


def _big(start: int, n: int = 1) -> list[Entry]:
    """Entries of 150 bytes: one per 256-byte segment, each starting the next one."""
    return [Entry(2, i, bytes([i % 256]) * 150) for i in range(start, start + n)]


def test_dead_segments_are_kept_for_reuse_up_to_keep_free(tmp_path: Path) -> None:
    wal, dead = _compacted(tmp_path, keep_free=2)
    assert dead > 2
    free = sorted(tmp_path.glob("*.free"))
    assert len(free) == 2 and len(list(tmp_path.glob("*.wal"))) == 1  # the rest deleted
    inodes = {p.stat().st_ino for p in free}
    wal.append(_big(31, 2))  # two more segments
    wal.sync()
    segments = sorted(tmp_path.glob("*.wal"))
    assert not list(tmp_path.glob("*.free"))
    assert inodes <= {p.stat().st_ino for p in segments}  # the same files, renamed
    wal.close()
    rec = _recover(tmp_path, segment_bytes=256)
    assert rec.base_index == 30 and rec.entries == _big(31, 2)


def test_old_records_after_the_new_ones_in_a_recycled_segment_are_cut(
        tmp_path: Path) -> None:
    """A crash leaves a recycled segment with its new records, then the records of
    its previous use (valid for that segment, with their own CRCs): recovery keeps
    exactly the new ones, and the log goes on from there."""
    wal, _ = _compacted(tmp_path)
    wal.append(_big(31), HardState(2, 1, 31))  # starts a recycled segment
    wal.sync()
    last = max(tmp_path.glob("*.wal"))
    assert last.stat().st_size > wal.synced_size  # old records follow the new ones
    wal._fh.close()  # a crash: no clean close (which would cut them)
    rec = _recover(tmp_path, segment_bytes=256)
    assert rec.entries == _big(31)
    assert rec.hard_state == HardState(2, 1, 31)
    wal, _ = WAL.open(tmp_path, segment_bytes=256)
    wal.append([Entry(2, 32, b"more")])
    wal.sync()
    wal.close()
    assert _recover(tmp_path).entries == [*_big(31), Entry(2, 32, b"more")]


def test_a_clean_close_cuts_a_recycled_segment_to_its_records(tmp_path: Path) -> None:
    wal, _ = _compacted(tmp_path)
    wal.append(_big(31))
    wal.sync()
    assert max(tmp_path.glob("*.wal")).stat().st_size > wal.synced_size
    wal.close()
    last = max(tmp_path.glob("*.wal"))
    data = last.read_bytes()
    wal, rec = WAL.open(tmp_path, segment_bytes=256)
    wal.close()
    assert last.read_bytes() == data  # nothing left to cut
    assert rec.entries == _big(31)


def test_a_bad_record_before_a_new_one_in_a_recycled_segment_refuses_to_start(
        tmp_path: Path) -> None:
    wal, _ = _compacted(tmp_path)
    wal.append(_big(31))  # starts a recycled segment
    wal.append([Entry(2, 32, b"b" * 40)])  # fits after it
    wal.sync()
    wal._fh.close()
    last = max(tmp_path.glob("*.wal"))
    data = bytearray(last.read_bytes())
    data[17 + 16 + 5] ^= 0xFF  # inside entry 31's data, the first record of the segment
    last.write_bytes(bytes(data))
    with pytest.raises(WALError, match="corrupt record at byte 0"):
        _recover(tmp_path)


def test_free_segments_found_at_open_are_reused_and_bounded(tmp_path: Path) -> None:
    wal, dead = _compacted(tmp_path, keep_free=4)
    wal.close()
    free = len(list(tmp_path.glob("*.free")))
    assert free == min(dead, 4)
    wal, _ = WAL.open(tmp_path, segment_bytes=256, keep_free=1)
    assert len(list(tmp_path.glob("*.free"))) == 1
    wal.append(_big(31))
    wal.sync()
    assert not list(tmp_path.glob("*.free"))
    wal.close()
