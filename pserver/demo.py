"""``make demo``: start a 4-shard cluster, push and pull through it, print a summary.

Starts ``pserver serve --shards 4 --replicas 1 --port 0`` as a child process,
connects a client, initializes a small model (one 64 MiB layer that is
chunked over every shard plus small keys), runs push/pull steps with a
progress bar, checks every value against a local copy computed with numpy,
and prints a summary table. Stops the cluster with SIGTERM at the end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

import pserver
from pserver.supervisor import await_ready

STEPS = 30
LR = 0.1


def start_cluster(data_dir: str, shards: int = 4) -> tuple[subprocess.Popen[str], str]:
    """A fresh cluster (its own data dir, so no state of an earlier run comes back)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pserver",
            "serve",
            "--shards",
            str(shards),
            "--replicas",
            "1",
            "--port",
            "0",
            "--data-dir",
            data_dir,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        return proc, await_ready(proc)
    except (TimeoutError, RuntimeError) as exc:
        proc.kill()
        raise SystemExit(f"the cluster did not start: {exc}") from None


def main() -> None:
    data_dir = tempfile.mkdtemp(prefix="pserver-demo-")
    proc, address = start_cluster(data_dir)
    print(f"cluster ready at {address}")
    rng = np.random.default_rng(0)
    model: dict[str, np.ndarray[Any, Any]] = {
        "embedding": rng.standard_normal((4096, 4096), dtype=np.float32),  # 64 MiB, chunked
        "dense.weight": rng.standard_normal((512, 256), dtype=np.float32),
        "dense.bias": np.zeros(256, np.float32),
    }
    local = {k: v.copy() for k, v in model.items()}
    nbytes = sum(v.nbytes for v in model.values())
    step_times: list[float] = []
    try:
        with pserver.connect(address) as client:
            client.init(model, optimizer={"name": "sgd", "lr": LR})
            for _ in tqdm(range(STEPS), desc="push_pull steps", unit="step"):
                grads = {
                    k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in model.items()
                }
                t = time.perf_counter()
                values = client.push_pull(grads)
                step_times.append(time.perf_counter() - t)
                for k, g in grads.items():
                    local[k] -= np.float32(LR) * g
                    if not np.array_equal(values[k], local[k]):
                        raise SystemExit(f"value of {k} differs from the local numpy result")
            small = {"probe": np.ones(1024, np.float32)}
            client.init(small, optimizer={"name": "sum"})
            lat = []
            for _ in range(500):
                t = time.perf_counter()
                client.push_pull(small)
                lat.append(time.perf_counter() - t)
            status = client.status()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    ts = np.array(step_times)
    lat_us = np.array(lat) * 1e6
    print("\nsummary")
    rows = [
        ("shards", str(len(status["shards"]))),
        ("model bytes", f"{nbytes / 2**20:.1f} MiB in {len(model)} keys"),
        ("steps (push_pull, sgd lr 0.1)", f"{STEPS}, every value equal to numpy's"),
        ("step time p50 / best", f"{np.median(ts) * 1e3:.1f} / {ts.min() * 1e3:.1f} ms"),
        ("throughput (pushed + pulled)", f"{2 * nbytes / np.median(ts) / 1e9:.2f} GB/s"),
        (
            "4 KiB push_pull p50 / p99",
            f"{np.percentile(lat_us, 50):.0f} / {np.percentile(lat_us, 99):.0f} us",
        ),
    ]
    rows += [(f"shard {s['id']} bytes", f"{s['bytes']:,}") for s in status["shards"]]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"cluster stopped (exit code {proc.returncode})")


if __name__ == "__main__":
    main()
