"""Process-wide allocator tuning for processes that move large messages.

libzmq allocates every received message with malloc. With glibc's defaults a
1 MiB buffer is served by a fresh mmap, or from heap memory that free() gave
back to the kernel, so every received byte is page-faulted in again (about one
fault per 4 KiB page). Raising the mmap threshold and the trim threshold keeps
freed message buffers in the heap for reuse. No effect outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_buffers(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Ask glibc to serve allocations below ``mmap_threshold`` from the heap and to
    keep up to ``trim_threshold`` bytes of freed heap instead of returning them.
    Returns False (and changes nothing) where glibc's ``mallopt`` is missing."""
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
