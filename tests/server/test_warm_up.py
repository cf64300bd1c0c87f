"""pserver.optim.warm_up: a replica compiles (or loads) at start every CPU kernel
a dense or row update can take, so no first update stalls it for seconds (long enough to
look dead to its peers). Checked in a fresh process, where nothing else compiled
them first."""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = """
import json
from pserver.optim import warm_up
from pserver.kernels import _cpu
warm_up()
names = ("add", "sgd", "sgd_momentum", "adam", "adam_plain", "adagrad", "sum_into",
         "rows_add", "rows_sgd", "rows_adam", "rows_adagrad")
print(json.dumps({
    "parallel": {n: len(getattr(_cpu, n).signatures) for n in names},
    "serial": {n: len(getattr(_cpu.SERIAL, n).signatures) for n in names},
}))
"""


def test_warm_up_readies_every_kernel_serial_and_parallel() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True, timeout=300)
    ready = json.loads(out.stdout)
    for kind in ("parallel", "serial"):
        missing = [name for name, n in ready[kind].items() if n == 0]
        assert not missing, f"{kind} kernels not ready after warm_up: {missing}"
