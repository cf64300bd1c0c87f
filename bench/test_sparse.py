"""Sparse tables: ``push_rows`` / ``pull_rows`` of 100k random rows of dim 64
(float32) through the session's 4-shard cluster over tcp on 127.0.0.1, against
the raw pyzmq DEALER/ROUTER echo of the same number of bytes in the same chunking
(issue 3's target: at least 0.6 of the echo's bytes/s).

Two tables, optimizer ``{"name": "sum"}`` and the default adagrad; each operation's
``benchmark.group`` holds both tables and the echo. Bytes counted per call: ids
and row data, 100k x (8 + 256) bytes (see ``pserver.benchmark.sparse``).
``extra_info`` carries rows/s, GB/s and the ratio to the echo's best GB/s.
The rows exist before timing (a push in the fixture creates them).

Run with ``pytest bench/test_sparse.py`` (``PSERVER_BENCH_ADDRESS`` for a running
cluster; add ``--benchmark-json FILE`` to keep it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pserver.benchmark.scenarios import GB, Pair, open_pair
from pserver.benchmark.sparse import (
    DIM,
    ROWS,
    TARGET_SPARSE_RATIO,
    EchoPayload,
    create_tables,
    row_grads,
    row_ids,
    wire_bytes,
)

ROUNDS = 7
Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def tcp_pair(cluster_address: str, scratch: Path) -> Iterator[Pair]:
    """A pserver client and a raw echo server, both over tcp."""
    try:
        p = open_pair(cluster_address, "tcp", scratch)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield p
    p.close()


@pytest.fixture(scope="module")
def rows() -> tuple[Array, Array]:
    """(ids, grads): 100k random uint64 ids and their (100k, 64) float32 gradients."""
    return row_ids(ROWS), row_grads(ROWS, DIM)


@pytest.fixture(scope="module")
def tables(tcp_pair: Pair, rows: tuple[Array, Array]) -> dict[str, str]:
    """The ``sum`` and ``adagrad`` tables, their rows created by one push."""
    names = create_tables(tcp_pair, DIM, ("sum", "adagrad"))
    ids, grads = rows
    for name in names.values():
        tcp_pair.client.push_rows(name, ids, grads)
    return names


@pytest.fixture(scope="module")
def echo_best_gbps() -> dict[str, float]:
    """Best echo GB/s, filled by the echo benchmarks."""
    return {}


def _echo_best(pair: Pair, echo_best_gbps: dict[str, float]) -> float:
    if "echo" not in echo_best_gbps:
        echo = EchoPayload(pair, wire_bytes(ROWS, DIM))
        echo.round()
        echo_best_gbps["echo"] = max(echo.moved / echo.round() / GB for _ in range(ROUNDS))
    return echo_best_gbps["echo"]


@pytest.mark.parametrize("table", ["echo", "sum", "adagrad"])
@pytest.mark.parametrize("op", ["push_rows", "pull_rows"])
def test_rows_100k_dim64(benchmark: Any, tcp_pair: Pair, tables: dict[str, str],
                         rows: tuple[Array, Array], echo_best_gbps: dict[str, float],
                         capsys: pytest.CaptureFixture[str], op: str, table: str) -> None:
    ids, grads = rows
    client = tcp_pair.client
    moved = wire_bytes(ROWS, DIM)
    step: Callable[[], Any]
    if table == "echo":
        echo = EchoPayload(tcp_pair, moved)
        step, moved = echo.round, echo.moved
    elif op == "push_rows":
        def step() -> None:
            client.push_rows(tables[table], ids, grads)
    else:
        def step() -> None:
            client.pull_rows(tables[table], ids)
    benchmark.group = f"sparse {op} {ROWS} rows x {DIM} float32 tcp"
    benchmark.extra_info.update(op=op, table=table, rows=ROWS, dim=DIM, bytes_per_call=moved)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    gbps = moved / best / GB
    benchmark.extra_info.update(best_gbps=gbps, rows_per_s=ROWS / best)
    if table == "echo":
        echo_best_gbps["echo"] = max(echo_best_gbps.get("echo", 0.0), gbps)
        return
    ratio = gbps / _echo_best(tcp_pair, echo_best_gbps)
    benchmark.extra_info["ratio_vs_echo"] = ratio
    with capsys.disabled():
        print(f"\n{op} ({table}): {best * 1e3:.1f} ms, {ROWS / best:.3g} rows/s, {gbps:.3f} GB/s"
              f" = {ratio:.2f} of the raw echo's best (target {TARGET_SPARSE_RATIO})")
