"""Restarts from the data dir: a logged shard (one replica or three) recovers every
acknowledged update even after SIGKILL; an ``--in-memory`` shard saves its state on a
clean stop and loses it in a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import pserver
from pserver.clients.client import cluster_status
from pserver.kernels import reference

from .support import assert_bits_equal, pid_alive, shard_pids, wait_until

pytestmark = pytest.mark.integration


def test_a_clean_restart_recovers_keys_optimizer_state_tables_and_sessions(
        cluster_factory: Any) -> None:
    rng = np.random.default_rng(3)
    start = rng.standard_normal(6 * 2**20 // 4).astype(np.float32)  # two parts
    g1, g2 = (rng.standard_normal(start.size).astype(np.float32) for _ in range(2))
    first = cluster_factory("--shards", "2")
    with pserver.connect(first.address) as c:
        c.init({"w": start}, optimizer={"name": "adam", "lr": 0.01})
        c.init({"h": np.zeros(16, np.float32)}, optimizer={"name": "sum"},
               compression="float16")
        c.push({"w": g1})
        c.create_table("emb", 8, init=("normal", 0.1))
        ids = np.arange(1000, dtype=np.uint64)
        c.push_rows("emb", ids, np.ones((1000, 8), np.float32))
        rows = c.pull_rows("emb", ids)
        fresh_row = c.pull_rows("emb", np.array([10**12], np.uint64))
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0

    second = cluster_factory("--shards", "2")
    with pserver.connect(second.address) as c:
        c.push({"w": g2})  # adam continues from the saved moments and step count
        want = start.copy()
        m, v = np.zeros_like(want), np.zeros_like(want)
        for step, g in enumerate((g1, g2), start=1):
            reference.adam_step(want, g, m, v, None, step=step, lr=0.01, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
        np.testing.assert_allclose(c.pull(["w"])["w"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(c.pull_rows("emb", ids), rows)
        np.testing.assert_array_equal(c.pull_rows("emb", np.array([10**12], np.uint64)),
                                      fresh_row)
        c.push({"h": np.ones(16, np.float32)})  # the compression setting came back too
        np.testing.assert_array_equal(c.pull(["h"])["h"], np.ones(16, np.float32))
        assert c.status()["keys"] == 2


def _state(c: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return c.pull(["w"])["w"], c.pull(["s"])["s"], c.pull_rows("emb", ids)


def _write_some(c: Any, ids: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    c.init({"w": rng.standard_normal(6 * 2**20 // 4).astype(np.float32)},  # two parts
           optimizer={"name": "adam", "lr": 0.01})
    c.init({"s": np.zeros(8, np.float32)}, optimizer={"name": "sum"})
    c.create_table("emb", 4)
    for _ in range(3):
        c.push({"w": rng.standard_normal(6 * 2**20 // 4).astype(np.float32)})
        c.push({"s": np.ones(8, np.float32)})
        c.push_rows("emb", ids, np.ones((ids.size, 4), np.float32))


def test_a_single_replica_keeps_every_acknowledged_update_through_sigkill(
        cluster_factory: Any) -> None:
    """DESIGN: restarting with the same data dir recovers every acknowledged update.
    With ``--replicas 1`` each shard is a Raft group of one with its log on disk,
    so that holds after SIGKILL of every process, not only after a clean stop."""
    ids = np.arange(50, dtype=np.uint64)
    first = cluster_factory("--shards", "2", "--replicas", "1")
    with pserver.connect(first.address) as c:
        _write_some(c, ids)
        before = _state(c, ids)
        pids = shard_pids(cluster_status(first.address))
    for pid in [*pids, first.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(30)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the shards to be gone")

    second = cluster_factory("--shards", "2", "--replicas", "1")
    with pserver.connect(second.address) as c:
        for got, want in zip(_state(c, ids), before, strict=True):
            assert_bits_equal(got, want)
        assert before[1][0] == 3.0


@pytest.mark.parametrize("memory", [[], ["--in-memory"]], ids=["logged", "in-memory"])
def test_a_sync_step_half_pushed_before_a_clean_stop_completes_after_it(
        cluster_factory: Any, memory: list[str]) -> None:
    """Worker 0's acknowledged push of a sync step is saved by the clean stop; after
    the restart worker 1's push completes the step with the mean of the two. (The
    saved gradient comes back as a writeable array, the new one in read-only frames:
    the aggregation kernel once refused that mix and the key was stuck.)"""
    args = ("--shards", "1", "--replicas", "1", *memory)
    first = cluster_factory(*args)
    with pserver.connect(first.address, worker_id=0, num_workers=2) as w0:
        w0.init({"s": np.zeros(4, np.float32)}, optimizer={"name": "sgd", "lr": 0.5},
                mode="sync")
        w0.push({"s": np.ones(4, np.float32)})
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0

    second = cluster_factory(*args)
    with pserver.connect(second.address, worker_id=1, num_workers=2, timeout=20) as w1:
        w1.push({"s": np.full(4, 3, np.float32)})
        np.testing.assert_array_equal(w1.pull(["s"])["s"], np.full(4, -1, np.float32))


def test_a_killed_single_replica_comes_back_with_its_state(cluster_factory: Any) -> None:
    """The supervisor restarts a SIGKILLed shard of one replica; it recovers from its
    log, and the client's next calls see every acknowledged update."""
    ids = np.arange(50, dtype=np.uint64)
    cluster = cluster_factory("--shards", "2", "--replicas", "1")
    with pserver.connect(cluster.address, timeout=30.0) as c:
        _write_some(c, ids)
        before = _state(c, ids)
        pids = shard_pids(cluster_status(cluster.address))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(pids) & set(shard_pids(cluster_status(cluster.address))),
                   30, "new shard processes")
        for got, want in zip(_state(c, ids), before, strict=True):
            assert_bits_equal(got, want)
        c.push({"s": np.ones(8, np.float32)})  # and it goes on taking updates
        assert c.pull(["s"])["s"][0] == 4.0


def test_an_in_memory_shard_keeps_its_state_through_a_clean_stop_only(
        cluster_factory: Any) -> None:
    """``--in-memory`` (with one replica) keeps no log: a clean stop saves the state,
    a crash loses it, and the restarted shard says so with KeyNotFound."""
    ids = np.arange(50, dtype=np.uint64)
    first = cluster_factory("--shards", "2", "--replicas", "1", "--in-memory")
    with pserver.connect(first.address) as c:
        _write_some(c, ids)
        before = _state(c, ids)
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    second = cluster_factory("--shards", "2", "--replicas", "1", "--in-memory")
    with pserver.connect(second.address) as c:
        for got, want in zip(_state(c, ids), before, strict=True):
            assert_bits_equal(got, want)
        pids = shard_pids(cluster_status(second.address))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(pids) & set(shard_pids(cluster_status(second.address))),
                   30, "new shard processes")
        with pytest.raises(pserver.KeyNotFound):
            c.pull(["s"])


def test_in_memory_needs_a_single_replica(tmp_path: Any) -> None:
    out = subprocess.run([sys.executable, "-m", "pserver", "serve", "--port", "0",
                          "--replicas", "3", "--in-memory", "--data-dir", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "in_memory needs replicas = 1" in out.stderr
