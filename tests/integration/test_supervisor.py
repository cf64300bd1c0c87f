"""`pserver serve` and `pserver status` as users run them: ready line, status
output, restarts of dead shards, shutdown on signals, and orphan cleanup."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pserver
from pserver.clients.client import cluster_status
from pserver.supervisor import await_ready

from .support import assert_bits_equal, key_on_shard, pid_alive, shard_pids, wait_until

pytestmark = pytest.mark.integration

READY = re.compile(r"pserver ready: tcp://127\.0\.0\.1:([0-9]+)")
REPLICA_FIELDS = ("id", "address", "pid", "role", "term", "commit_index", "applied_index")


def clean_env() -> dict[str, str]:
    """The environment without PSERVER_* settings that would change the defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PSERVER_")}


def pserver_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pserver", *args]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``proc`` ('' at EOF), waiting at most ``timeout`` s."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
        return proc.stdout.readline()


def status_json(address: str) -> dict[str, Any]:
    out = subprocess.run(pserver_cmd("status", "--address", address, "--json"),
                         capture_output=True, text=True, timeout=30, check=False, env=clean_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- serve ------------------------------------------------------------------------


def test_serve_prints_exactly_one_ready_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        pserver_cmd("serve", "--port", "0", "--replicas", "1", "--shards", "2",
                    "--data-dir", str(tmp_path / "data")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env())
    try:
        first = read_line(proc, 60)
        m = READY.fullmatch(first.rstrip("\n"))
        assert m, f"first stdout line is {first!r}"
        assert int(m.group(1)) != 0
        address = first.split(": ", 1)[1].strip()
        with pserver.connect(address, timeout=10.0) as c:  # the address really serves
            c.init({"x": np.ones(3, np.float32)})
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert rest == "", f"more stdout after the ready line: {rest!r}"


def test_port_0_gives_each_cluster_its_own_free_port(cluster_factory: Any) -> None:
    a, b = cluster_factory(), cluster_factory()
    port_a, port_b = (int(c.address.rsplit(":", 1)[1]) for c in (a, b))
    assert 0 not in (port_a, port_b)
    assert port_a != port_b
    for c in (a, b):
        with pserver.connect(c.address, timeout=10.0) as client:
            client.init({"k": np.full(2, port_a, np.int64)})
            assert_bits_equal(client.pull(["k"])["k"], np.full(2, port_a, np.int64))


def test_serve_runs_three_replicas_per_shard_by_default(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        pserver_cmd("serve", "--port", "0", "--shards", "2", "--data-dir", str(tmp_path / "d")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env())
    try:
        address = await_ready(proc, 60)
        st = cluster_status(address)
        for s in st["shards"]:
            assert [r["id"] for r in s["replicas"]] == [0, 1, 2]
            assert len({r["address"] for r in s["replicas"]}) == 3

        def settled() -> bool:  # a follower may still be a candidate right after start
            return all(sorted(r["role"] for r in s["replicas"]) == ["follower", "follower",
                                                                     "leader"]
                       for s in cluster_status(address)["shards"])

        wait_until(settled, 15.0, "one leader and two followers in every shard")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        proc.stdout.close()


# -- status -----------------------------------------------------------------------


def test_status_text_and_json(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "3")
    with pserver.connect(cluster.address, timeout=10.0) as c:
        c.init({key_on_shard(c.shard_map, 1, "st"): np.zeros(250, np.float32)})

    st = status_json(cluster.address)
    assert [s["id"] for s in st["shards"]] == [0, 1, 2]
    for s in st["shards"]:
        assert len(s["replicas"]) == 1
        r = s["replicas"][0]
        assert set(REPLICA_FIELDS) <= set(r), r
        assert r["role"] == "leader"
        assert pid_alive(r["pid"])
        assert isinstance(r["term"], int)
        assert r["commit_index"] >= r["applied_index"]
    assert [s["bytes"] for s in st["shards"]] == [0, 1000, 0]
    assert [s["keys"] for s in st["shards"]] == [0, 1, 0]

    text = subprocess.run(pserver_cmd("status", "--address", cluster.address),
                          capture_output=True, text=True, timeout=30, check=False,
                          env=clean_env())
    assert text.returncode == 0, text.stderr
    assert cluster.address in text.stdout
    assert text.stdout.count("leader") == 3
    for s in st["shards"]:
        r = s["replicas"][0]
        assert str(r["pid"]) in text.stdout
        assert r["address"] in text.stdout


def test_status_of_an_address_without_server_fails_fast(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    out = subprocess.run(pserver_cmd("status", "--address", f"tcp://127.0.0.1:{port}",
                                     "--timeout", "1"),
                         capture_output=True, text=True, timeout=30, check=False,
                         env=clean_env())
    assert time.monotonic() - t0 < 15
    assert out.returncode != 0
    assert out.stderr.strip()
    assert out.stdout == ""


# -- restarts ---------------------------------------------------------------------


def test_killed_shard_is_restarted_and_serves_again(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "3")
    with pserver.connect(cluster.address, timeout=10.0) as client:
        key = key_on_shard(client.shard_map, 1, "before")
        client.init({key: np.ones(8, np.float32)})
        for round_ in range(2):  # the second death is restarted too (backoff grows)
            old = client.status()["shards"][1]["replicas"][0]["pid"]
            others = [shard_pids(client.status())[i] for i in (0, 2)]
            os.kill(old, signal.SIGKILL)

            def restarted(old: int = old) -> Any:
                r = client.status()["shards"][1]["replicas"][0]
                return r["role"] == "leader" and r["pid"] not in (None, old) and r
            replica = wait_until(restarted, 20.0, f"shard 1 restarted (round {round_})")
            assert pid_alive(replica["pid"])
            assert not pid_alive(old)
            assert [shard_pids(client.status())[i] for i in (0, 2)] == others

            # the existing client, and a new one, use the restarted shard
            fresh = {key_on_shard(client.shard_map, s, f"after{round_}"): np.full(5, s, np.int64)
                     for s in range(3)}
            client.init(fresh, optimizer={"name": "sum"})
            client.push(fresh)
            with pserver.connect(cluster.address, timeout=10.0) as other:
                got = other.pull(list(fresh))
            for k, v in fresh.items():
                assert_bits_equal(got[k], v + v, k)
    log = cluster.stderr()
    assert str(old) in log, log
    assert "restart" in log.lower(), log


# -- shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything_and_exits_0(cluster_factory: Any, sig: int) -> None:
    cluster = cluster_factory("--shards", "3")
    pids = shard_pids(status_json(cluster.address))
    assert all(pid_alive(p) for p in pids)
    t0 = time.monotonic()
    cluster.proc.send_signal(sig)
    assert cluster.proc.wait(timeout=30) == 0, cluster.stderr()
    assert time.monotonic() - t0 < 30
    alive = [p for p in pids if pid_alive(p)]
    assert alive == [], f"shard processes left running: {alive}"


def test_shards_exit_on_their_own_when_the_supervisor_is_killed(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "3")
    with pserver.connect(cluster.address, timeout=10.0) as c:
        ipc = c.cluster_map["shards"][0]["replicas"][0]["ipc"]
    pids = shard_pids(status_json(cluster.address))
    cluster.proc.kill()
    cluster.proc.wait(timeout=10)
    try:
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10.0,
                   f"orphaned shards {pids} exited")
    finally:
        if ipc:  # the killed supervisor could not remove its run directory
            shutil.rmtree(Path(ipc.removeprefix("ipc://")).parent, ignore_errors=True)


# -- ports ------------------------------------------------------------------------


def test_picked_ports_lie_below_the_ephemeral_range() -> None:
    from pserver.supervisor import _ephemeral_low, free_ports

    ports = free_ports("127.0.0.1", 12)
    assert len(set(ports)) == 12
    if _ephemeral_low() - 20000 >= 48:
        assert all(20000 <= p < _ephemeral_low() for p in ports)


def test_a_group_whose_port_was_taken_starts_on_fresh_ports(tmp_path: Path) -> None:
    """A port picked by the supervisor and taken before its replica binds it (here,
    by a listening socket of the test) sends that shard's group to fresh ports; the
    cluster then starts and serves."""
    import socket
    import threading

    from pserver.config import ServerConfig
    from pserver.supervisor import Supervisor

    sup = Supervisor(ServerConfig(shards=2, replicas=3, port=0, data_dir=str(tmp_path)),
                     ready_stream=open(os.devnull, "w"))  # noqa: SIM115
    serving = threading.Thread(target=sup.run, daemon=True)
    taken = sup.replicas[4]  # shard 1, replica 1
    port = int(taken.tcp.rsplit(":", 1)[1])
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        address = sup.start()
        assert taken.tcp != f"tcp://127.0.0.1:{port}"
        serving.start()
        st = cluster_status(address)
        for s in st["shards"]:
            assert sorted(r["role"] for r in s["replicas"]) == ["follower", "follower", "leader"]
        client = pserver.connect(address, timeout=30)
        try:
            key = key_on_shard(client.shard_map, 1, "moved")
            client.init({key: np.arange(4, dtype=np.float32)})
            assert_bits_equal(client.pull([key])[key], np.arange(4, dtype=np.float32))
        finally:
            client.close()
    finally:
        sup.stop()
        if serving.is_alive():
            serving.join(10)
        squatter.close()
        sup.ready_stream.close()
        sup.shutdown()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_sigterm_while_a_replica_hangs_in_start_up_exits_0_without_a_ready_line(
        tmp_path: Path, replicas: str) -> None:
    proc = subprocess.Popen(
        pserver_cmd("serve", "--port", "0", "--replicas", replicas, "--data-dir",
                    str(tmp_path / "d")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env())
    try:
        kids = wait_until(lambda: _children(proc.pid), 30, "a replica process")
        os.kill(kids[0], signal.SIGSTOP)  # stands in for a slow disk or a long replay
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        assert "pserver ready" not in proc.stdout.read()
        assert not any(pid_alive(k) for k in kids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_bootstrap_port_in_use_fails_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            pserver_cmd("serve", "--port", str(port), "--replicas", "1", "--in-memory",
                        "--data-dir", str(tmp_path / "d")),
            capture_output=True, text=True, timeout=60, check=False, env=clean_env())
    assert out.returncode == 1
    assert f"cannot bind tcp://127.0.0.1:{port}: address in use" in out.stderr
    assert "Traceback" not in out.stderr and "pserver ready" not in out.stdout


@pytest.mark.parametrize("host", ["no-such-host.invalid", "10.255.255.1"])
def test_a_host_that_is_not_this_machine_fails_with_a_clear_message(
        tmp_path: Path, host: str) -> None:
    for replicas in (["--replicas", "1", "--in-memory"], ["--replicas", "3"]):
        out = subprocess.run(
            pserver_cmd("serve", "--port", "0", "--host", host, *replicas,
                        "--data-dir", str(tmp_path / "d")),
            capture_output=True, text=True, timeout=60, check=False, env=clean_env())
        assert out.returncode == 1
        assert f"cannot serve on host {host!r}" in out.stderr or \
            f"cannot bind tcp://{host}:0" in out.stderr  # in memory: the first bind says it
        assert "Traceback" not in out.stderr and "pserver ready" not in out.stdout


def test_a_data_dir_refuses_a_cluster_of_another_layout(cluster_factory: Any,
                                                        tmp_path: Path) -> None:
    """Keys are placed by the shard count and the chunk size, and a logged shard's
    state is not where an in-memory one looks: a restart with other settings on
    the same data dir would lose data without a word, so it is refused (exit 1, one
    line saying why) and the data stays; the same settings start again."""
    first = cluster_factory("--shards", "2")
    with pserver.connect(first.address) as c:
        c.init({"w": np.arange(4 << 20, dtype=np.float32)})  # 16 MiB: parts on both shards
    first.stop()
    assert json.loads((tmp_path / "data" / "cluster.json").read_text())["shards"] == 2
    for other in (["--shards", "3"], ["--shards", "2", "--chunk-bytes", str(1 << 20)],
                  ["--shards", "2", "--replicas", "3"]):
        out = subprocess.run(
            pserver_cmd("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                        *(["--replicas", "1", "--in-memory"] if "--replicas" not in other
                          else []), *other),
            capture_output=True, text=True, timeout=60, check=False, env=clean_env())
        assert out.returncode == 1, (other, out.stderr)
        assert "belongs to a cluster of 2 shard(s) x 1 replica(s)" in out.stderr, other
        assert "Traceback" not in out.stderr and "pserver ready" not in out.stdout
    again = cluster_factory("--shards", "2")
    with pserver.connect(again.address) as c:
        np.testing.assert_array_equal(c.pull(["w"])["w"], np.arange(4 << 20, dtype=np.float32))
