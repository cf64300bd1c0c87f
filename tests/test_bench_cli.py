"""``pserver bench --quick --json`` runs against a self-started cluster, exits 0,
finishes within its 60 s promise and emits every documented field (issue 6, item 4:
a CI check, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TOP_FIELDS = ("machine", "git_commit", "command", "cluster", "dense", "latency",
              "memory_bandwidth_gbps")
MACHINE_FIELDS = ("cpu_count", "platform", "python", "numpy", "pyzmq")
CLUSTER_FIELDS = ("shards", "replicas", "chunk_bytes", "frame_bytes")
DENSE_FIELDS = ("size_bytes", "transport", "pserver_best_gbps", "pserver_median_gbps",
                "echo_best_gbps", "echo_median_gbps", "ratio_best")
LATENCY_FIELDS = ("pserver_p50_us", "pserver_p99_us", "pserver_p999_us", "echo_p50_us",
                  "echo_p99_us", "echo_p999_us", "ratio_p50")


def _positive(row: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    for f in fields:
        v = row[f]
        assert isinstance(v, int | float) and v > 0, f"{what}.{f} = {v!r}"


@pytest.mark.timeout(150)
def test_bench_quick_json_emits_every_field() -> None:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pserver", "bench", "--quick", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stderr[-4000:]}"
    assert elapsed < 60, f"--quick took {elapsed:.1f} s"
    report = json.loads(res.stdout)  # one JSON object, nothing else on stdout

    missing = [f for f in TOP_FIELDS if f not in report]
    assert not missing, f"missing top-level fields {missing}"
    assert "bench" in report["command"] and "--quick" in report["command"]
    assert report["git_commit"] is None or isinstance(report["git_commit"], str)
    for f in MACHINE_FIELDS:
        assert report["machine"][f], f"machine.{f} is empty"
    cluster = report["cluster"]
    _positive(cluster, CLUSTER_FIELDS, "cluster")
    assert cluster["shards"] == 4
    assert cluster["replicas"] == 1

    dense = report["dense"]
    assert dense, "no dense rows"
    for row in dense:
        _positive(row, tuple(f for f in DENSE_FIELDS if f != "transport"), "dense")
        assert row["transport"] in ("tcp", "ipc")
    assert {r["transport"] for r in dense} == {"tcp", "ipc"}
    assert 64 << 20 in {r["size_bytes"] for r in dense}

    _positive(report["latency"], LATENCY_FIELDS, "latency")
    lat = report["latency"]
    assert lat["pserver_p50_us"] <= lat["pserver_p99_us"] <= lat["pserver_p999_us"]
    assert isinstance(report["memory_bandwidth_gbps"], float)
    assert report["memory_bandwidth_gbps"] > 0
