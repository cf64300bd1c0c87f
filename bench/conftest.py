"""Fixtures for the pytest-benchmark scenarios: one self-started 4-shard cluster
per session (``pserver serve --port 0 --replicas 1 --shards 4``, ready line read
against a deadline, SIGTERM at the end) and, per transport, a pserver client
paired with a raw pyzmq echo server (``pserver.benchmark.scenarios.Pair``).

Run with ``pytest bench`` (add ``--benchmark-json bench/results/pytest.json`` to
keep the figures). ``PSERVER_BENCH_ADDRESS`` points the scenarios at a running
cluster instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pserver.benchmark.scenarios import LocalCluster, Pair, open_pair


@pytest.fixture(scope="session")
def cluster_address() -> Iterator[str]:
    """The bootstrap address of the cluster under test."""
    address = os.environ.get("PSERVER_BENCH_ADDRESS")
    if address:
        yield address
        return
    cluster = LocalCluster.start(shards=4, replicas=1, timeout=60.0)
    try:
        yield cluster.address
    finally:
        code = cluster.stop()
        assert code == 0, f"pserver serve exited with {code}"


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A directory for the echo servers' ipc sockets."""
    with tempfile.TemporaryDirectory(prefix="pserver-bench-") as d:
        yield Path(d)


@pytest.fixture(scope="session", params=["tcp", "ipc"])
def pair(request: pytest.FixtureRequest, cluster_address: str, scratch: Path) -> Iterator[Pair]:
    """A pserver client and a raw echo server over the same transport."""
    try:
        p = open_pair(cluster_address, request.param, scratch)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield p
    p.close()
