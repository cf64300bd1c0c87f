"""The supervisor behind ``pserver serve``.

Owns the cluster on this machine: spawns one process per shard replica (``pserver
shard``), waits until each answers, serves the cluster map and the cluster status
on the bootstrap address, restarts a replica process that dies (logged, with
exponential backoff, on the same endpoints), and on SIGTERM/SIGINT stops every
process and returns. Prints exactly one ``pserver ready: tcp://HOST:PORT`` line
once every shard answers. The data dir records the layout of the cluster that
made it (``cluster.json``) and refuses a cluster of another one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pserver.protocol.codec import decode_header, reply_header
from pserver.protocol.errors import InternalError, InvalidArgument, ProtocolError, PServerError
from pserver.protocol.schema import Header, Kind
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.transport import Endpoint, Poller, call, host_id, new_context

from .config import ServerConfig
from .wal import atomic_write

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
READY_PREFIX = "pserver ready: "


# A replica that cannot bind its port exits with this code (EADDRINUSE's value
# on Linux), so that the supervisor can tell a port taken since it was picked
# from any other failure.
EXIT_ADDRESS_IN_USE = 98
# The cluster's secret: replicas take it from their environment, put it in every
# Raft message they send and accept Raft messages and PEER_DOWN only with it.
CLUSTER_TOKEN_ENV = "PSERVER_CLUSTER_TOKEN"
PORT_ATTEMPTS = 5  # fresh ports per shard group before its start-up fails
LOWEST_PICKED_PORT = 20000
# Written into the data dir by the first cluster that uses it: the settings that
# decide where its data lies, which every later cluster on the dir must share.
LAYOUT_FILE = "cluster.json"


class DataDirMismatch(RuntimeError):
    """The data dir was made by a cluster of another layout (shards, replicas,
    chunk size, logged or in memory): starting on it would lose data silently."""


def _layout(config: ServerConfig) -> dict[str, Any]:
    return {"shards": config.shards, "replicas": config.replicas,
            "chunk_bytes": config.chunk_bytes, "in_memory": config.in_memory}


def _describe(layout: dict[str, Any]) -> str:
    return (f"{layout.get('shards')} shard(s) x {layout.get('replicas')} replica(s), "
            f"chunk_bytes {layout.get('chunk_bytes')}"
            f"{', in memory' if layout.get('in_memory') else ', logged'}")


def claim_data_dir(config: ServerConfig, record: bool = True) -> None:
    """Raise ``DataDirMismatch`` if the data dir was made by a cluster of another
    layout, else (with ``record``) write this cluster's layout into a dir that has
    none. ``start`` checks before it spawns a replica and records once the cluster
    is up (a start that fails, say on a bad host, claims nothing). Another layout: keys
    would be looked for on other shards or in other parts (``--shards``,
    ``--chunk-bytes``), a fresh majority of replicas could elect a leader with an
    empty log (``--replicas``), and a logged shard's state is not where an
    in-memory one looks (``--in-memory``)."""
    path = os.path.join(config.data_dir, LAYOUT_FILE)
    want = _layout(config)
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except FileNotFoundError:
        if record:
            atomic_write(Path(path), (json.dumps(want) + "\n").encode())
        return
    except (OSError, ValueError) as exc:
        raise DataDirMismatch(f"cannot read {path}: {exc}") from None
    if not isinstance(found, dict) or {k: found.get(k) for k in want} != want:
        raise DataDirMismatch(
            f"the data dir {config.data_dir} belongs to a cluster of "
            f"{_describe(found if isinstance(found, dict) else {})}, not "
            f"{_describe(want)}: start with its settings, or export its keys "
            "(pserver export) and start on a fresh --data-dir with --restore")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux), else 32768."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports free on ``host`` now (held open together while picked).

    A replica binds its port a second or so after the supervisor picked it. Ports
    are therefore taken at random from below the kernel's ephemeral range, which no
    outgoing connection (a client's, a peer link's) can take in the meantime; where
    that range leaves no room below it, the kernel picks them (port 0)."""
    import socket

    low = _ephemeral_low()
    pool = range(LOWEST_PICKED_PORT, low)
    socks: list[socket.socket] = []
    try:
        tries = 0
        while len(socks) < n:
            sk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sk)
            if len(pool) >= 4 * n and tries < 64 * n:
                tries += 1
                try:
                    sk.bind((host, random.choice(pool)))
                except OSError:
                    socks.pop().close()
            else:
                sk.bind((host, 0))
        return [sk.getsockname()[1] for sk in socks]
    finally:
        for sk in socks:
            sk.close()


class _PortTaken(RuntimeError):
    """A replica exited during start-up because its port was no longer free."""


class _ReplicaExited(RuntimeError):
    """A replica exited during start-up (for another reason than its port)."""


class Stopping(Exception):
    """SIGTERM or SIGINT came while the supervisor waited for replicas to start."""


def _workers(shards: list[dict[str, Any]]) -> dict[str, str]:
    """Every worker any shard heard from: "dropped" if a shard dropped it from its step
    quorum (each shard decides by the heartbeats it receives), else "alive"."""
    out: dict[str, str] = {}
    for s in shards:
        for w, state in s["workers"].items():
            if out.get(w) != "dropped":
                out[w] = state
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _digest_mismatch(shard: int, replicas: list[dict[str, Any]]) -> bool:
    """Whether two replicas at the same applied index hold different state (logged
    as an error: replicas must apply deterministically)."""
    by_index: dict[int, set[str]] = {}
    for r in replicas:
        if r.get("digest") and r.get("applied_index") is not None:
            by_index.setdefault(r["applied_index"], set()).add(r["digest"])
    bad = {i: d for i, d in by_index.items() if len(d) > 1}
    if bad:
        log.error("shard %d: replicas at the same applied index hold different state: %s",
                  shard, bad)
    return bool(bad)


def await_ready(proc: subprocess.Popen[str], timeout: float = STARTUP_TIMEOUT) -> str:
    """The bootstrap address from the ready line of a ``pserver serve`` child whose
    stdout is a text pipe. Raises ``TimeoutError`` when none comes within ``timeout``
    seconds and ``RuntimeError`` when the process exits first; the caller decides
    what to do with the process then."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"pserver serve gave no ready line within {timeout:g} s")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"pserver serve exited with {proc.wait()} before it was ready")
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
STATUS_TIMEOUT = 1.0
WATCH_MS = 20  # how often the loop looks for dead replicas (between bootstrap requests)
REPORT_TIMEOUT = 0.2  # how long a death report waits for the replicas' answers
STOP_CHECK_S = 0.1  # how often a wait during start-up looks for SIGTERM/SIGINT
DIGEST_CHECK_S = 10.0  # how often the supervisor compares the replicas' state digests


@dataclass
class Replica:
    """One replica process and the endpoints it serves on."""

    shard: int
    replica: int
    tcp: str
    ipc: str | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.1
    restart_at: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Supervisor:
    """Runs a cluster described by ``config`` until ``stop()`` or a signal."""

    def __init__(self, config: ServerConfig, ready_stream: IO[str] | None = None) -> None:
        self.config = config
        self.ready_stream = ready_stream if ready_stream is not None else sys.stdout
        self.shard_map = ShardMap.uniform(config.shards)
        self.ctx = new_context()
        self._ids = itertools.count(1)
        self._stop = False
        # proves that a Raft message comes from a replica, a PEER_DOWN from here
        self._token = os.environ.get(CLUSTER_TOKEN_ENV) or secrets.token_hex(16)
        self._running = False  # serving (run()): dead replicas are reaped and restarted
        self._reaping = False
        self.run_dir = tempfile.mkdtemp(prefix="pserver-")
        self.bootstrap: Endpoint | None = None
        self.address = ""
        # Replicas of a logged shard must know each other's addresses before they
        # start, so their ports are picked here; an in-memory shard binds port 0.
        ports = free_ports(config.host, config.shards * config.replicas) \
            if config.logged else [0] * config.shards
        self.replicas = [
            Replica(
                s,
                r,
                f"tcp://{config.host}:{ports[s * config.replicas + r]}",
                f"ipc://{self.run_dir}/shard-{s}-{r}.sock" if config.ipc else None,
            )
            for s in range(config.shards)
            for r in range(config.replicas)
        ]

    # -- lifecycle ------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def start(self) -> str:
        """Start every replica and the bootstrap endpoint; return the bootstrap address."""
        os.makedirs(self.config.data_dir, exist_ok=True)
        claim_data_dir(self.config, record=False)
        self.bootstrap = Endpoint.router_bound(
            self.ctx, [f"tcp://{self.config.host}:{self.config.port}"], self.config.limits
        )
        port = self.bootstrap.endpoints[0].rsplit(":", 1)[1]
        self.address = f"tcp://{self.config.host}:{port}"
        for r in self.replicas:
            self._spawn(r)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for shard in range(self.config.shards):
            self._await_group(shard, deadline)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for r in self.replicas:
            self._ping(r, deadline)
        self._await_leaders(time.monotonic() + STARTUP_TIMEOUT)
        claim_data_dir(self.config)
        log.info("cluster of %d shard(s) x %d replica(s) ready at %s", self.config.shards,
                 self.config.replicas, self.address)
        return self.address

    def announce(self) -> None:
        """Print the ready line, unless a stop was asked for meanwhile."""
        if not self._stop:
            print(f"{READY_PREFIX}{self.address}", file=self.ready_stream, flush=True)

    def run(self) -> None:
        """Serve the bootstrap endpoint and watch the replicas until stopped."""
        assert self.bootstrap is not None, "start() first"
        poller = Poller()
        poller.register(self.bootstrap)
        next_digest_check = time.monotonic() + DIGEST_CHECK_S
        self._running = True
        while not self._stop:
            if poller.poll(WATCH_MS):
                while (incoming := self.bootstrap.recv()) is not None:
                    self._handle(incoming)
            self._watch()
            if self.config.replicas > 1 and time.monotonic() >= next_digest_check:
                self.cluster_status()  # compares the replicas' digests, logs a mismatch
                next_digest_check = time.monotonic() + DIGEST_CHECK_S

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop every replica (SIGTERM, then SIGKILL after ``timeout``) and clean up."""
        procs = [r.proc for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGCONT)  # a stopped one acts on it too
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica pid %d ignored SIGTERM; killing it", p.pid)
                p.kill()
                p.wait()
        if self.bootstrap is not None:
            self.bootstrap.close()
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- replicas -------------------------------------------------------------

    def _command(self, r: Replica) -> list[str]:
        c = self.config
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        cmd = [
            sys.executable,
            "-m",
            "pserver",
            "--log-level",
            level if level in ("debug", "info", "warning", "error") else "info",
            "shard",
            "--shard-id",
            str(r.shard),
            "--num-shards",
            str(c.shards),
            "--endpoint",
            r.tcp,
            "--parent-pid",
            str(os.getpid()),
            "--frame-bytes",
            str(c.frame_bytes),
            "--chunk-bytes",
            str(c.chunk_bytes),
            "--device",
            c.device,
            "--data-dir",
            os.path.join(c.data_dir, f"shard-{r.shard}"),
            "--mode",
            c.mode,
            "--workers",
            str(c.workers),
            "--staleness",
            str(c.staleness),
            "--worker-timeout",
            str(c.worker_timeout),
            "--max-request-bytes",
            str(c.max_request_bytes),
            "--max-keys",
            str(c.max_keys),
            "--max-key-bytes",
            str(c.max_key_bytes),
        ]
        if r.ipc:
            cmd += ["--endpoint", r.ipc]
        if c.logged:
            cmd += ["--replica-id", str(r.replica), "--heartbeat-ms", str(c.heartbeat_ms),
                    "--election-timeout-ms", str(c.election_timeout_ms),
                    "--snapshot-log-bytes", str(c.snapshot_log_bytes)]
            for peer in self.replicas:
                if peer.shard == r.shard:
                    cmd += ["--peer", f"{peer.replica}={peer.tcp}"]
        return cmd

    def _shard_env(self) -> dict[str, str]:
        """The replicas' environment: each gets its share of the cores for numba's
        threads (unless NUMBA_NUM_THREADS is set), so shards on one machine do not
        oversubscribe it; results do not depend on the thread count."""
        env = dict(os.environ)
        if "NUMBA_NUM_THREADS" not in env:
            share = (os.cpu_count() or 1) // (self.config.shards * self.config.replicas)
            env["NUMBA_NUM_THREADS"] = str(max(1, share))
        env[CLUSTER_TOKEN_ENV] = self._token
        return env

    def _spawn(self, r: Replica) -> None:
        r.proc = subprocess.Popen(
            self._command(r), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=self._shard_env(),
        )
        r.started = time.monotonic()
        r.restart_at = None
        log.debug("spawned shard %d replica %d as pid %d", r.shard, r.replica, r.proc.pid)

    def _await_group(self, shard: int, deadline: float) -> None:
        """Wait for every replica of ``shard`` to report its endpoints. A replica that
        found its port taken sends the whole group (whose replicas know each other's
        addresses from their command lines) to fresh ports, up to PORT_ATTEMPTS times.
        A replica that exits for another reason (a log it refuses to trust, say) does
        not stop the shard while a majority of its group started: it is logged as an
        error, shown down, and restarted with back-off once the cluster serves."""
        group = [r for r in self.replicas if r.shard == shard]
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                exited: list[_ReplicaExited] = []
                for r in group:
                    try:
                        self._await_ready(r, deadline)
                    except _ReplicaExited as exc:
                        exited.append(exc)
                if exited and len(group) - len(exited) <= len(group) // 2:
                    raise exited[0]
                for gone in exited:
                    log.error("%s; shard %d starts without it (a majority of its replicas "
                              "is up), and it is restarted with back-off", gone, shard)
                return
            except _PortTaken as exc:
                if attempt == PORT_ATTEMPTS:
                    raise RuntimeError(f"{exc}, {PORT_ATTEMPTS} times") from None
                log.warning("%s; starting shard %d on fresh ports", exc, shard)
                for r in group:
                    if r.proc is not None:
                        if r.proc.poll() is None:
                            r.proc.kill()
                            r.proc.wait()
                        if r.proc.stdout is not None:
                            r.proc.stdout.close()
                for r, port in zip(group, free_ports(self.config.host, len(group)), strict=True):
                    r.tcp = f"tcp://{self.config.host}:{port}"
                for r in group:
                    self._spawn(r)

    def _await_ready(self, r: Replica, deadline: float) -> None:
        """Read the replica's one JSON line: the endpoints it actually bound."""
        assert r.proc is not None and r.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(r.proc.stdout, selectors.EVENT_READ)
            line = b""
            while not line.endswith(b"\n"):
                self._check_stop()
                self._reap()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"shard {r.shard} did not start within {STARTUP_TIMEOUT} s")
                if not sel.select(min(left, STOP_CHECK_S, WATCH_MS / 1000)):
                    continue
                chunk = os.read(r.proc.stdout.fileno(), 4096)
                if not chunk:
                    code = r.proc.wait()
                    if code == EXIT_ADDRESS_IN_USE and self.config.logged:
                        raise _PortTaken(f"shard {r.shard} replica {r.replica} found "
                                         f"{r.tcp} taken")
                    raise _ReplicaExited(f"shard {r.shard} replica {r.replica} exited during "
                                         f"start-up (code {code})")
                line += chunk
        r.proc.stdout.close()
        r.info = json.loads(line)
        tcp = [e for e in r.info["endpoints"] if e.startswith("tcp://")]
        # Keep the port the first start got, so restarts come back on the same address.
        r.tcp = tcp[0]

    def _check_stop(self) -> None:
        if self._stop:
            raise Stopping("stop requested while replicas were starting")

    def _await_leaders(self, deadline: float) -> None:
        """Wait until every shard has a leader (the ready line promises one)."""
        if not self.config.logged:
            return
        while True:
            self._check_stop()
            shards = self.cluster_status()["shards"]
            if all(any(r["role"] == "leader" for r in s["replicas"]) for s in shards):
                return
            if time.monotonic() > deadline:
                missing = [s["id"] for s in shards
                           if not any(r["role"] == "leader" for r in s["replicas"])]
                raise RuntimeError(f"shards {missing} elected no leader within "
                                   f"{STARTUP_TIMEOUT:g} s")
            time.sleep(0.05)

    def _ping(self, r: Replica, deadline: float) -> None:
        """Ping ``r`` until it answers; its last failure once ``deadline`` passed. A
        replica whose process is not running (one a started group goes on without)
        is not waited for."""
        while True:
            self._check_stop()
            if r.proc is None or r.proc.poll() is not None:
                return
            header = Header(Kind.PING, next(self._ids))
            left = deadline - time.monotonic()
            try:
                call(self.ctx, r.tcp, header, self.config.limits, max(0.01, min(left, 1.0)))
                return
            except PServerError:
                if time.monotonic() >= deadline:
                    raise

    def _watch(self) -> None:
        self._reap()
        now = time.monotonic()
        for r in self.replicas:
            if r.restart_at is not None and now >= r.restart_at:
                self._restart(r)

    def _reap(self) -> None:
        """Notice the replicas whose process died since the last look: report each to
        the rest of its group and schedule its restart. Also runs inside the waits of
        a status request and of a restart (which may take seconds), so a death is
        reported within about WATCH_MS whatever the loop is doing."""
        if self._reaping or not self._running:
            return
        self._reaping = True
        try:
            now = time.monotonic()
            for r in self.replicas:
                if r.restart_at is not None or r.proc is None or r.proc.poll() is None:
                    continue
                code = r.proc.returncode
                if self.config.logged and self.config.replicas > 1:
                    self._report_down(r, now)
                if now - r.started > 10.0:
                    r.backoff = 0.1
                log.warning("shard %d replica %d (pid %d) exited with %s; restarting in %.1f s",
                            r.shard, r.replica, r.proc.pid, code, r.backoff)
                r.restart_at = now + r.backoff
                r.backoff = min(r.backoff * 2, self.config.restart_backoff_max)
        finally:
            self._reaping = False

    def _report_down(self, dead: Replica, at: float) -> None:
        """Tell the other live replicas of ``dead``'s shard that its process is gone
        (reaped at ``at`` on the monotonic clock, before its restart): if it led,
        they elect a new leader now instead of after an election timeout."""
        others = [r for r in self.replicas
                  if r.shard == dead.shard and r is not dead and r.pid is not None]
        answers = self._ask([(r, Header(Kind.PEER_DOWN, next(self._ids), opts={
            "token": self._token, "replica": dead.replica, "at": at})) for r in others],
            REPORT_TIMEOUT)
        log.debug("shard %d replica %d died: reported to %d of %d live replicas",
                  dead.shard, dead.replica, len(answers), len(others))

    def _restart(self, r: Replica) -> None:
        r.restarts += 1
        try:
            self._spawn(r)
            self._await_ready(r, time.monotonic() + STARTUP_TIMEOUT)
            log.info("shard %d replica %d restarted as pid %s", r.shard, r.replica, r.pid)
        except Stopping:
            return  # shutdown() stops the new process with the others
        except (RuntimeError, OSError, ValueError) as exc:
            log.error("restart of shard %d failed: %s", r.shard, exc)
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
            r.restart_at = time.monotonic() + r.backoff
            r.backoff = min(r.backoff * 2, self.config.restart_backoff_max)

    # -- bootstrap requests ---------------------------------------------------

    def cluster_map(self) -> dict[str, Any]:
        c = self.config
        return {
            "address": self.address,
            "epoch": self.shard_map.epoch,
            "shard_map": self.shard_map.to_wire(),
            "chunk_bytes": c.chunk_bytes,
            "frame_bytes": c.frame_bytes,
            "limits": c.limits.to_wire(),
            "host_id": host_id(),
            "mode": c.mode,
            "shards": [
                {
                    "id": shard,
                    "replicas": [{"id": r.replica, "tcp": r.tcp, "ipc": r.ipc, "pid": r.pid}
                                 for r in self.replicas if r.shard == shard],
                }
                for shard in range(c.shards)
            ],
        }

    def _ask(self, requests: list[tuple[Replica, Header]],
             timeout: float) -> dict[tuple[int, int], dict[str, Any]]:
        """Send each request to its replica at once; the ``o`` of every answer (not an
        error) that came within ``timeout``, by (shard, replica)."""
        pending: dict[int, tuple[Endpoint, Replica]] = {}
        for r, header in requests:
            ep = Endpoint.dealer_connected(self.ctx, r.tcp)
            ep.send(header)
            pending[header.request_id] = (ep, r)
        answers: dict[tuple[int, int], dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        poller = Poller()
        for ep, _ in pending.values():
            poller.register(ep)
        try:
            while len(answers) < len(pending) and (left := deadline - time.monotonic()) > 0:
                ready = poller.poll(min(left * 1000, WATCH_MS))
                self._reap()
                for rid, (ep, r) in pending.items():
                    if ep.sock not in ready:
                        continue
                    while (inc := ep.recv()) is not None:
                        try:
                            h = decode_header(inc.header, self.config.limits)
                        except ProtocolError:
                            continue
                        if h.request_id == rid and not h.error:
                            answers[(r.shard, r.replica)] = h.opts
        finally:
            for ep, _ in pending.values():
                ep.close()
        return answers

    def cluster_status(self) -> dict[str, Any]:
        """Ask every replica for its status at once; one that does not answer is ``down``.
        A shard's key and byte counts come from its leader (else any replica)."""
        answers = self._ask([(r, Header(Kind.STATUS, next(self._ids))) for r in self.replicas],
                            STATUS_TIMEOUT)
        shards = []
        for shard in range(self.config.shards):
            replicas = []
            for r in (r for r in self.replicas if r.shard == shard):
                a = answers.get((r.shard, r.replica))
                replica: dict[str, Any] = {"id": r.replica, "address": r.tcp, "ipc": r.ipc,
                                           "pid": r.pid, "restarts": r.restarts}
                if a is None:
                    replica.update(role="down", term=None, commit_index=None,
                                   applied_index=None)
                else:
                    replica.update({k: a[k] for k in ("role", "term", "commit_index",
                                                      "applied_index", "pid")})
                    replica["digest"] = a.get("digest")
                    for k in ("lease_reads", "read_index_reads", "peer_down_notices",
                              "raft_refused", "unreadable_entries", "digest_checks",
                              "digest_mismatches", "workers"):
                        if k in a:  # workers: those this replica heard from (its leader's)
                            replica[k] = a[k]
                replicas.append(replica)
            mine = [answers[(shard, r["id"])] for r in replicas if (shard, r["id"]) in answers]
            a = next((x for x in mine if x["role"] == "leader"), mine[0] if mine else None)
            shard_info: dict[str, Any] = {"id": shard}
            for k in ("keys", "home_keys", "parts", "tables", "rows", "bytes"):
                shard_info[k] = a[k] if a else None
            # the workers this shard heard from: "alive", or "dropped" from its step
            # quorum after --worker-timeout without a heartbeat
            shard_info["workers"] = dict(a.get("workers", {})) if a else {}
            shard_info["replicas"] = replicas
            # compared here (replicas idle at one index) or by the replicas themselves
            # through the log's digest marks (any replica that counted a mismatch)
            shard_info["digest_mismatch"] = _digest_mismatch(shard, replicas) or any(
                r.get("digest_mismatches") for r in replicas)
            shards.append(shard_info)
        return {
            "address": self.address,
            "epoch": self.shard_map.epoch,
            "mode": self.config.mode,
            # a key counts once: on the shard holding its part 0
            "keys": sum(s["home_keys"] or 0 for s in shards),
            "bytes": sum(s["bytes"] or 0 for s in shards),
            "workers": _workers(shards),
            "shards": shards,
        }

    def _handle(self, incoming: Any) -> None:
        assert self.bootstrap is not None
        header = None
        try:
            header = decode_header(incoming.header, self.config.limits)
            if header.kind == Kind.MAP:
                opts = self.cluster_map()
            elif header.kind == Kind.STATUS:
                opts = self.cluster_status()
            elif header.kind == Kind.PING:
                opts = {"pid": os.getpid()}
            else:
                raise InvalidArgument(
                    f"the bootstrap address serves MAP, STATUS and PING, not {header.kind.name}"
                )
            reply = reply_header(header, opts=opts)
        except Exception as exc:
            if not isinstance(exc, PServerError):
                log.exception("bootstrap request failed")
                exc = InternalError(f"{type(exc).__name__}: {exc}")
            rid = header.request_id if header else int(exc.details.get("request_id", 0))
            reply = Header(Kind.REPLY, rid, error=int(exc.code), message=exc.message)
        self.bootstrap.send(reply, identity=incoming.identity)
