"""The benchmark's own parts: the plain parameter server computes what it claims
(``value -= 0.01 * grad`` across frames), the worker pool reports a failing task
as an error instead of hanging, and aggregate throughput is all bytes over the
slowest worker's time."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.benchmark.plainps import LR, PlainClient, PlainServer
from pserver.benchmark.workers import WorkerPool, aggregate_gbps

pytestmark = pytest.mark.integration


def test_plain_server_applies_sgd_across_frames() -> None:
    grad = np.arange((5 << 20) // 8, dtype=np.float32)  # 2.5 MiB: three frames
    out = np.empty_like(grad)
    with PlainServer() as srv, PlainClient(srv.endpoint) as c:
        c.init("w", grad)
        c.push_pull("w", grad, out)
        np.testing.assert_array_equal(out, np.zeros_like(grad) - LR * grad)
        c.push_pull("w", grad, out)
        expected = np.zeros_like(grad) - LR * grad
        expected -= LR * grad
        np.testing.assert_array_equal(out, expected)
        c.init("w", np.ones(3, np.float32))  # init of an existing key keeps its value
        c.push_pull("w", np.zeros_like(grad), out)
        np.testing.assert_array_equal(out, expected)


def test_worker_pool_reports_a_failing_task() -> None:
    with WorkerPool(2) as pool:
        with pytest.raises(RuntimeError, match="worker 0: TypeError"):
            pool.run("sync", 1, timeout=60, no_such_argument=1)
        with pytest.raises(ValueError, match="3 workers asked of a pool of 2"):
            pool.run("sync", 3)


def test_aggregate_throughput_counts_every_worker_over_the_slowest() -> None:
    assert aggregate_gbps([[1.0], [2.0]], 4_000_000_000) == pytest.approx(4.0)


def test_an_optional_baseline_that_fails_or_is_missing_is_a_note(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pserver.benchmark import extras

    def broken(*_: object) -> dict[str, object]:
        raise RuntimeError("no object store")

    assert extras.optional(broken) == {
        "status": "skipped: failed with RuntimeError: no object store"}
    monkeypatch.setattr(extras.shutil, "which", lambda _name: None)
    status = extras.redis_section([4096], 1)["status"]
    assert status.startswith("skipped: no redis-server on PATH")
