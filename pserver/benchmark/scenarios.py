"""Benchmark scenarios, usable from ``pserver bench`` and from pytest (``bench/``).

Owns what is measured and how, on the public client API only:

- ``LocalCluster``: a ``pserver serve --port 0`` process started and stopped by
  the benchmark (SIGTERM at the end), its ready line read against a deadline.
- ``Pair``: per transport (``tcp`` / ``ipc``) a ``pserver`` client and a raw
  pyzmq echo server (``baselines.EchoServer``) measured side by side.
- ``dense_throughput``: ``push_pull`` of a float32 tensor per size, interleaved
  round by round with the echo of the same bytes in the same chunking;
  best-of-rounds and median GB/s counting pushed + pulled bytes.
- ``small_latency``: lockstep 4 KiB ``push_pull`` round trips against lockstep
  4 KiB raw DEALER/ROUTER round trips, interleaved in blocks; p50/p99/p99.9.
- ``run``: every scenario plus machine info, the memory limit and the
  targets of the issues, as one JSON-ready ``dict`` (the ``--json`` report).

Units: sizes in bytes (KiB/MiB binary), throughput in GB/s = 1e9 bytes/s,
latency in microseconds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import pserver
from pserver.clients.client import Client
from pserver.supervisor import await_ready

from .baselines import EchoServer, memory_bandwidth

Array = np.ndarray[Any, Any]
Progress = Callable[[str], None]  # called once per finished step, with a label

KiB = 1 << 10
MiB = 1 << 20
GB = 1e9
TRANSPORTS = ("tcp", "ipc")
KEY_PREFIX = "pserver-bench"

DEFAULT_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)
QUICK_SIZES = (4 * KiB, 1 * MiB, 64 * MiB)
ECHO_WINDOW = 4  # chunks in flight in the echo baseline
LATENCY_BYTES = 4 * KiB
LATENCY_BLOCK = 100  # round trips per interleaved block

# The issues' targets (issue 2 "Measure", issue 6 "Targets").
TARGET_DENSE_RATIO = 0.8  # pserver / echo, best of rounds, tensors >= 1 MiB
TARGET_DENSE_MIN_BYTES = 1 * MiB
TARGET_LATENCY_RATIO = 2.0  # pserver p50 / echo p50


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    rounds: int = 10
    transports: tuple[str, ...] = TRANSPORTS
    window: int = ECHO_WINDOW
    round_bytes: int = 16 * MiB  # small tensors repeat within a round up to this many bytes
    max_reps: int = 200  # ... and at most this many times
    latency_count: int = 2000
    latency_warmup: int = 200
    membw_bytes: int = 64 * MiB
    membw_repeats: int = 5
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "sizes": QUICK_SIZES,
            "rounds": 5,
            "latency_count": 1000,
            "latency_warmup": 100,
            "max_reps": 100,
            "membw_repeats": 3,
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)

    def reps(self, size: int) -> int:
        """push_pull calls per round for a tensor of ``size`` bytes."""
        return max(1, min(self.max_reps, self.round_bytes // max(1, size)))

    def steps(self) -> int:
        """Progress steps of ``run``: one per measured round, latency block and baseline."""
        dense = len(self.sizes) * len(self.transports) * (self.rounds + 1)
        blocks = -(-(self.latency_count + self.latency_warmup) // LATENCY_BLOCK)
        return dense + blocks * len(self.transports) + 1


# -- a self-started cluster ---------------------------------------------------------


@dataclass
class LocalCluster:
    """A ``pserver serve`` process on this machine, in its own scratch directory."""

    proc: subprocess.Popen[str]
    address: str
    workdir: Path
    owns_workdir: bool = True

    @classmethod
    def start(
        cls,
        shards: int = 4,
        replicas: int = 1,
        extra: Sequence[str] = (),
        timeout: float = 60.0,
        workdir: Path | None = None,
        in_memory: bool | None = None,
    ) -> LocalCluster:
        """Run ``python -m pserver serve --port 0`` and wait for its ready line;
        the server's log goes to ``workdir/serve.log``. ``in_memory`` (default: when
        ``replicas`` is 1) adds ``--in-memory``: the benchmarks' R=1 keeps no log."""
        owns = workdir is None
        if in_memory is None:
            in_memory = replicas == 1
        wd = Path(tempfile.mkdtemp(prefix="pserver-bench-")) if workdir is None else workdir
        log_path = wd / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "pserver",
            "serve",
            "--port",
            "0",
            "--shards",
            str(shards),
            "--replicas",
            str(replicas),
            "--data-dir",
            str(wd / "data"),
            *(["--in-memory"] if in_memory else []),
            *extra,
        ]
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
        cluster = cls(proc, "", wd, owns)
        try:
            cluster.address = await_ready(proc, timeout)
        except (TimeoutError, RuntimeError) as exc:
            cluster.stop(keep_log=True)
            raise RuntimeError(f"{exc}:\n{cluster.log_tail()}") from None
        return cluster

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.workdir / "serve.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, keep_log: bool = False) -> int | None:
        """SIGTERM (SIGKILL after ``timeout`` s), then remove the scratch directory
        (its data only, with ``keep_log``); returns the exit code."""
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if keep_log:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)
        elif self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one transport: a pserver client and its echo baseline ---------------------------


@dataclass
class Pair:
    """A pserver client and a raw echo server over the same transport."""

    transport: str
    client: Client
    echo: EchoServer

    def close(self) -> None:
        self.client.close()
        self.echo.close()


def uses_ipc(client: Client) -> bool:
    return all(e.startswith("ipc://") for es in client.endpoints.values() for e in es)


def open_pair(address: str, transport: str, scratch: Path, timeout: float = 60.0) -> Pair:
    """A client forced onto ``transport`` and an echo server on the same transport.
    Raises ``RuntimeError`` when the cluster cannot be reached over ipc from here."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {TRANSPORTS}")
    client = pserver.connect(address, ipc=transport == "ipc", timeout=timeout)
    if uses_ipc(client) != (transport == "ipc"):
        client.close()
        raise RuntimeError(
            f"the cluster at {address} is not reachable over {transport} from this host"
        )
    endpoint = (
        "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{scratch}/echo-{os.getpid()}.sock"
    )
    try:
        echo = EchoServer(endpoint)
    except BaseException:
        client.close()
        raise
    return Pair(transport, client, echo)


@contextlib.contextmanager
def open_pairs(
    address: str, transports: Sequence[str], notes: list[str] | None = None
) -> Iterator[dict[str, Pair]]:
    """``open_pair`` for each transport; a transport that cannot be used is left
    out (and said in ``notes``). Everything is closed on exit."""
    scratch = Path(tempfile.mkdtemp(prefix="pserver-bench-echo-"))
    pairs: dict[str, Pair] = {}
    try:
        for t in transports:
            try:
                pairs[t] = open_pair(address, t, scratch)
            except RuntimeError as exc:
                if notes is None:
                    raise
                notes.append(f"{t} skipped: {exc}")
        yield pairs
    finally:
        for p in pairs.values():
            p.close()
        shutil.rmtree(scratch, ignore_errors=True)


# -- scenario 1: dense throughput -------------------------------------------------------


@dataclass(frozen=True)
class DenseRow:
    """One tensor size over one transport; GB/s count pushed + pulled bytes."""

    size_bytes: int
    transport: str
    pserver_best_gbps: float
    pserver_median_gbps: float
    echo_best_gbps: float
    echo_median_gbps: float
    ratio_best: float
    ratio_median: float
    rounds: int
    reps_per_round: int
    pserver_best_ms: float  # one push_pull, best round
    echo_best_ms: float


def dense_key(size: int) -> str:
    return f"{KEY_PREFIX}/dense-{size}"


def dense_tensor(size: int) -> Array:
    """The float32 gradient of ``size`` bytes pushed by the dense scenario."""
    return np.full(max(1, size // 4), 1.0e-3, dtype=np.float32)


def pserver_round(client: Client, key: str, grad: Array, reps: int = 1) -> float:
    """Seconds for ``reps`` consecutive ``push_pull_into`` calls of ``grad``: the new
    values land in one output array reused across calls, as the echo baseline
    reuses its receive buffer (``push_pull`` would also pay for a fresh array)."""
    grads = {key: grad}
    out = {key: np.empty_like(grad)}
    t0 = time.perf_counter()
    for _ in range(reps):
        client.push_pull_into(grads, out)
    return time.perf_counter() - t0


def echo_round(
    pair: Pair, grad: Array, out: Array, reps: int = 1, window: int = ECHO_WINDOW
) -> float:
    """Seconds for ``reps`` echoes of ``grad`` in the client's chunking."""
    c = pair.client
    t0 = time.perf_counter()
    for _ in range(reps):
        pair.echo.round(grad, c.chunk_bytes, c.frame_bytes, window, out)
    return time.perf_counter() - t0


def dense_throughput(
    pairs: dict[str, Pair], settings: Settings, progress: Progress | None = None
) -> list[DenseRow]:
    """For each size: a warm-up, then ``settings.rounds`` rounds in which every
    transport runs pserver and echo back to back (the order alternating)."""
    rows: list[DenseRow] = []
    for size in settings.sizes:
        grad = dense_tensor(size)
        key = dense_key(grad.nbytes)
        out = np.empty_like(grad)
        reps = settings.reps(grad.nbytes)
        moved = 2 * grad.nbytes * reps
        for pair in pairs.values():
            pair.client.init({key: grad})
        times: dict[tuple[str, str], list[float]] = {
            (t, kind): [] for t in pairs for kind in ("pserver", "echo")
        }
        for r in range(settings.rounds + 1):  # round 0 warms up
            for t, pair in pairs.items():
                for kind in ("echo", "pserver") if r % 2 else ("pserver", "echo"):
                    if kind == "pserver":
                        dt = pserver_round(pair.client, key, grad, reps)
                    else:
                        dt = echo_round(pair, grad, out, reps, settings.window)
                    if r:
                        times[(t, kind)].append(dt)
                if progress is not None:
                    progress(f"dense {format_size(grad.nbytes)} {t}")
        for t in pairs:
            ps = [moved / s / GB for s in times[(t, "pserver")]]
            ec = [moved / s / GB for s in times[(t, "echo")]]
            rows.append(
                DenseRow(
                    size_bytes=grad.nbytes,
                    transport=t,
                    pserver_best_gbps=max(ps),
                    pserver_median_gbps=statistics.median(ps),
                    echo_best_gbps=max(ec),
                    echo_median_gbps=statistics.median(ec),
                    ratio_best=max(ps) / max(ec),
                    ratio_median=statistics.median(ps) / statistics.median(ec),
                    rounds=settings.rounds,
                    reps_per_round=reps,
                    pserver_best_ms=min(times[(t, "pserver")]) / reps * 1e3,
                    echo_best_ms=min(times[(t, "echo")]) / reps * 1e3,
                )
            )
    return rows


# -- scenario 2: small-request latency ------------------------------------------------


@dataclass(frozen=True)
class LatencyRow:
    """Lockstep round trips of ``size_bytes`` each way, in microseconds."""

    transport: str
    size_bytes: int
    count: int
    pserver_p50_us: float
    pserver_p99_us: float
    pserver_p999_us: float
    echo_p50_us: float
    echo_p99_us: float
    echo_p999_us: float
    ratio_p50: float


def percentiles_us(seconds: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and p99.9 of ``seconds``, in microseconds."""
    p = np.percentile(np.asarray(seconds) * 1e6, [50, 99, 99.9])
    return float(p[0]), float(p[1]), float(p[2])


def timed_calls(call: Callable[[], object], count: int) -> list[float]:
    """Seconds of each of ``count`` lockstep calls of ``call``."""
    clock = time.perf_counter
    times: list[float] = []
    for _ in range(count):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return times


def pserver_roundtrips(client: Client, key: str, grad: Array, count: int) -> list[float]:
    """Seconds of each of ``count`` lockstep ``push_pull`` calls."""
    grads = {key: grad}
    return timed_calls(lambda: client.push_pull(grads), count)


def small_latency(
    pair: Pair, settings: Settings, progress: Progress | None = None, size: int = LATENCY_BYTES
) -> LatencyRow:
    """``push_pull`` of one float32 tensor of ``size`` bytes against a raw round trip
    of the same bytes, alternating blocks of ``LATENCY_BLOCK`` of each."""
    grad = dense_tensor(size)
    key = f"{KEY_PREFIX}/latency-{grad.nbytes}"
    pair.client.init({key: grad})
    total = settings.latency_warmup + settings.latency_count
    ps: list[float] = []
    ec: list[float] = []
    done = block = 0
    while done < total:
        n = min(LATENCY_BLOCK, total - done)
        if block % 2:
            ec += pair.echo.roundtrips(grad, n)
            ps += pserver_roundtrips(pair.client, key, grad, n)
        else:
            ps += pserver_roundtrips(pair.client, key, grad, n)
            ec += pair.echo.roundtrips(grad, n)
        done += n
        block += 1
        if progress is not None:
            progress(f"latency {pair.transport}")
    ps, ec = ps[settings.latency_warmup :], ec[settings.latency_warmup :]
    p50, p99, p999 = percentiles_us(ps)
    e50, e99, e999 = percentiles_us(ec)
    return LatencyRow(
        pair.transport, grad.nbytes, len(ps), p50, p99, p999, e50, e99, e999, p50 / e50
    )


# -- context ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import zmq

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "pserver": pserver.__version__,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit() -> dict[str, Any]:
    """The commit of the source tree pserver runs from, and whether it has
    uncommitted changes to tracked files; None values outside a git checkout."""
    root = Path(pserver.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if dirty is None or commit is None else bool(dirty)}


def cluster_settings(client: Client, address: str, self_started: bool) -> dict[str, Any]:
    st = client.status()
    replicas = max((len(s.get("replicas", [])) for s in st.get("shards", [])), default=0)
    return {
        "address": address,
        "self_started": self_started,
        "shards": client.shard_map.num_shards,
        "replicas": replicas,
        # an in-memory shard (no log) reports term 0; a Raft group's leader a term >= 1
        "in_memory": all(r.get("term") == 0 for s in st.get("shards", [])
                         for r in s.get("replicas", [])),
        "chunk_bytes": client.chunk_bytes,
        "frame_bytes": client.frame_bytes,
        "mode": st.get("mode"),
        "optimizer": "sgd (default, lr 0.01)",
    }


def targets(dense: Sequence[DenseRow], latency: LatencyRow | None) -> list[dict[str, Any]]:
    """The issues' targets with the values reached in this run."""
    out: list[dict[str, Any]] = []
    for row in dense:
        if row.size_bytes >= TARGET_DENSE_MIN_BYTES:
            out.append(
                {
                    "name": f"dense {format_size(row.size_bytes)} {row.transport} "
                    "pserver/echo (best)",
                    "value": row.ratio_best,
                    "target": f">= {TARGET_DENSE_RATIO}",
                    "met": row.ratio_best >= TARGET_DENSE_RATIO,
                }
            )
    by = {(r.size_bytes, r.transport): r for r in dense}
    for size in sorted({r.size_bytes for r in dense}):
        tcp, ipc = by.get((size, "tcp")), by.get((size, "ipc"))
        if size >= 64 * MiB and tcp and ipc:
            out.append(
                {
                    "name": f"dense {format_size(size)} ipc faster than tcp (best GB/s)",
                    "value": ipc.pserver_best_gbps / tcp.pserver_best_gbps,
                    "target": "> 1",
                    "met": ipc.pserver_best_gbps > tcp.pserver_best_gbps,
                }
            )
    if latency is not None:
        out.append(
            {
                "name": f"{format_size(latency.size_bytes)} round trip p50 "
                f"pserver/echo ({latency.transport})",
                "value": latency.ratio_p50,
                "target": f"<= {TARGET_LATENCY_RATIO}",
                "met": latency.ratio_p50 <= TARGET_LATENCY_RATIO,
            }
        )
    return out


# -- the whole run -----------------------------------------------------------------------


@dataclass
class RunInfo:
    """How the run was invoked (for the report's provenance fields)."""

    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    self_started: bool = False


def run(
    address: str, settings: Settings, info: RunInfo | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Every scenario against the cluster at ``address``; the JSON-ready report."""
    info = info or RunInfo()
    started = time.monotonic()
    notes: list[str] = []
    report: dict[str, Any] = {
        "schema": 1,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["pserver", *info.argv[1:]]),
        "argv": info.argv,
        "git": git_commit(),
        "machine": machine_info(),
    }
    report["git_commit"] = report["git"]["commit"]
    membw = memory_bandwidth(settings.membw_bytes, settings.membw_repeats) / GB
    if progress is not None:
        progress("memory bandwidth")
    with open_pairs(address, settings.transports, notes) as pairs:
        if not pairs:
            raise RuntimeError("no transport could reach the cluster: " + "; ".join(notes))
        first = next(iter(pairs.values()))
        report["cluster"] = cluster_settings(first.client, address, info.self_started)
        report["settings"] = {
            **asdict(settings),
            "latency_block": LATENCY_BLOCK,
            "latency_bytes": LATENCY_BYTES,
        }
        dense = dense_throughput(pairs, settings, progress)
        lat = [small_latency(p, settings, progress) for p in pairs.values()]
    # what pserver.connect(address) picks by default: ipc on the same host
    default = next((r for r in lat if r.transport == "ipc"), lat[0] if lat else None)
    report.update(
        {
            "units": {
                "size": "bytes",
                "throughput": "GB/s = 1e9 bytes/s, pushed + pulled bytes",
                "latency": "microseconds",
                "memory_bandwidth": "GB/s counting 3N for a += b",
            },
            "dense": [asdict(r) for r in dense],
            "latency": asdict(default) if default else None,
            "latency_by_transport": [asdict(r) for r in lat],
            "memory_bandwidth_gbps": membw,
            "memory_bandwidth_bytes": settings.membw_bytes,
            "targets": targets(dense, default),
            "notes": notes,
            "duration_s": round(time.monotonic() - started, 2),
        }
    )
    return report


# -- formatting -----------------------------------------------------------------------------


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    """``4K``, ``64KiB``, ``1M``, ``16MiB``, ``1G`` (binary) or a byte count."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": KiB, "M": MiB, "G": 1 << 30}.get(t[-1:] if t else "", 1)
    number = t[:-1] if scale != 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4K, 1M, 64MiB)") from None
    if value < 4:
        raise ValueError(f"size {text!r} is below one float32")
    return int(value) // 4 * 4


def format_table(report: dict[str, Any]) -> str:
    """The report as readable text."""
    m, c = report["machine"], report["cluster"]
    git = report["git"]
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"pserver bench  {report['started_at']}  commit {commit}",
        f"machine: {m['cpu_count']} CPUs {m['processor']}; {m['platform']}; "
        f"python {m['python']}, numpy {m['numpy']}, pyzmq {m['pyzmq']} (libzmq {m['libzmq']}); "
        f"load {m['loadavg_1m']}",
        f"cluster: {c['address']}{' (self-started)' if c['self_started'] else ''}  "
        f"shards {c['shards']}  replicas {c['replicas']}  chunk {format_size(c['chunk_bytes'])}"
        f"  frame {format_size(c['frame_bytes'])}",
        f"command: {report['command']}",
        "",
        "Dense push_pull (float32, 1 worker) vs raw pyzmq DEALER/ROUTER echo, same chunking, "
        f"{report['settings']['window']} chunks in flight",
        "GB/s = (pushed + pulled bytes) / s; best and median of "
        f"{report['settings']['rounds']} interleaved rounds",
        f"{'size':>8} {'transport':>9} | {'pserver best':>12} {'median':>7} {'ms':>8} | "
        f"{'echo best':>9} {'median':>7} {'ms':>8} | {'ratio best':>10} {'median':>7}",
    ]
    for r in report["dense"]:
        lines.append(
            f"{format_size(r['size_bytes']):>8} {r['transport']:>9} | "
            f"{r['pserver_best_gbps']:>12.3f} {r['pserver_median_gbps']:>7.3f} "
            f"{r['pserver_best_ms']:>8.2f} | {r['echo_best_gbps']:>9.3f} "
            f"{r['echo_median_gbps']:>7.3f} {r['echo_best_ms']:>8.2f} | "
            f"{r['ratio_best']:>10.2f} {r['ratio_median']:>7.2f}"
        )
    lines += [
        "",
        f"Small-request latency: lockstep {format_size(LATENCY_BYTES)} push_pull vs raw "
        "DEALER/ROUTER round trip, µs",
        f"{'transport':>9} {'count':>6} | {'pserver p50':>11} {'p99':>8} {'p99.9':>8} | "
        f"{'echo p50':>8} {'p99':>8} {'p99.9':>8} | {'ratio p50':>9}",
    ]
    for r in report["latency_by_transport"]:
        lines.append(
            f"{r['transport']:>9} {r['count']:>6} | {r['pserver_p50_us']:>11.1f} "
            f"{r['pserver_p99_us']:>8.1f} {r['pserver_p999_us']:>8.1f} | "
            f"{r['echo_p50_us']:>8.1f} {r['echo_p99_us']:>8.1f} {r['echo_p999_us']:>8.1f} | "
            f"{r['ratio_p50']:>9.2f}"
        )
    lines += [
        "",
        f"Memory limit: numpy a += b "
        f"({format_size(report['memory_bandwidth_bytes'])} float32, best, 3N counted): "
        f"{report['memory_bandwidth_gbps']:.1f} GB/s",
        "",
        "Targets:",
    ]
    for t in report["targets"]:
        lines.append(
            f"  [{'met ' if t['met'] else 'MISS'}] {t['name']}: {t['value']:.2f} "
            f"(target {t['target']})"
        )
    for n in report["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"({report['duration_s']:.1f} s)")
    return "\n".join(lines)
