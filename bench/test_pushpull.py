"""Dense push_pull throughput and small-request latency, pserver against the raw
pyzmq DEALER/ROUTER echo of the same bytes in the same chunking.

Each pserver benchmark shares a ``benchmark.group`` with its echo baseline, so
pytest-benchmark prints them side by side. ``extra_info`` carries the GB/s
(pushed + pulled bytes, best round) and the p50 in microseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pserver.benchmark.scenarios import (
    ECHO_WINDOW,
    GB,
    KEY_PREFIX,
    LATENCY_BYTES,
    MiB,
    Pair,
    dense_key,
    dense_tensor,
    echo_round,
    pserver_round,
)

DENSE_BYTES = 64 * MiB
DENSE_ROUNDS = 10
LATENCY_ROUNDS = 2000
LATENCY_WARMUP = 200


def _dense(benchmark: Any, pair: Pair, kind: str) -> None:
    grad = dense_tensor(DENSE_BYTES)
    key = dense_key(grad.nbytes)
    pair.client.init({key: grad})
    out = np.empty_like(grad)
    if kind == "pserver":
        def step() -> float:
            return pserver_round(pair.client, key, grad)
    else:
        def step() -> float:
            return echo_round(pair, grad, out, window=ECHO_WINDOW)
    benchmark.group = f"dense push_pull 64 MiB {pair.transport}"
    benchmark.extra_info.update(transport=pair.transport, size_bytes=grad.nbytes,
                                chunk_bytes=pair.client.chunk_bytes,
                                frame_bytes=pair.client.frame_bytes)
    benchmark.pedantic(step, rounds=DENSE_ROUNDS, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info["best_gbps"] = 2 * grad.nbytes / best / GB


@pytest.mark.parametrize("kind", ["pserver", "echo"])
def test_dense_push_pull_64mib(benchmark: Any, pair: Pair, kind: str) -> None:
    _dense(benchmark, pair, kind)


@pytest.mark.parametrize("kind", ["pserver", "echo"])
def test_roundtrip_4kib(benchmark: Any, pair: Pair, kind: str) -> None:
    grad = dense_tensor(LATENCY_BYTES)
    key = f"{KEY_PREFIX}/latency-{grad.nbytes}"
    pair.client.init({key: grad})
    grads = {key: grad}
    if kind == "pserver":
        def step() -> None:
            pair.client.push_pull(grads)
    else:
        def step() -> None:
            pair.echo.roundtrips(grad, 1)
    benchmark.group = f"round trip 4 KiB {pair.transport}"
    benchmark.extra_info.update(transport=pair.transport, size_bytes=grad.nbytes)
    benchmark.pedantic(step, rounds=LATENCY_ROUNDS, iterations=1, warmup_rounds=LATENCY_WARMUP)
    benchmark.extra_info["p50_us"] = benchmark.stats.stats.median * 1e6
