"""Consistency modes: sync applies the mean once every worker pushed a step and holds
a worker's read until its steps are applied; ssp holds a worker that runs more than
``staleness`` steps ahead of the slowest."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

import pserver

from .support import replica_statuses, wait_parked, wait_until

pytestmark = pytest.mark.integration


def _workers(address: str, n: int) -> list[Any]:
    return [pserver.connect(address, worker_id=i, num_workers=n, timeout=20.0) for i in range(n)]


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    return t, out


def test_sync_applies_the_mean_once_all_workers_pushed(cluster4: Any) -> None:
    ws = _workers(cluster4.address, 3)
    try:
        key = "modes/sync"
        ws[0].init({key: np.zeros(6 * 2**20 // 4, np.float32)},  # chunked: every part waits
                   optimizer={"name": "sgd", "lr": 1.0}, mode="sync")
        rng = np.random.default_rng(0)
        grads = [rng.standard_normal(6 * 2**20 // 4).astype(np.float32) for _ in range(3)]
        ws[0].push({key: grads[0]})
        ws[1].push({key: grads[1]})
        assert not ws[2].pull([key])[key].any()  # worker 2 pushed nothing: it reads now
        t, out = _in_thread(lambda: ws[0].pull([key])[key])
        wait_parked(ws[2], 1)
        assert t.is_alive()  # worker 0's step is not applied yet
        ws[2].push({key: grads[2]})
        t.join(20)
        mean = (grads[0] + grads[1] + grads[2]) / np.float32(3)
        np.testing.assert_allclose(out["v"], -mean, rtol=1e-6, atol=1e-6)
    finally:
        for w in ws:
            w.close()


def test_sync_push_pull_returns_the_same_step_to_every_worker(cluster4: Any) -> None:
    ws = _workers(cluster4.address, 2)
    try:
        key = "modes/sync-pp"
        ws[0].init({key: np.zeros(16, np.float32)}, optimizer={"name": "sgd", "lr": 0.5},
                   mode="sync")
        t, out = _in_thread(lambda: ws[0].push_pull({key: np.full(16, 2.0, np.float32)})[key])
        wait_parked(ws[1], 1)
        mine = ws[1].push_pull({key: np.full(16, 4.0, np.float32)})[key]
        t.join(20)
        np.testing.assert_array_equal(mine, np.full(16, -1.5, np.float32))
        np.testing.assert_array_equal(out["v"], mine)
    finally:
        for w in ws:
            w.close()


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_a_pull_sent_after_a_sync_push_waits_for_that_step(cluster_factory: Any,
                                                           replicas: str) -> None:
    """DESIGN: in sync mode "a pull for the next step waits for it", also when the
    pull follows a push without waiting for its answer (and on a replicated shard,
    where the push waits on the leader for the other worker's)."""
    cluster = cluster_factory("--shards", "2", "--replicas", replicas)
    ws = _workers(cluster.address, 2)
    try:
        key = "modes/pipelined"
        ws[0].init({key: np.zeros(8, np.float32)}, optimizer={"name": "sgd", "lr": 0.5},
                   mode="sync")
        pushed = ws[0].push_async({key: np.full(8, 1.0, np.float32)})
        pulled = ws[0].pull_async([key])
        wait_parked(ws[1], 1)
        assert not pulled.done()
        ws[1].push({key: np.full(8, 3.0, np.float32)})
        np.testing.assert_array_equal(pulled.result(20)[key], np.full(8, -1.0, np.float32))
        pushed.result(20)
    finally:
        for w in ws:
            w.close()


def test_ssp_holds_a_worker_too_far_ahead(cluster4: Any) -> None:
    ws = _workers(cluster4.address, 2)
    try:
        key = "modes/ssp"
        ws[0].init({key: np.zeros(8, np.float32)}, optimizer={"name": "sum"}, mode="ssp",
                   staleness=1)
        one = np.ones(8, np.float32)
        ws[0].push({key: one})
        np.testing.assert_array_equal(ws[0].pull([key])[key], one)  # 1 ahead: allowed
        ws[0].push({key: one})  # applied at once (ssp does not wait for others)
        t, out = _in_thread(lambda: ws[0].pull([key])[key])
        wait_parked(ws[1], 1)  # 2 ahead of worker 1: held
        assert t.is_alive()
        ws[1].push({key: one})
        t.join(20)
        np.testing.assert_array_equal(out["v"], 3 * one)
    finally:
        for w in ws:
            w.close()


def test_a_worker_outside_the_key_s_workers_is_refused(cluster4: Any) -> None:
    ws = _workers(cluster4.address, 2)
    try:
        ws[0].init({"modes/w": np.zeros(4, np.float32)}, mode="sync")
        with pserver.connect(cluster4.address, worker_id=2, num_workers=3) as stranger, \
                pytest.raises(pserver.InvalidArgument):
            stranger.push({"modes/w": np.ones(4, np.float32)})
    finally:
        for w in ws:
            w.close()


def _worker_states(c: Any) -> dict[str, str]:
    states: dict[str, str] = {}
    for s in replica_statuses(c):
        states.update(s["workers"])
    return states


def test_a_silent_worker_is_dropped_after_the_timeout_and_can_rejoin(
        cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "2", "--worker-timeout", "1.0")
    key = "modes/timeout"
    w0 = pserver.connect(cluster.address, worker_id=0, num_workers=2, timeout=30.0)
    w1 = pserver.connect(cluster.address, worker_id=1, num_workers=2, timeout=30.0)
    try:
        w0.init({key: np.zeros(4, np.float32)}, optimizer={"name": "sgd", "lr": 1.0},
                mode="sync")
        wait_until(lambda: _worker_states(w0).get("1") == "alive", 20,
                   "worker 1's heartbeats")
        w1.close()  # worker 1 dies: no more heartbeats
        # worker 0's step completes once worker 1 is dropped (about 1 s), alone
        got = w0.push_pull({key: np.full(4, 2.0, np.float32)})[key]
        np.testing.assert_array_equal(got, np.full(4, -2.0, np.float32))
        assert _worker_states(w0)["1"] == "dropped"
        st = w0.status()  # the cluster's status shows it, per shard and for the cluster
        assert st["workers"] == {"0": "alive", "1": "dropped"}
        assert all(s["workers"].get("1") == "dropped" for s in st["shards"]
                   if "1" in s["workers"])
        assert any(r.get("workers", {}).get("1") == "dropped"  # and the leaders' entries
                   for s in st["shards"] for r in s["replicas"])
        text = subprocess.run([sys.executable, "-m", "pserver", "status", "--address",
                               cluster.address], capture_output=True, text=True, check=True,
                              timeout=60).stdout
        assert "workers  0 alive  1 dropped" in text
        # worker 1 comes back and joins the current step
        w1 = pserver.connect(cluster.address, worker_id=1, num_workers=2, timeout=30.0)
        t, out = _in_thread(lambda: w1.push_pull({key: np.full(4, 4.0, np.float32)})[key])
        wait_parked(w0, 1)
        got = w0.push_pull({key: np.full(4, 2.0, np.float32)})[key]
        t.join(30)
        np.testing.assert_array_equal(got, np.full(4, -5.0, np.float32))  # -2 - mean(2, 4)
        np.testing.assert_array_equal(out["v"], got)
    finally:
        w0.close()
        w1.close()


def test_sync_sum_keys_hold_the_mean_gradient_of_the_last_step(cluster4: Any) -> None:
    """DESIGN: with `sum` in sync mode a pull returns the mean gradient of the last
    step (the server only aggregates; the workers' own optimizers apply it)."""
    ws = _workers(cluster4.address, 2)
    try:
        key = "modes/sync-sum"
        ws[0].init({key: np.zeros(8, np.float32)}, optimizer={"name": "sum"}, mode="sync")
        for step, (a, b) in enumerate([(1.0, 3.0), (10.0, 20.0)]):
            t, out = _in_thread(lambda a=a: ws[0].push_pull({key: np.full(8, a, np.float32)})[key])
            wait_parked(ws[1], 1)
            mine = ws[1].push_pull({key: np.full(8, b, np.float32)})[key]
            t.join(20)
            np.testing.assert_array_equal(mine, np.full(8, (a + b) / 2, np.float32), str(step))
            np.testing.assert_array_equal(out["v"], mine)
    finally:
        for w in ws:
            w.close()
