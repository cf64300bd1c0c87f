"""The CPU kernels leave no thread spinning between updates: importing them asks
OpenMP for passive waiting unless the environment says otherwise, so a shard
idle between two updates uses no CPU (with OpenMP's default, an idle thread
spun for a while after every parallel loop: a whole core on a 2-core host)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, resource, threading
import numpy as np
from pserver.kernels import dispatch
p = np.zeros(1 << 20, np.float32)
g = np.ones(1 << 20, np.float32)
dispatch.sgd(p, g, lr=0.1)  # a parallel loop: starts the thread pool
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
idle = threading.Event()
before = cpu()
for _ in range(20):
    dispatch.sgd(p, g, lr=0.1)
    idle.wait(0.02)  # the gap between two updates: nothing to do
print(os.environ.get("OMP_WAIT_POLICY"), cpu() - before)
"""


def _probe(env_policy: str | None) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PSERVER_KERNELS"] = "cpu"
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout.split()
    return out[0], float(out[1])


def test_idle_gaps_between_updates_use_no_cpu() -> None:
    policy, cpu_s = _probe(None)
    assert policy == "PASSIVE"
    # 20 updates of 4 MiB take a few ms of CPU; 20 gaps of 20 ms spinning would be 0.4 s
    assert cpu_s < 0.2, f"{cpu_s:.3f} s of CPU over 0.4 s of mostly idle gaps"


def test_an_explicit_wait_policy_is_kept() -> None:
    policy, _ = _probe("ACTIVE")
    assert policy == "ACTIVE"
