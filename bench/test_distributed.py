"""Multi-worker scenarios of ``pserver bench --distributed`` as pytest-benchmark tests.

- ``test_sync_step``: one synchronous step of a 64 MiB model (4 float32 tensors) by
  2 worker processes through a 4-shard cluster (R=1), per transport and wire
  dtype, in the group ``sync step 64 MiB`` with ``test_gloo_allreduce`` (gloo
  ``all_reduce`` of the same tensors by the same 2 processes): what a user would
  pick instead.
- ``test_async_scaling``: 1, 2 and 4 workers push_pull one 16 MiB key after a common
  start against the session's 4-shard cluster, and against the plain
  single-process server (``pserver.benchmark.plainps``), in one group per worker
  count.
- ``test_plain_push_pull``: one worker, pserver against the plain server by size.

Each round is timed by the worker processes themselves (the step ends for all
when the slowest is done); pytest-benchmark's own timing of a round includes the
pool's hand-off and is kept only as a check. ``extra_info`` carries the figures.
Run with ``pytest bench/test_distributed.py``.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import pserver
from pserver.benchmark.distributed import SYNC_VARIANTS
from pserver.benchmark.plainps import PlainClient, PlainServer
from pserver.benchmark.scenarios import KEY_PREFIX, LocalCluster, dense_tensor
from pserver.benchmark.workers import WorkerPool, aggregate_gbps, step_times
from pserver.supervisor import free_ports

MiB = 1 << 20
MODEL = 64 * MiB
TENSORS = 4
STEPS = 5
SCALING_BYTES = 16 * MiB


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(4) as p:
        yield p


@pytest.fixture(scope="module")
def sync_cluster() -> Iterator[str]:
    """4 shards (R=1) whose sync steps take 2 workers."""
    with LocalCluster.start(shards=4, replicas=1, extra=("--workers", "2")) as c:
        yield c.address


@pytest.fixture(scope="module")
def plain() -> Iterator[PlainServer]:
    with PlainServer() as srv:
        yield srv


def _steps_ms(res: list[list[float]]) -> list[float]:
    return [t * 1e3 for t in step_times(res)]


@pytest.mark.parametrize(("transport", "wire"), SYNC_VARIANTS,
                         ids=[f"{t}-{w or 'float32'}" for t, w in SYNC_VARIANTS])
def test_sync_step(benchmark: Any, pool: WorkerPool, sync_cluster: str, transport: str,
                   wire: str | None) -> None:
    prefix = f"{KEY_PREFIX}/bench-sync-{transport}-{wire or 'float32'}"
    steps: list[float] = []

    def run() -> None:
        res = pool.run("sync", 2, address=sync_cluster, workers=2, prefix=prefix,
                       model_bytes=MODEL, tensors=TENSORS, steps=STEPS, warmup=1,
                       ipc=transport == "ipc", compression=wire)
        steps.extend(_steps_ms(res))

    benchmark.group = "sync step 64 MiB, 2 workers"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(transport=transport, wire_dtype=wire or "float32",
                                step_ms_median=statistics.median(steps),
                                step_ms_best=min(steps))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_gloo_allreduce(benchmark: Any, pool: WorkerPool) -> None:
    steps: list[float] = []

    def run() -> None:
        res = pool.run("gloo", 2, port=free_ports("127.0.0.1", 1)[0], workers=2, model_bytes=MODEL,
                       tensors=TENSORS, steps=STEPS, warmup=1)
        steps.extend(_steps_ms(res))

    benchmark.group = "sync step 64 MiB, 2 workers"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(step_ms_median=statistics.median(steps),
                                step_ms_best=min(steps))


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("server", ["pserver", "plain"])
def test_async_scaling(benchmark: Any, pool: WorkerPool, cluster_address: str,
                       plain: PlainServer, workers: int, server: str) -> None:
    where = ({"address": cluster_address} if server == "pserver"
             else {"endpoint": plain.endpoint})
    gbps: list[float] = []

    def run() -> None:
        res = pool.run("async" if server == "pserver" else "plain", workers, workers=workers,
                       key=f"{KEY_PREFIX}/bench-scale-{server}-{workers}",
                       size=SCALING_BYTES, steps=STEPS, **where)
        gbps.append(aggregate_gbps(res, 2 * SCALING_BYTES * STEPS))

    benchmark.group = f"async push_pull 16 MiB, {workers} workers"
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(server=server, workers=workers, aggregate_gbps=max(gbps))


@pytest.mark.parametrize("size", [4 << 10, 1 * MiB, 16 * MiB])
@pytest.mark.parametrize("server", ["pserver", "plain"])
def test_plain_push_pull(benchmark: Any, cluster_address: str, plain: PlainServer,
                         size: int, server: str) -> None:
    grad = dense_tensor(size)
    out = np.empty_like(grad)
    key = f"{KEY_PREFIX}/bench-plain-{size}"
    benchmark.group = f"push_pull {size} B tcp, one worker"
    if server == "pserver":
        with pserver.connect(cluster_address, ipc=False) as c:
            c.init({key: grad})
            benchmark.pedantic(lambda: c.push_pull_into({key: grad}, {key: out}),
                               rounds=20, iterations=1, warmup_rounds=2)
    else:
        with PlainClient(plain.endpoint) as p:
            p.init(key, grad)
            benchmark.pedantic(lambda: p.push_pull(key, grad, out), rounds=20, iterations=1,
                               warmup_rounds=2)
    benchmark.extra_info.update(server=server, size_bytes=grad.nbytes,
                                best_gbps=2 * grad.nbytes / benchmark.stats.stats.min / 1e9)
