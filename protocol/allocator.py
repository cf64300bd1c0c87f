"""Process-wide allocator tuning for processes that move large messages.

libzmq allocates every received message with malloc, and numpy every result or
gathered array. With glibc's defaults a buffer over 128 KiB is served by a fresh
mmap, or from heap memory that free() gave back to the kernel, so every byte is
page-faulted in again (about one fault per 4 KiB page: ~8 ms of a 26 MB
``pull_rows`` on this machine). Raising the mmap threshold and the trim
threshold keeps freed buffers in the heap for reuse. Shard processes apply it
at start; a ``Client`` applies it once per process unless
``PSERVER_KEEP_FREED_BUFFERS=0``. No effect outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

ENV_KEEP_FREED = "PSERVER_KEEP_FREED_BUFFERS"  # "0": a Client leaves glibc's defaults

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_buffers(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Ask glibc to serve allocations below ``mmap_threshold`` from the heap and to
    keep up to ``trim_threshold`` bytes of freed heap instead of returning them.
    Returns False (and changes nothing) where glibc's ``mallopt`` is missing. Done
    once per process per arguments (later calls return the first answer)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    log.debug("mallopt mmap=%d trim=%d: %s", mmap_threshold, trim_threshold, ok)
    return ok
