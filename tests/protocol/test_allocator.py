"""protocol.allocator: the glibc tuning that lets a process reuse freed message
buffers instead of faulting fresh pages in for every large message, checked in
fresh child processes (this test process keeps glibc's defaults)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A 16 MiB buffer is freed, then one of the same size is allocated and written:
# the minor page faults of the second one are counted.
_CHILD = """
import ctypes, json, resource, sys
import numpy as np
# One fault per 4 KiB page, whatever the machine's transparent huge page setting:
# THP off for this process (prctl PR_SET_THP_DISABLE) and numpy's madvise off.
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)
(getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage(False)
if sys.argv[1] == "tuned":
    from pserver.protocol.allocator import keep_freed_buffers
    assert keep_freed_buffers() is True
    assert keep_freed_buffers() is True  # a second call is answered from the first
elif sys.argv[1] == "client":
    import pserver
    try:
        pserver.connect("tcp://127.0.0.1:1", timeout=0.2)
    except pserver.Unavailable:
        pass  # the client tunes the allocator before it asks for the cluster map
n = 16 << 20
a = np.ones(n, np.uint8)
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(n, np.uint8)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""
FRESH, REUSED = 2048, 100  # of 4096 pages: above FRESH, fresh pages; below REUSED, reused


def _faults(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True,
                         text=True, check=True, timeout=60, env=env)
    return int(json.loads(out.stdout))


def test_a_freed_buffer_is_reused_without_page_faults() -> None:
    # glibc's default: a fresh mmap per buffer, a fault per page; tuned: the freed
    # heap memory, no fault at all
    assert _faults("plain") > FRESH
    assert _faults("tuned") < REUSED


@pytest.mark.parametrize(("setting", "tuned"), [(None, True), ("0", False)])
def test_a_client_tunes_the_allocator_unless_told_not_to(setting: str | None,
                                                         tuned: bool) -> None:
    import os

    env = dict(os.environ)
    env.pop("PSERVER_KEEP_FREED_BUFFERS", None)
    if setting is not None:
        env["PSERVER_KEEP_FREED_BUFFERS"] = setting
    faults = _faults("client", env)
    assert (faults < REUSED) if tuned else (faults > FRESH)
