"""Shared-memory data frames between a client and the shards on its host.

Owns the segment files (``/dev/shm/pserver-<pid>-<16 hex>``, PROTOCOL.md §4.6):

- ``Arena``, on the client: creates segments (at most half the space the file
  system has left, reserved with ``posix_fallocate``, so a full ``/dev/shm`` is an
  error at creation and never a SIGBUS later), hands out one ``Block`` per request
  for its data and its reply,
  takes blocks back, and unlinks its segments at ``close``. Segments left by a
  client killed with SIGKILL are unlinked by the next arena made on the host.
- ``Mappings``, on a shard: opens a client's segment by name (a regular file in
  the shared-memory directory owned by this user, nothing else), maps it, keeps
  the most recently used mappings, and gives memoryviews of the spans a header
  names after checking that they lie inside the segment and that the file did
  not shrink since it was mapped (its pages would be gone: a SIGBUS). Mappings
  of clients that exited are dropped (``drop_dead``, once a second).

A request in shared memory carries no ZeroMQ data frames: its header names the
segment, the span of every frame and the region the reply may be written to.
Only a copy into the arena and one out of it remain of the bytes' way through
the kernel's unix socket. Imports nothing from the package but its errors;
never zmq.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError, SharedMemoryUnavailable

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ALIGN = 64  # every span starts on a cache line
MIN_SEGMENT_BYTES = 64 << 20
DEFAULT_LIMIT_BYTES = 1 << 30  # per client, over all its segments
MAPPINGS_KEPT = 64  # per shard: segments of this many clients stay mapped
# page tables filled at once: a fresh mapping does not fault on every first touch
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
NAME_RE = re.compile(r"pserver-([0-9]{1,10})-[0-9a-f]{16}\Z")


def aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def as_bytes(frame: Any) -> np.ndarray[Any, Any]:
    """A flat uint8 view of one contiguous data frame (array, memoryview, bytes)."""
    if isinstance(frame, np.ndarray):
        return frame.reshape(-1).view(np.uint8)
    return np.frombuffer(frame, dtype=np.uint8)


class _Segment:
    """One mapped segment file and its free space (first fit, coalesced)."""

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.mm = mm
        self.array = np.frombuffer(mm, dtype=np.uint8)
        self.free: list[list[int]] = [[0, size]]  # [offset, length], sorted, disjoint

    def take(self, nbytes: int) -> int | None:
        for i, (off, length) in enumerate(self.free):
            if length >= nbytes:
                if length == nbytes:
                    del self.free[i]
                else:
                    self.free[i] = [off + nbytes, length - nbytes]
                return off
        return None

    def give(self, off: int, nbytes: int) -> None:
        free = self.free
        i = 0
        while i < len(free) and free[i][0] < off:
            i += 1
        free.insert(i, [off, nbytes])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free.pop(i + 1)[1]
        if i and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1][1] += free.pop(i)[1]


@dataclass(eq=False)
class Block:
    """``nbytes`` bytes at ``offset`` of one of an arena's segments."""

    segment: _Segment
    offset: int
    nbytes: int

    @property
    def name(self) -> str:
        return self.segment.name

    def array(self, offset: int, nbytes: int) -> np.ndarray[Any, Any]:
        """The bytes at segment offset ``offset`` (must lie inside this block)."""
        return self.segment.array[offset : offset + nbytes]

    def holds(self, offset: int, nbytes: int) -> bool:
        return self.offset <= offset and offset + nbytes <= self.offset + self.nbytes


def _pid_of(name: str) -> int:
    m = NAME_RE.match(name)
    return int(m.group(1)) if m else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _room(directory: str) -> int:
    """Bytes the file system holding ``directory`` has free (0 if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _unlink(directory: str, name: str) -> bool:
    """Remove segment file ``name`` if this user owns it; whether it was removed."""
    path = os.path.join(directory, name)
    try:
        if os.lstat(path).st_uid != os.geteuid():
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def sweep(directory: str = SHM_DIR) -> int:
    """Unlink this user's segments whose creating process is gone; returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if NAME_RE.match(name) is not None and not _alive(_pid_of(name)):
            removed += _unlink(directory, name)
    if removed:
        log.info("removed %d shared-memory segments of exited clients", removed)
    return removed


class Arena:
    """A client's shared memory: segments made on first need, at most
    ``limit_bytes`` in all; ``alloc`` returns None when a block does not fit (the
    caller then sends its bytes through the socket)."""

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                 directory: str = SHM_DIR) -> None:
        self.limit_bytes = limit_bytes
        self.directory = directory
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._closed = False
        self._failed = False  # a segment could not be made: do not try again
        self.blocks_out = 0
        sweep(directory)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def alloc(self, nbytes: int) -> Block | None:
        nbytes = aligned(max(nbytes, 1))
        with self._lock:
            if self._closed:
                return None
            for seg in self._segments:
                off = seg.take(nbytes)
                if off is not None:
                    self.blocks_out += 1
                    return Block(seg, off, nbytes)
            fresh = self._new_segment(nbytes)
            if fresh is None:
                return None
            fresh.take(nbytes)  # at 0: the segment is new and large enough
            self.blocks_out += 1
            return Block(fresh, 0, nbytes)

    def free(self, block: Block) -> None:
        with self._lock:
            if not self._closed:
                block.segment.give(block.offset, block.nbytes)
                self.blocks_out -= 1

    def _new_segment(self, nbytes: int) -> _Segment | None:
        if self._failed or not hasattr(os, "posix_fallocate"):
            return None  # without a reservation a full file system would be a SIGBUS
        size = max(MIN_SEGMENT_BYTES, 1 << (nbytes - 1).bit_length(),
                   2 * (self._segments[-1].size if self._segments else 0))
        # at most half of what the file system has left (a container's /dev/shm may
        # hold only 64 MiB), and within the client's limit
        size = min(size, self.limit_bytes - self.reserved_bytes, _room(self.directory) // 2)
        size = max(size, 0) & ~(ALIGN - 1)
        if size < nbytes:
            return None
        name = f"pserver-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("no shared memory (%s): data goes through the socket", exc)
            self._failed = True
            return None
        try:
            os.posix_fallocate(fd, 0, size)  # reserve now: a full tmpfs fails here
            mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM) and self._segments:
                return None  # the segments made so far still serve
            log.warning("no shared memory segment of %d bytes (%s): data goes through the "
                        "socket", size, exc)
            self._failed = True
            return None
        finally:
            os.close(fd)
        seg = _Segment(name, size, mm)
        self._segments.append(seg)
        log.debug("shared-memory segment %s of %d bytes", name, size)
        return seg

    def close(self) -> None:
        """Unlink every segment (shards keep their mappings until they drop them)."""
        with self._lock:
            self._closed = True
            for seg in self._segments:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, seg.name))
                seg.array = np.empty(0, np.uint8)
                with contextlib.suppress(BufferError):
                    seg.mm.close()  # views still held elsewhere keep it mapped
            self._segments = []


class Mappings:
    """A shard's view of its clients' segments, opened by name and kept mapped
    (the ``keep`` most recently used)."""

    def __init__(self, keep: int = MAPPINGS_KEPT, directory: str = SHM_DIR) -> None:
        self.keep = keep
        self.directory = directory
        # name -> (the mapped bytes, the open file: its size is checked at each use)
        self._maps: collections.OrderedDict[str, tuple[np.ndarray[Any, Any], int]] = \
            collections.OrderedDict()

    def _segment(self, name: str) -> np.ndarray[Any, Any]:
        entry = self._maps.get(name)
        if entry is not None:
            seg, fd = entry
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = -1
            if size < seg.size:  # shrunk: touching its lost pages would be a SIGBUS
                self._forget(name)
                raise SharedMemoryUnavailable(f"shared memory {name} shrank to {size} bytes "
                                              f"after it was mapped with {seg.size}")
            self._maps.move_to_end(name)
            return seg
        if NAME_RE.match(name) is None:
            raise ProtocolError(f"{name!r} is not a shared-memory segment name")
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot open shared memory {name}: "
                                          f"{exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size == 0:
                raise SharedMemoryUnavailable(f"shared memory {name} is not a segment of "
                                              "this user")
            mm = mmap.mmap(fd, st.st_size, flags=_MAP_FLAGS)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise SharedMemoryUnavailable(f"cannot map shared memory {name}: "
                                              f"{exc.strerror}") from None
            raise
        seg = np.frombuffer(mm, dtype=np.uint8)  # the mapping lives while views do
        self._maps[name] = (seg, fd)
        while len(self._maps) > self.keep:
            self._forget(next(iter(self._maps)))
        return seg

    def _forget(self, name: str) -> None:
        _, fd = self._maps.pop(name)
        with contextlib.suppress(OSError):
            os.close(fd)

    def spans(self, name: str, spans: tuple[tuple[int, int], ...]) -> list[memoryview]:
        """Views of ``spans`` ((offset, length) each) of segment ``name``."""
        seg = self._segment(name)
        out = []
        for off, n in spans:
            if off + n > seg.size:
                raise ProtocolError(f"span [{off}, {off + n}) lies outside shared memory "
                                    f"{name} of {seg.size} bytes")
            out.append(memoryview(seg[off : off + n]))  # type: ignore[arg-type]
        return out

    def region(self, name: str, off: int, nbytes: int) -> np.ndarray[Any, Any]:
        """The writable bytes [off, off + nbytes) of segment ``name``."""
        seg = self._segment(name)
        if off + nbytes > seg.size:
            raise ProtocolError(f"reply region [{off}, {off + nbytes}) lies outside shared "
                                f"memory {name} of {seg.size} bytes")
        return seg[off : off + nbytes]

    def drop_dead(self) -> int:
        """Forget the segments whose creating process is gone, and unlink them (a
        client killed with SIGKILL): their memory is freed once no view is left.
        Returns how many."""
        dead = [n for n in self._maps if not _alive(_pid_of(n))]
        for name in dead:
            self._forget(name)
            _unlink(self.directory, name)  # unless a client's sweep was first
        if dead:
            log.info("dropped the shared memory of %d exited clients", len(dead))
        return len(dead)

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        for name in list(self._maps):
            self._forget(name)
