"""Replicated shards under real failures: `pserver serve --replicas 3`, real replica
processes killed with SIGKILL or stopped with SIGSTOP, real fsync'ed logs.

The set oracle (DESIGN.md section 4.7): every push adds exactly 1.0 at its own
coordinate of a key spread over both shards. At the end a push that was
acknowledged reads exactly 1, a push that failed reads 0 or 1 (never 2: nothing
is applied twice), an untouched coordinate reads 0, and every replica of a
shard holds the same state (equal digests at the same applied index)."""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest

import pserver
from pserver import Unavailable
from pserver.clients.client import cluster_status
from pserver.protocol.codec import encode_header
from pserver.protocol.errors import ErrorCode
from pserver.protocol.schema import Header, Kind
from pserver.supervisor import CLUSTER_TOKEN_ENV
from pserver.wal import _record_end

from .support import assert_bits_equal, key_on_shard, run_workers, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.failover]

N = 16384  # coordinates; float32 with 16 KiB chunks: 4 parts over the 2 shards
KEY = "oracle"
ARGS = ("--shards", "2", "--replicas", "3", "--chunk-bytes", "16384", "--frame-bytes",
        "4096")


def replicated(cluster_factory: Any, *extra: str) -> Any:
    """A 2-shard x 3-replica cluster (stopped at the end of the test)."""
    return cluster_factory(*ARGS, *extra)


def replicas(address: str, shard: int) -> list[dict[str, Any]]:
    return cluster_status(address)["shards"][shard]["replicas"]  # type: ignore[no-any-return]


def leader(address: str, shard: int) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in replicas(address, shard)
                                    if r["role"] == "leader"), None),
                      15, f"a leader of shard {shard}")


def converged(address: str) -> bool:
    """Every replica of every shard up, at the same applied index, with equal digests."""
    for s in cluster_status(address)["shards"]:
        rs = s["replicas"]
        if any(r["role"] == "down" for r in rs):
            return False
        if len({r["applied_index"] for r in rs}) != 1 or len({r["digest"] for r in rs}) != 1:
            return False
    return True


class Writers:
    """Threads that each push +1 at their own coordinates, recording what was
    acknowledged and what failed (Unavailable: applied once or not at all)."""

    def __init__(self, address: str, workers: int = 2, timeout: float = 20.0) -> None:
        self.address = address
        self.acked: set[int] = set()
        self.failed: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.coords = list(range(N))
        random.Random(7).shuffle(self.coords)
        self.threads = [threading.Thread(target=self._run, args=(w, workers, timeout))
                        for w in range(workers)]

    def _run(self, w: int, workers: int, timeout: float) -> None:
        with pserver.connect(self.address, timeout=timeout) as client:
            for i in self.coords[w::workers]:
                if self.stop.is_set():
                    return
                g = np.zeros(N, np.float32)
                g[i] = 1.0
                try:
                    client.push({KEY: g})
                except Unavailable:
                    with self.lock:
                        self.failed.add(i)
                    continue
                with self.lock:
                    self.acked.add(i)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "a writer thread hung"

    def done(self) -> int:
        with self.lock:
            return len(self.acked) + len(self.failed)


def init_oracle(address: str) -> None:
    with pserver.connect(address, timeout=20) as c:
        c.init({KEY: np.zeros(N, np.float32)}, optimizer={"name": "sum"})


def check_oracle(address: str, acked: set[int], failed: set[int]) -> None:
    with pserver.connect(address, timeout=20) as c:
        value = c.pull([KEY])[KEY]
    assert not (acked & failed)
    a, f = sorted(acked), sorted(failed)
    assert np.all(value[a] == 1.0), f"acknowledged pushes lost: {np.flatnonzero(value[a] != 1)}"
    assert np.all((value[f] == 0.0) | (value[f] == 1.0)), "a failed push was applied twice"
    rest = np.ones(N, bool)
    rest[a] = rest[f] = False
    assert np.all(value[rest] == 0.0), "a coordinate nobody pushed changed"
    wait_until(lambda: converged(address), 30, "replicas converged with equal digests")


def test_status_shows_every_replica_with_role_term_and_indices(cluster_factory: Any) -> None:
    """Also: the Raft timing settings of `serve` reach every replica process."""
    c = replicated(cluster_factory, "--heartbeat-ms", "40", "--election-timeout-ms", "400")
    try:
        init_oracle(c.address)
        st = cluster_status(c.address)
        assert len(st["shards"]) == 2
        for s in st["shards"]:
            assert [r["id"] for r in s["replicas"]] == [0, 1, 2]
            assert sum(r["role"] == "leader" for r in s["replicas"]) == 1

        def everyone_in() -> bool:
            """The init is committed by a majority: the third replica may not have
            heard from its leader yet (a peer link retries its connection with
            back-off while the replica starts), so wait for it with a deadline."""
            return all(r["role"] in ("leader", "follower") and r["term"] >= 1
                       and r["commit_index"] >= r["applied_index"] >= 1
                       for s in cluster_status(c.address)["shards"] for r in s["replicas"])

        wait_until(everyone_in, 15, "every replica in a term, the init applied")
        for s in cluster_status(c.address)["shards"]:
            assert all(r["pid"] > 0 for r in s["replicas"])
            for r in s["replicas"]:
                argv = Path(f"/proc/{r['pid']}/cmdline").read_bytes().split(b"\0")
                timing = argv[argv.index(b"--heartbeat-ms"):argv.index(b"--heartbeat-ms") + 4]
                assert timing == [b"--heartbeat-ms", b"40", b"--election-timeout-ms", b"400"]
        wait_until(lambda: converged(c.address), 15, "replicas converged")
        # the text form: a row per replica with its role, term and indices
        text = subprocess.run([sys.executable, "-m", "pserver", "status", "--address",
                               c.address], capture_output=True, text=True, timeout=30,
                              check=True).stdout.splitlines()
        st = cluster_status(c.address)
        for s in st["shards"]:
            for r in s["replicas"]:
                row = [ln.split() for ln in text if ln.endswith(r["address"])]
                assert row and row[0][:7] == [str(s["id"]), str(r["id"]), r["role"], str(r["pid"]),
                                              str(r["term"]), str(r["commit_index"]),
                                              str(r["applied_index"])], (row, r)
    finally:
        assert c.stop() == 0


def test_killing_a_leader_mid_run_loses_no_acknowledged_push(cluster_factory: Any) -> None:
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        old = leader(c.address, 0)
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 100, 60, "100 pushes")
            os.kill(old["pid"], signal.SIGKILL)
            wait_until(lambda: w.done() >= 400, 90, "400 pushes after the kill")
        new = leader(c.address, 0)
        assert new["term"] > old["term"]
        assert w.acked, "nothing was acknowledged"
        check_oracle(c.address, w.acked, w.failed)
    finally:
        assert c.stop() == 0


def test_killing_a_follower_changes_nothing_for_clients(cluster_factory: Any) -> None:
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        lead = leader(c.address, 1)
        follower = next(r for r in replicas(c.address, 1) if r["role"] == "follower")
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 50, 60, "50 pushes")
            os.kill(follower["pid"], signal.SIGKILL)
            wait_until(lambda: w.done() >= 250, 90, "250 pushes after the kill")
        assert not w.failed
        assert leader(c.address, 1)["term"] == lead["term"]  # no election was needed
        check_oracle(c.address, w.acked, w.failed)
    finally:
        assert c.stop() == 0


def test_without_a_majority_writes_stop_with_unavailable_then_resume(cluster_factory: Any) -> None:
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        lead = leader(c.address, 0)
        follower = next(r for r in replicas(c.address, 0) if r["role"] == "follower")
        short = pserver.connect(c.address, timeout=2.0)
        os.kill(c.proc.pid, signal.SIGSTOP)  # no restarts while the majority is gone
        try:
            os.kill(lead["pid"], signal.SIGKILL)
            os.kill(follower["pid"], signal.SIGKILL)
            g = np.zeros(N, np.float32)
            g[0] = 1.0
            with pytest.raises(Unavailable):
                short.push({KEY: g})
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
            short.close()
        # The supervisor restarts both from their disks; the same client retries.
        with pserver.connect(c.address, timeout=30) as client:
            g = np.zeros(N, np.float32)
            g[1] = 1.0
            client.push({KEY: g})
        check_oracle(c.address, {1}, {0})
    finally:
        assert c.stop() == 0


def test_a_stopped_leader_is_replaced_and_catches_up_when_it_resumes(cluster_factory: Any) -> None:
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        old = wait_until(lambda: _settled_leader(c.address), 30, "one leader, followed by all")
        os.kill(old["pid"], signal.SIGSTOP)  # alive but silent for several election timeouts
        try:
            with Writers(c.address) as w:
                wait_until(lambda: w.done() >= 150, 90, "150 pushes with the leader stopped")
                new = leader(c.address, 0)
                assert new["id"] != old["id"] and new["term"] > old["term"]
        finally:
            os.kill(old["pid"], signal.SIGCONT)
        check_oracle(c.address, w.acked, w.failed)
        back = next(r for r in replicas(c.address, 0) if r["id"] == old["id"])
        assert back["role"] == "follower" and back["pid"] == old["pid"]
    finally:
        assert c.stop() == 0


def test_every_replica_killed_recovers_every_acknowledged_push_from_disk(
        cluster_factory: Any) -> None:
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 200, 60, "200 pushes")
        pids = [r["pid"] for s in (0, 1) for r in replicas(c.address, s)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: all(r["pid"] not in pids and r["role"] != "down"
                               for s in (0, 1) for r in replicas(c.address, s)),
                   60, "every replica restarted")
        check_oracle(c.address, w.acked, w.failed)
    finally:
        assert c.stop() == 0


def _crash_whole_cluster(c: Any) -> None:
    """SIGKILL every replica and the supervisor, so nothing stops cleanly."""
    pids = [r["pid"] for s in (0, 1) for r in replicas(c.address, s)]
    os.kill(c.proc.pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(30)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_torn_wal_tail_is_cut_on_restart_and_nothing_acknowledged_is_lost(
        cluster_factory: Any, tmp_path: Path, seed: int) -> None:
    c = replicated(cluster_factory)
    init_oracle(c.address)
    with Writers(c.address) as w:
        wait_until(lambda: w.done() >= 150, 60, "150 pushes")
    _crash_whole_cluster(c)
    # Cut one replica's newest log segment at a random byte: a torn last write.
    rng = random.Random(seed)
    shard, replica = rng.randrange(2), rng.randrange(3)
    wal_dir = tmp_path / "data" / f"shard-{shard}" / f"replica-{replica}" / "wal"
    segment = max(wal_dir.glob("*.wal"))
    data = segment.read_bytes()
    last, pos = 0, 0  # where the last whole record starts: the cut lands inside it
    while (end := _record_end(data, pos, int(segment.stem, 16))) is not None:
        last, pos = pos, end
    assert pos > last > 0
    cut = rng.randrange(last + 1, pos)
    with open(segment, "r+b") as fh:
        fh.truncate(cut)
    c2 = replicated(cluster_factory)
    try:
        check_oracle(c2.address, w.acked, w.failed)
        assert f"{segment}: cutting a torn tail of {cut - last} bytes at byte {last}" \
            in c2.stderr()
    finally:
        assert c2.stop() == 0


def test_a_clean_restart_with_the_same_data_dir_keeps_every_update(
        cluster_factory: Any, tmp_path: Path) -> None:
    c = replicated(cluster_factory)
    init_oracle(c.address)
    with Writers(c.address) as w:
        wait_until(lambda: w.done() >= 100, 60, "100 pushes")
    assert not w.failed
    assert c.stop() == 0
    snaps = list((tmp_path / "data").glob("shard-*/replica-*/raft.snap"))
    assert len(snaps) == 6, "each replica snapshots its state on a clean stop"
    c2 = replicated(cluster_factory)
    try:
        check_oracle(c2.address, w.acked, w.failed)
    finally:
        assert c2.stop() == 0


def test_a_follower_behind_the_compacted_log_catches_up_by_snapshot(
        cluster_factory: Any) -> None:
    """With a tiny log budget the leader compacts while a follower is stopped; when
    it resumes, the entries it lacks are gone and it gets the snapshot (§7)."""
    c = replicated(cluster_factory, "--snapshot-log-bytes", "65536")
    init_oracle(c.address)
    lagging = next(r for r in replicas(c.address, 0) if r["role"] == "follower")
    os.kill(lagging["pid"], signal.SIGSTOP)
    try:
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 120, 90, "120 pushes with a follower stopped")
        lead = leader(c.address, 0)
        assert lead["applied_index"] > 0
    finally:
        os.kill(lagging["pid"], signal.SIGCONT)
    check_oracle(c.address, w.acked, w.failed)
    assert "installed the leader's snapshot" in c.stderr()
    back = next(r for r in replicas(c.address, 0) if r["id"] == lagging["id"])
    assert back["pid"] == lagging["pid"]  # caught up in place, no restart


def test_followers_answer_not_leader_and_a_copy_in_flight_is_applied_once(
        cluster_factory: Any, raw_peer: Any) -> None:
    from pserver.protocol.codec import encode_header
    from pserver.protocol.errors import ErrorCode
    from pserver.protocol.schema import Header, Kind, TensorMeta

    c = replicated(cluster_factory)
    init_oracle(c.address)
    with pserver.connect(c.address, timeout=20) as client:
        shard = client.shard_map.shard_for(KEY, 0)
    lead = leader(c.address, shard)
    follower = next(r for r in replicas(c.address, shard) if r["role"] == "follower")
    count = 16384 // 4  # part 0 of the oracle key: one 16 KiB chunk
    meta = TensorMeta(KEY, 0, "float32", (N,), 0, count, 1)
    g = np.zeros(count, np.float32)
    g[7] = 1.0

    def push(rid: int) -> bytes:
        return encode_header(Header(Kind.PUSH, rid, client_id=b"raw-client", seq=1,
                                    tensors=(meta,)))

    def hint() -> Any:
        reply, _ = raw_peer(follower["address"]).request(push(1), [g.tobytes()])
        assert reply.error == ErrorCode.NOT_LEADER
        return reply.opts["leader_hint"]  # None while the follower knows no leader

    # A follower that has not heard from the leader since an election (a busy
    # machine) answers without a hint: wait for one, with a deadline.
    assert wait_until(hint, 15, "a leader hint from a follower") == lead["address"]
    peer = raw_peer(lead["address"])
    peer.send([push(2), g.tobytes()])  # the same mutation twice, back to back:
    peer.send([push(3), g.tobytes()])  # the copy joins the first on its way
    answers = {peer.recv()[0].request_id for _ in range(2)}
    assert answers == {2, 3}
    reply, _ = peer.request(push(4), [g.tobytes()])  # and once applied, from the table
    assert reply.error == 0
    with pserver.connect(c.address, timeout=20) as client:
        assert client.pull([KEY])[KEY][7] == 1.0


# -- sync steps: aggregated on the leader, one log entry per step ---------------------


SYNC_STEPS = 30


def _sync_run(address: str, kill_at: int | None = None) -> dict[str, np.ndarray]:
    """Two workers (threads, own clients) push_pull SYNC_STEPS steps of seeded
    gradients into a sync key spread over both shards; with ``kill_at``, the leader of
    shard 0 is killed with SIGKILL when worker 0 reaches that step."""
    model = {"w": np.linspace(-1, 1, 3 * 4096, dtype=np.float32),  # 3 chunks of 16 KiB
             "b": np.zeros(7, np.float32)}
    with pserver.connect(address, worker_id=0, num_workers=2, timeout=30) as c:
        c.init(model, optimizer={"name": "momentum", "lr": 0.05, "momentum": 0.9},
               mode="sync")
    out: dict[int, dict[str, np.ndarray]] = {}

    def worker(rank: int) -> None:
        rng = np.random.default_rng(100 + rank)
        with pserver.connect(address, worker_id=rank, num_workers=2, timeout=30) as c:
            for step in range(SYNC_STEPS):
                if rank == 0 and step == kill_at:
                    os.kill(leader(address, 0)["pid"], signal.SIGKILL)
                grads = {k: rng.standard_normal(v.shape).astype(np.float32)
                         for k, v in model.items()}
                out[rank] = c.push_pull(grads)

    run_workers(worker, 2, 180)
    for k in model:  # both workers read the same values after the last step
        assert np.array_equal(out[0][k], out[1][k])
    return out[0]


def test_sync_steps_give_the_same_bits_replicated_and_not_even_across_a_failover(
        cluster_factory: Any, tmp_path: Path) -> None:
    single = cluster_factory("--shards", "2", "--replicas", "1", "--chunk-bytes", "16384",
                             "--frame-bytes", "4096", "--workers", "2",
                             "--data-dir", str(tmp_path / "single"))
    want = _sync_run(single.address)
    c = replicated(cluster_factory, "--workers", "2", "--data-dir", str(tmp_path / "r3"))
    got = _sync_run(c.address)
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k}: replicated sync differs from R=1"
    wait_until(lambda: converged(c.address), 30, "replicas converged")
    st = cluster_status(c.address)
    # one log entry per step and shard, not one per push (2 x steps and more): the
    # steps plus a few (the init, each term's no-op, two per digest mark; 35-37 seen)
    applied = [r["applied_index"] for s in st["shards"] for r in s["replicas"]]
    assert all(SYNC_STEPS <= i < 2 * SYNC_STEPS for i in applied), applied
    c2 = replicated(cluster_factory, "--workers", "2", "--data-dir", str(tmp_path / "r3-kill"))
    failed_over = _sync_run(c2.address, kill_at=SYNC_STEPS // 2)
    for k in want:
        assert np.array_equal(failed_over[k], want[k]), f"{k}: differs after a failover"
    wait_until(lambda: converged(c2.address), 30, "replicas converged after the failover")


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_more_requests_at_once_than_one_drain_are_each_answered(cluster_factory: Any,
                                                                replicas: str) -> None:
    """A replica's loop handles at most a batch of messages between clock ticks; the
    message after a full batch stays queued, not dropped (it was: 300 pushes at once
    left 4 unanswered until their deadline)."""
    cluster = cluster_factory("--shards", "1", "--replicas", replicas)
    with pserver.connect(cluster.address, timeout=20.0) as c:
        c.init({"many": np.zeros(4, np.float64)}, optimizer={"name": "sum"})
        futures = [c.push_async({"many": np.ones(4)}) for _ in range(300)]
        for f in futures:
            assert f.result(timeout=60) is None
        np.testing.assert_array_equal(c.pull(["many"])["many"], np.full(4, 300.0))


def test_a_leader_answers_reads_under_its_lease(cluster_factory: Any) -> None:
    """A leader whose heartbeats a quorum keeps acknowledging answers reads at once,
    without a round of messages per read (status counts both kinds)."""
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        with pserver.connect(c.address, timeout=20) as client:
            for _ in range(50):
                client.pull([KEY])
        lead = leader(c.address, 0)
        assert lead["lease_reads"] >= 40, lead
        assert lead["lease_reads"] + lead["read_index_reads"] >= 50
    finally:
        assert c.stop() == 0


def test_a_leader_stopped_past_its_lease_answers_no_read_without_a_quorum(
        cluster_factory: Any) -> None:
    """Stop both followers, then the leader, for longer than a lease; send the leader
    a read and wake it alone. Its lease ran out on the clock while it was stopped
    (it cannot have counted the time in its own ticks), so it must not answer
    until a quorum is back: a new leader may have been elected meanwhile."""
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        lead = leader(c.address, 0)
        followers = [r["pid"] for r in replicas(c.address, 0) if r["id"] != lead["id"]]
        with pserver.connect(c.address, timeout=30) as reader:
            reader.pull([KEY])
            try:
                for pid in [*followers, lead["pid"]]:
                    os.kill(pid, signal.SIGSTOP)
                wait_until(lambda: all(_stopped(pid) for pid in [*followers, lead["pid"]]),
                           10, "the shard's replicas stopped")
                time.sleep(1.0)  # the stopped leader's lease runs out (not a synchronisation)
                pending = reader.pull_async([KEY])
                os.kill(lead["pid"], signal.SIGCONT)
                # Alone, it cannot confirm a read: in this window nothing may answer.
                wait_futures([pending], timeout=1.5)
                answered_alone = pending.done()
            finally:
                for pid in [lead["pid"], *followers]:
                    os.kill(pid, signal.SIGCONT)
            assert not answered_alone, "a leader cut off past its lease answered a read"
            assert np.all(pending.result(30)[KEY] == 0.0)
    finally:
        assert c.stop() == 0


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_killed_leader_is_replaced_on_the_supervisors_report(cluster_factory: Any) -> None:
    """The supervisor reaps the SIGKILLed leader and reports it to the followers, which
    elect a new leader at once instead of after an election timeout. The leader is
    stopped for a moment first, so the followers have handled everything it sent
    before its death is seen (else the report is not acted on, and the timeout
    elects the leader as before)."""
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        old = wait_until(lambda: _settled_leader(c.address), 30, "one leader, followed by all")
        os.kill(old["pid"], signal.SIGSTOP)
        wait_until(lambda: _stopped(old["pid"]), 10, "the leader stopped")
        time.sleep(0.15)  # the followers handle its last heartbeat (under the 300 ms timeout)
        os.kill(old["pid"], signal.SIGKILL)
        new = wait_until(lambda: next((r for r in replicas(c.address, 0) if r["role"] == "leader"
                                       and r["pid"] != old["pid"]), None), 15, "a new leader")
        assert new["term"] > old["term"]
        told = [r.get("peer_down_notices") for r in replicas(c.address, 0)
                if r["id"] != old["id"]]
        assert sum(n or 0 for n in told) >= 1, told
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 20, 60, "20 pushes after the failover")
        check_oracle(c.address, w.acked, w.failed)
    finally:
        assert c.stop() == 0


def _settled_leader(address: str) -> dict[str, Any] | None:
    """Shard 0's leader once every replica is in its term, the others following."""
    rs = replicas(address, 0)
    lead = [r for r in rs if r["role"] == "leader"]
    if len(lead) != 1 or any(r["role"] != "follower" for r in rs if r is not lead[0]):
        return None
    return lead[0] if len({r["term"] for r in rs}) == 1 else None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def test_a_death_report_needs_the_token_and_no_word_from_the_dead_since(
        cluster_factory: Any, raw_peer: Any) -> None:
    """PEER_DOWN is refused without the supervisor's token or with a bad replica or
    time (INVALID_ARGUMENT), and not acted on when the reported leader was heard
    from after the reported death: the leader stays, no election starts."""
    c = replicated(cluster_factory)
    try:
        lead = wait_until(lambda: _settled_leader(c.address), 30, "one leader, followed by all")
        f = next(r for r in replicas(c.address, 0) if r["role"] == "follower")
        token = _environ(f["pid"])[CLUSTER_TOKEN_ENV]
        peer = raw_peer(f["address"])

        def report(rid: int, **opts: Any) -> Any:
            full = {"token": token, "replica": lead["id"], "at": time.monotonic(), **opts}
            return peer.request(encode_header(Header(Kind.PEER_DOWN, rid, opts=full)))[0]

        for rid, bad in enumerate([{"token": "not-the-token"}, {"token": None},
                                   {"replica": f["id"]}, {"replica": 7}, {"replica": "0"},
                                   {"at": "now"}, {"at": True}], start=1):
            h = report(rid, **bad)
            assert h.error == ErrorCode.INVALID_ARGUMENT, (bad, h)
        h = report(10, at=time.monotonic() - 5.0)  # heartbeats came since
        assert not h.error and h.opts["accepted"] is False
        now = next(r for r in replicas(c.address, 0) if r["id"] == f["id"])
        assert now["peer_down_notices"] == 0 and now["role"] == "follower"
        after = leader(c.address, 0)
        assert (after["pid"], after["term"]) == (lead["pid"], lead["term"])
    finally:
        assert c.stop() == 0


def test_a_raft_message_without_the_cluster_token_is_dropped(
        cluster_factory: Any, raw_peer: Any) -> None:
    """Raft messages come in on the port clients use: a client that forges an
    AppendEntries (a garbage entry, committed at once) or a vote request in the
    follower's term changes nothing there: no entry, no commit, no new term; the
    replica counts them and keeps serving, and its digest still matches the leader's."""
    c = replicated(cluster_factory)
    try:
        init_oracle(c.address)
        lead = wait_until(lambda: _settled_leader(c.address), 30, "one leader, followed by all")
        f = next(r for r in replicas(c.address, 0) if r["role"] == "follower")
        peer = raw_peer(f["address"])
        before = peer.request(encode_header(Header(Kind.STATUS, 1)))[0].opts
        term, last = before["term"], before["last_index"]
        forged = {"t": 1, "f": lead["id"] + 1, "to": f["id"] + 1, "term": term, "lt": term,
                  "i": last, "c": last + 1, "e": [[term, last + 1, 1]]}
        vote = {"t": 3, "f": lead["id"] + 1, "to": f["id"] + 1, "term": term + 5,
                "lt": term + 5, "i": last + 100, "c": 0}
        for opts in (forged, {**forged, "tok": "a guess"}, vote):
            peer.send([encode_header(Header(Kind.RAFT, 0, opts=opts)), b"\xde\xad\xbe\xef" * 4])
        now = wait_until(lambda: next(r for r in replicas(c.address, 0) if r["id"] == f["id"]
                                      and (r.get("raft_refused") or 0) >= 3), 15,
                         "the forged messages handled")
        assert (now["pid"], now["role"], now["term"]) == (f["pid"], "follower", term)
        assert now.get("unreadable_entries") == 0
        after = leader(c.address, 0)
        assert (after["pid"], after["term"]) == (lead["pid"], lead["term"])
        with Writers(c.address) as w:
            wait_until(lambda: w.done() >= 20, 60, "20 pushes after the forgeries")
        check_oracle(c.address, w.acked, w.failed)

        def caught_up() -> list[dict[str, Any]] | None:
            rs = replicas(c.address, 0)
            return rs if len({r["applied_index"] for r in rs}) == 1 else None

        rs = wait_until(caught_up, 30, "replicas caught up")
        assert len({r["digest"] for r in rs}) == 1, rs
    finally:
        assert c.stop() == 0


def test_concurrent_async_pushes_share_log_entries(cluster_factory: Any) -> None:
    """Async pushes that reach a leader together are proposed as one entry (group
    commit): 64 pushes sent at once take far fewer than 64 entries, and each is
    applied exactly once."""
    c = replicated(cluster_factory)
    try:
        with pserver.connect(c.address, timeout=30) as client:
            key = key_on_shard(client.shard_map, 0, "batched")
            client.init({key: np.zeros(16, np.float32)}, optimizer={"name": "sum"})
            wait_until(lambda: converged(c.address), 15, "replicas converged")
            before = leader(c.address, 0)["applied_index"]
            futures = [client.push_async({key: np.ones(16, np.float32)}) for _ in range(64)]
            wait_futures(futures, timeout=30)
            for f in futures:
                f.result()
            assert_bits_equal(client.pull([key])[key], np.full(16, 64, np.float32))
            wait_until(lambda: converged(c.address), 15, "replicas converged")
            entries = leader(c.address, 0)["applied_index"] - before
            assert 1 <= entries <= 16, entries
    finally:
        assert c.stop() == 0


def test_a_leader_that_cannot_write_its_log_is_retried_elsewhere(cluster_factory: Any) -> None:
    """A log write that fails is never acknowledged, and the client gets a retryable
    answer at once instead of waiting out its deadline. Here the write fails with
    EFBIG (the leader's file-size limit lowered under its log, a real failed write;
    a full disk, ENOSPC, takes the same path): the leader answers the push NotLeader
    and stops, the client sends it again to the next leader, the push is applied
    exactly once, and the supervisor restarts the replica, which catches up."""
    c = replicated(cluster_factory)
    try:
        # the deadline is the check: no prompt retryable answer, no push in 15 s
        with pserver.connect(c.address, timeout=15) as client:
            key = key_on_shard(client.shard_map, 0, "disk")
            ones = np.ones(1 << 18, np.float32)  # 1 MiB
            client.init({key: np.zeros_like(ones)}, optimizer={"name": "sum"})
            client.push({key: ones})
            wait_until(lambda: converged(c.address), 15, "replicas converged")
            old = leader(c.address, 0)
            resource.prlimit(old["pid"], resource.RLIMIT_FSIZE, (1, 1))
            client.push({key: ones})  # answered by the next leader
            assert_bits_equal(client.pull([key])[key], 2 * ones)
        wait_until(lambda: leader(c.address, 0)["pid"] != old["pid"], 15, "a new leader")
        wait_until(lambda: all(r["role"] != "down" and r["pid"] != old["pid"]
                               for r in replicas(c.address, 0)), 30, "the replica restarted")
        wait_until(lambda: converged(c.address), 30, "replicas converged")
        # it stopped itself on the failed write (exit 3), not killed by SIGXFSZ
        assert f"(pid {old['pid']}) exited with 3" in c.stderr()
    finally:
        assert c.stop() == 0


def test_a_leader_that_cannot_write_its_snapshot_stops_and_loses_nothing(
        cluster_factory: Any, tmp_path: Path) -> None:
    """A compaction whose snapshot file cannot be written (here ``raft.snap.tmp`` is
    a directory, so opening it fails, as a full or broken disk would) is a failed
    log write: the leader stops (exit 3) after answering what it held NotLeader,
    the pushes go to the next leader and each is applied once, and the replica
    restarted by the supervisor catches up once the disk works again."""
    c = replicated(cluster_factory, "--snapshot-log-bytes", "1048576")
    try:
        with pserver.connect(c.address, timeout=15) as client:
            key = key_on_shard(client.shard_map, 0, "snapfail")
            ones = np.ones(1 << 17, np.float32)  # 512 KiB
            client.init({key: np.zeros_like(ones)}, optimizer={"name": "sum"})
            wait_until(lambda: converged(c.address), 15, "replicas converged")
            old = leader(c.address, 0)
            blocked = tmp_path / "data" / "shard-0" / f"replica-{old['id']}" / "raft.snap.tmp"
            blocked.mkdir()
            pushes = 0
            while leader(c.address, 0)["pid"] == old["pid"]:
                assert pushes < 40, "the leader never compacted its log"
                client.push({key: ones})
                pushes += 1
            blocked.rmdir()
            assert_bits_equal(client.pull([key])[key], pushes * ones)
        wait_until(lambda: all(r["role"] != "down" and r["pid"] != old["pid"]
                               for r in replicas(c.address, 0)), 30, "the replica restarted")
        wait_until(lambda: converged(c.address), 30, "replicas converged")
        assert f"(pid {old['pid']}) exited with 3" in c.stderr()
        assert "writing the snapshot failed" in c.stderr()
    finally:
        assert c.stop() == 0


def test_replicas_that_hold_different_state_are_reported_loudly(
        cluster_factory: Any, tmp_path: Path) -> None:
    """Replicas must apply identically; if one ever holds other state at the same
    applied index, the supervisor says so: `digest_mismatch` in the status, an
    ERROR line in `pserver status`, an error in its log. The divergence is made by
    hand: one value byte of one replica's snapshot changed (checksum made valid
    again) while the cluster is stopped."""
    c = replicated(cluster_factory)
    with pserver.connect(c.address, timeout=30) as client:
        key = key_on_shard(client.shard_map, 0, "digest")
        client.init({key: np.zeros(1024, np.float32)}, optimizer={"name": "sum"})
        client.push({key: np.ones(1024, np.float32)})
    wait_until(lambda: converged(c.address), 15, "replicas converged")
    assert not any(s["digest_mismatch"] for s in cluster_status(c.address)["shards"])
    assert c.stop() == 0
    snap = tmp_path / "data" / "shard-0" / "replica-2" / "raft.snap"
    raw = bytearray(snap.read_bytes())
    crc_at = len(raw) - 4
    raw[crc_at - 1] ^= 0x40  # the last byte of the last array: the key's value
    body_from = raw.index(b"PSNAP01\n")  # the shard snapshot after the Raft header
    raw[crc_at:] = struct.pack("<I", google_crc32c.value(bytes(raw[body_from:crc_at])))
    snap.write_bytes(bytes(raw))
    c2 = replicated(cluster_factory)
    try:
        def mismatch() -> bool:
            st = cluster_status(c2.address)["shards"][0]
            ups = [r for r in st["replicas"] if r["role"] != "down"]
            return len(ups) == 3 and bool(st["digest_mismatch"])

        wait_until(mismatch, 30, "the divergent replica reported")
        text = subprocess.run([sys.executable, "-m", "pserver", "status", "--address",
                               c2.address], capture_output=True, text=True, timeout=30,
                              check=False)
        assert "ERROR: the replicas of shard 0 hold different state" in text.stdout
        assert "hold different state" in c2.stderr()
        # The replicas find it themselves too, through the log's digest marks (every
        # 10 s while entries are applied): the leader and the odd one out disagree.
        with pserver.connect(c2.address, timeout=30) as client:
            def counted() -> bool:
                client.push({key: np.ones(1024, np.float32)})  # entries to mark
                rs = replicas(c2.address, 0)
                return sum(r.get("digest_mismatches", 0) for r in rs) >= 1

            wait_until(counted, 40, "a replica counting the mismatch itself")
        rs = replicas(c2.address, 0)
        assert sum(r.get("digest_checks", 0) for r in rs) >= 2  # the same ones agreed
        assert "differs from its leader's at the same log position" in c2.stderr()
        st = cluster_status(c2.address)["shards"]
        assert not st[1]["digest_mismatch"]  # only the shard that differs
        assert not any(r.get("digest_mismatches") for r in st[1]["replicas"])
    finally:
        assert c2.stop() == 0


def test_a_log_corrupt_before_its_end_stops_that_replica_with_a_clear_message(
        cluster_factory: Any, tmp_path: Path) -> None:
    """A bad record followed by good ones is not a torn write: the replica refuses to
    start and says why (restore it from a peer), and is never served from a log it
    cannot trust; its shard goes on with the two others."""
    c = replicated(cluster_factory)
    init_oracle(c.address)
    with Writers(c.address) as w:
        wait_until(lambda: w.done() >= 100, 60, "100 pushes")
    _crash_whole_cluster(c)
    wal_dir = tmp_path / "data" / "shard-0" / "replica-1" / "wal"
    segment = max(wal_dir.glob("*.wal"))
    data = bytearray(segment.read_bytes())
    assert len(data) > 4096
    data[len(data) // 3] ^= 0xFF  # inside some record, with good records after it
    segment.write_bytes(bytes(data))
    c2 = replicated(cluster_factory)
    try:
        wait_until(lambda: "corrupt record at byte" in c2.stderr(), 30,
                   "the replica's refusal")
        assert "refusing to start" in c2.stderr() and str(segment) in c2.stderr()
        check_oracle_on = [r for r in replicas(c2.address, 0) if r["id"] != 1]
        assert any(r["role"] == "leader" for r in check_oracle_on)
        with pserver.connect(c2.address, timeout=30) as client:  # the shard still serves
            key = key_on_shard(client.shard_map, 0, "after-corruption")
            client.init({key: np.zeros(4, np.float32)}, optimizer={"name": "sum"})
            client.push({key: np.ones(4, np.float32)})
            assert_bits_equal(client.pull([key])[key], np.ones(4, np.float32))
        assert replicas(c2.address, 0)[1]["role"] == "down"
    finally:
        c2.stop()
