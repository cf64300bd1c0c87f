"""Shared memory on the same host (PROTOCOL.md §4.6), against real shard processes:
large requests go through the client's segments with the same results as through
the socket, results outlive the blocks they arrived in, a sync push's gradient is
kept by the shard after its block is reused, a replicated shard logs its own copy,
and a shard that cannot open the memory gets the bytes through the socket."""

from __future__ import annotations

import functools
import glob
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import pserver
import pserver.clients.client as client_module
from pserver.protocol.errors import Unavailable
from pserver.protocol.shm import Arena

from .support import run_workers, wait_until
from .test_replication import converged, leader

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _segments() -> set[str]:
    return set(glob.glob(f"/dev/shm/pserver-{os.getpid()}-*"))


def _used_shm(client: Any) -> bool:
    arena = client._io._arena
    return arena is not None and arena.reserved_bytes > 0


def test_large_requests_go_by_shared_memory_with_the_same_results(
        cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "2")
    rng = np.random.default_rng(3)
    model = {"shm/big": rng.standard_normal(6 * MiB // 4).astype(np.float32),  # 2 parts
             "shm/odd": rng.standard_normal(70_001).astype(np.float64),
             "shm/small": rng.standard_normal(100).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.items()}
             for _ in range(3)]
    before = _segments()
    got = {}
    for shm in (True, False):
        with pserver.connect(cluster.address, shm=shm, timeout=20) as c:
            keys = {f"{k}-{shm}": v for k, v in model.items()}
            c.init(keys, optimizer={"name": "adam", "lr": 0.01})
            for g in grads:
                out = c.push_pull({f"{k}-{shm}": v for k, v in g.items()})
            half = {"shm/big-" + str(shm): grads[0]["shm/big"].astype(np.float16)}
            c.push(half)  # float16 into a float32 key
            out.update(c.pull(list(keys)))
            got[shm] = {k.rsplit("-", 1)[0]: v for k, v in out.items()}
            assert _used_shm(c) == shm
            if shm:
                assert len(_segments() - before) == 1
                assert c._io._arena.blocks_out == 0  # every block came back
    assert _segments() == before  # closed clients leave no segment behind
    for k, v in model.items():
        assert got[True][k].dtype == v.dtype
        np.testing.assert_array_equal(got[True][k], got[False][k], err_msg=k)


def test_results_outlive_the_block_they_arrived_in(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "1")
    with pserver.connect(cluster.address, timeout=20) as c:
        first = np.arange(MiB, dtype=np.float32)  # 4 MiB: over the threshold
        c.init({"shm/a": first, "shm/b": -first})
        a = c.pull(["shm/a"])["shm/a"]  # one frame: returned as an array of its own
        b = c.pull(["shm/b"])["shm/b"]  # same block again, other bytes
        assert _used_shm(c)
        np.testing.assert_array_equal(a, first)
        np.testing.assert_array_equal(b, -first)


def test_a_sync_push_is_kept_after_its_block_is_reused(cluster_factory: Any) -> None:
    """A sync PUSH is answered before its step applies; the shard must not keep
    views of shared memory the client reuses for its next push."""
    cluster = cluster_factory("--shards", "2")
    ws = [pserver.connect(cluster.address, worker_id=i, num_workers=2, timeout=20)
          for i in range(2)]
    try:
        key = "shm/sync"
        n = 2 * MiB  # two parts of 4 MiB, both over the shared-memory threshold
        ws[0].init({key: np.zeros(n, np.float32)}, optimizer={"name": "sgd", "lr": 1.0},
                   mode="sync")
        rng = np.random.default_rng(5)
        g = [[rng.standard_normal(n).astype(np.float32) for _ in range(2)] for _ in range(2)]
        ws[0].push({key: g[0][0]})  # step 1, answered at once
        ws[0].push({key: g[0][1]})  # step 2, from the same block
        ws[1].push({key: g[1][0]})  # step 1 completes now
        ws[1].push({key: g[1][1]})
        assert _used_shm(ws[0])
        want = -((g[0][0] + g[1][0]) / np.float32(2)) - (g[0][1] + g[1][1]) / np.float32(2)
        np.testing.assert_allclose(ws[0].pull([key])[key], want, rtol=1e-6, atol=1e-6)
    finally:
        for w in ws:
            w.close()


def test_a_replicated_shard_logs_its_own_copy(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "2", "--replicas", "3")
    rng = np.random.default_rng(9)
    value = rng.standard_normal(MiB).astype(np.float32)
    with pserver.connect(cluster.address, timeout=30) as c:
        c.init({"shm/r": value}, optimizer={"name": "sum"})
        grads = [rng.standard_normal(value.size).astype(np.float32) for _ in range(4)]
        for g in grads:
            c.push({"shm/r": g})  # each from the same block, overwritten by the next
        assert _used_shm(c)
        want = value.copy()
        for g in grads:
            want += g
        np.testing.assert_array_equal(c.pull(["shm/r"])["shm/r"], want)
    wait_until(lambda: converged(cluster.address), 30, "replicas at the same state")


def test_a_leader_killed_under_shared_memory_pushes_loses_no_acknowledged_push(
        cluster_factory: Any) -> None:
    """Pushes of 4 MiB (shared memory) to a 1-shard x 3-replica cluster while its
    leader is killed with SIGKILL: the client resends each unanswered one from the
    same block to the next leader, which maps the segment itself. Every
    acknowledged push is applied once, a failed one at most once."""
    cluster = cluster_factory("--shards", "1", "--replicas", "3")
    n, key = MiB, "shm/failover"
    acked, failed = [], []
    with pserver.connect(cluster.address, timeout=20) as c:
        c.init({key: np.zeros(n, np.float32)}, optimizer={"name": "sum"})
        old = leader(cluster.address, 0)
        for i in range(60):
            if i == 15:
                os.kill(old["pid"], signal.SIGKILL)
            g = np.zeros(n, np.float32)
            g[i] = 1.0
            try:
                c.push({key: g})
            except Unavailable:
                failed.append(i)
                continue
            acked.append(i)
        # blocks resent to the new leader stay out of use (the old one might have
        # read them late); every other block came back
        assert _used_shm(c) and c._io._arena.blocks_out == len(c._io._quarantine) <= 2
        value = c.pull([key])[key]
    assert leader(cluster.address, 0)["term"] > old["term"]
    assert np.all(value[acked] == 1.0), "an acknowledged push was lost"
    assert np.all((value[failed] == 0.0) | (value[failed] == 1.0))
    assert not value[60:].any()
    wait_until(lambda: converged(cluster.address), 30, "replicas at the same state")


def test_a_shard_that_cannot_open_the_memory_gets_the_bytes(
        cluster_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments made where the shard does not look: it answers SHM_UNAVAILABLE, and
    the client sends that request and the later ones through the socket."""
    cluster = cluster_factory("--shards", "2")
    monkeypatch.setattr(client_module, "Arena",
                        functools.partial(Arena, directory=str(tmp_path)))
    with pserver.connect(cluster.address, timeout=20) as c:
        x = np.arange(MiB, dtype=np.float32)
        c.init({"shm/f": x}, optimizer={"name": "sum"})
        for _ in range(2):
            got = c.push_pull({"shm/f": np.ones_like(x)})["shm/f"]
        np.testing.assert_array_equal(got, x + 2)
        assert c.shard_map.shard_for("shm/f", 0) not in c._io._shm_shards
        assert c._io._arena.blocks_out == 0
    assert not list(tmp_path.glob("pserver-*"))


def test_a_full_arena_sends_the_rest_through_the_socket(
        cluster_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An arena of 8 MiB holds one 4 MiB chunk's data and reply at a time: of a
    64 MiB push_pull's 16 messages some go by shared memory, the others as frames,
    and the result is the same."""
    cluster = cluster_factory("--shards", "2")
    monkeypatch.setattr(client_module, "Arena", functools.partial(Arena, limit_bytes=8 * MiB))
    x = np.arange(16 * MiB, dtype=np.float32)
    with pserver.connect(cluster.address, timeout=30) as c:
        c.init({"shm/full": x}, optimizer={"name": "sum"})
        got = c.push_pull({"shm/full": np.ones_like(x)})["shm/full"]
        assert c._io._arena.reserved_bytes == 8 * MiB and c._io._arena.blocks_out == 0
    np.testing.assert_array_equal(got, x + 1)


def test_the_memory_of_a_killed_client_is_released(cluster_factory: Any) -> None:
    """A client killed with SIGKILL cannot unlink its segments: the shard that
    mapped them drops and unlinks them once it sees the process gone."""
    cluster = cluster_factory("--shards", "1")
    code = textwrap.dedent(f"""
        import sys, time, numpy as np, pserver
        c = pserver.connect({cluster.address!r})
        c.init({{"shm/killed": np.zeros(1 << 20, np.float32)}})
        c.push_pull({{"shm/killed": np.ones(1 << 20, np.float32)}})
        assert c._io._arena.reserved_bytes > 0
        print("ready", flush=True)
        time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            pattern = f"/dev/shm/pserver-{proc.pid}-*"
            assert glob.glob(pattern)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_until(lambda: not glob.glob(pattern), 10,
                       "the killed client's segment unlinked")
        finally:
            if proc.poll() is None:
                proc.kill()
    with pserver.connect(cluster.address) as c:
        np.testing.assert_array_equal(c.pull(["shm/killed"])["shm/killed"],
                                      np.full(1 << 20, -0.01, np.float32))


def test_shm_false_and_tcp_clients_send_frames(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "1")
    with pserver.connect(cluster.address) as c:  # below the threshold: the socket
        c.init({"shm/below": np.zeros(MiB // 4, np.float32)})
        c.push_pull({"shm/below": np.ones(MiB // 4, np.float32)})
        assert c._io._arena is not None and not _used_shm(c)
    for kw in ({"shm": False}, {"ipc": False}):
        with pserver.connect(cluster.address, **kw) as c:
            c.init({f"shm/{kw}": np.zeros(MiB, np.float32)})
            c.push({f"shm/{kw}": np.ones(MiB, np.float32)})
            assert c._io._arena is None


def test_row_requests_go_by_shared_memory_with_the_same_results(
        cluster_factory: Any) -> None:
    """pull_rows and push_rows of large batches (a table with adagrad): the same rows
    as through the socket."""
    cluster = cluster_factory("--shards", "2")
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 2**63, 40_000, dtype=np.uint64)
    grads = [rng.standard_normal((ids.size, 64)).astype(np.float32) for _ in range(2)]
    got = {}
    for shm in (True, False):
        with pserver.connect(cluster.address, shm=shm, timeout=30) as c:
            name = f"shm-rows-{shm}"
            c.create_table(name, 64)  # zeros: both tables start alike
            first = c.pull_rows(name, ids)
            for g in grads:
                c.push_rows(name, ids, g)
            got[shm] = (first, c.pull_rows(name, ids))
            assert _used_shm(c) == shm
            assert shm is False or c._io._arena.blocks_out == 0
    assert not got[True][0].any() and not got[False][0].any()
    np.testing.assert_array_equal(got[True][1], got[False][1])
    assert got[True][1].any()


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_bfloat16_sync_steps_give_the_same_bits_by_shared_memory_and_socket(
        cluster_factory: Any, replicas: str) -> None:
    """Two workers push bfloat16 gradients (cast by the client straight into shared
    memory, or into frames) to sync keys; each step applies the mean of the widened
    gradients, whichever way they came and whoever aggregated them (the shard, or a
    replicated leader)."""
    cluster = cluster_factory("--shards", "2", "--replicas", replicas)
    rng = np.random.default_rng(int(replicas))
    value = rng.standard_normal(3 * MiB // 4).astype(np.float32)  # 2 parts, shm-sized
    grads = [[rng.standard_normal(value.size).astype(np.float32) for _ in range(2)]
             for _ in range(3)]
    got: dict[bool, np.ndarray[Any, Any]] = {}
    for shm in (True, False):
        key = f"shm/bf16-{replicas}-{shm}"
        with pserver.connect(cluster.address, worker_id=0, num_workers=2, timeout=60) as c:
            c.init({key: value}, optimizer={"name": "sgd", "lr": 0.5}, mode="sync",
                   compression="bfloat16")
        results: dict[int, np.ndarray[Any, Any]] = {}

        def worker(rank: int, key: str = key, shm: bool = shm,
                   results: dict[int, np.ndarray[Any, Any]] = results) -> None:
            with pserver.connect(cluster.address, worker_id=rank, num_workers=2, shm=shm,
                                 timeout=60) as c:
                for step in grads:
                    results[rank] = c.push_pull({key: step[rank]})[key]
                assert _used_shm(c) == shm

        run_workers(worker, 2, 120)
        np.testing.assert_array_equal(results[0], results[1])
        got[shm] = results[0]
    want = value.copy()
    for g0, g1 in grads:
        wide = [g.astype(ml_dtypes.bfloat16).astype(np.float32) for g in (g0, g1)]
        want -= np.float32(0.5) * ((wide[0] + wide[1]) / np.float32(2))
    np.testing.assert_array_equal(got[True], got[False])
    np.testing.assert_allclose(got[True], want, rtol=1e-6, atol=1e-6)
    if replicas == "3":
        wait_until(lambda: converged(cluster.address), 30, "replicas at the same state")
