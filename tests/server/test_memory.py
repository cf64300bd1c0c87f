"""pserver.memory: the allocator tuning shard processes apply at start."""

from __future__ import annotations

import subprocess
import sys


def test_glibc_accepts_the_tuning_in_a_fresh_process() -> None:
    # In a child, so this test process keeps glibc's defaults.
    code = "from pserver.memory import keep_freed_buffers; print(keep_freed_buffers())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "True"
