"""Multi-worker benchmark scenarios: sync steps against gloo, scaling, the plain server.

Owns the scenarios that need several worker processes (``workers.WorkerPool``)
and clusters of their own (``LocalCluster``), each measured side by side with
its baseline in the same run:

- ``sync_section``: one synchronous training step of a model (default 64 MiB in
  4 float32 tensors, 2 workers, 4 shards) through pserver for R=1 and R=3, over
  tcp and ipc, with float32 and bfloat16 gradients on the wire; against
  ``torch.distributed`` gloo ``all_reduce`` of the same tensors with the same
  number of processes, and against the transport bound (the bytes all workers
  move, at the rate one raw echo stream reaches in the same chunking: on this
  2-core host the loopback is CPU-bound, so concurrent streams share that rate).
- ``replication_section``: issue 4's measure, the synchronous step of the same
  model by 4 workers over tcp on 4 shards of R=1 and of R=3, both keeping their
  logs as ``pserver serve`` does by default, and of R=1 in memory (no log) for
  reference; the configurations alternate round by round.
- ``scaling_section``: aggregate ``push_pull`` GB/s of 1, 2 and 4 workers on one
  16 MiB key in ``async`` mode, for 1, 2 and 4 shards (R=1), for the largest
  shard count with R=3, and for the plain single-process server
  (``plainps``): what many workers on one key reach.
- ``plain_section``: one worker, pserver against the plain server: ``push_pull``
  by tensor size, a model of many small keys, and 4 KiB round-trip latency.
- ``distributed_report`` runs them (and ``overlap.overlap_section``) as the
  ``--distributed`` part of ``pserver bench``.

Figures: milliseconds per step, GB/s = 1e9 bytes/s of pushed + pulled bytes.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pserver
from pserver.supervisor import free_ports

from .baselines import EchoServer
from .overlap import OverlapSettings, overlap_section, overlap_targets
from .plainps import PlainClient, PlainServer
from .scenarios import (
    KEY_PREFIX,
    LocalCluster,
    dense_tensor,
    percentiles_us,
    pserver_roundtrips,
    timed_calls,
)
from .workers import WorkerPool, aggregate_gbps, step_times

Progress = Callable[[str], None]
MiB = 1 << 20
KiB = 1 << 10

TARGET_SYNC_BOUND = 1.1  # tcp float32 step / transport bound
TARGET_SYNC_GLOO = 1.0  # ipc or bfloat16 step / gloo float32 all_reduce
TARGET_R3_R1 = 0.5  # R=3 steps/s / R=1 steps/s, both logged (issue 4)

# (replicas, logged) of the replication section; the target compares the logged ones
REPLICATION_CONFIGS: tuple[tuple[int, bool], ...] = ((1, True), (3, True), (1, False))

# (transport, wire dtype of gradients) measured per replica count
SYNC_VARIANTS: tuple[tuple[str, str | None], ...] = (
    ("tcp", None), ("ipc", None), ("tcp", "bfloat16"), ("ipc", "bfloat16"))


@dataclass(frozen=True)
class DistSettings:
    """What the multi-worker scenarios measure."""

    sync_model_bytes: int = 64 * MiB
    sync_tensors: int = 4
    sync_workers: int = 2
    sync_shards: int = 4
    sync_steps: int = 10
    sync_warmup: int = 2
    sync_replicas: tuple[int, ...] = (1, 3)
    sync_variants: tuple[tuple[str, str | None], ...] = SYNC_VARIANTS
    echo_rounds: int = 5
    replication_workers: int = 4  # issue 4: 4 workers, a 64 MiB model
    replication_rounds: int = 2   # each round runs every REPLICATION_CONFIGS cluster
    scaling_shards: tuple[int, ...] = (1, 2, 4)
    scaling_workers: tuple[int, ...] = (1, 2, 4)
    scaling_replicas: int = 3  # also measured at the largest shard count
    scaling_bytes: int = 16 * MiB
    scaling_steps: int = 10
    plain_sizes: tuple[int, ...] = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)
    plain_rounds: int = 5
    many_keys: int = 200
    many_key_bytes: int = 16 * KiB
    latency_count: int = 1000
    overlap: OverlapSettings = field(default_factory=OverlapSettings)
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> DistSettings:
        base: dict[str, Any] = {
            "sync_model_bytes": 16 * MiB, "sync_steps": 3, "sync_warmup": 1,
            "sync_replicas": (1,), "sync_variants": (("tcp", None), ("ipc", "bfloat16")),
            "echo_rounds": 3, "replication_rounds": 0,
            "scaling_shards": (1, 4), "scaling_workers": (1, 2),
            "scaling_replicas": 0, "scaling_bytes": 4 * MiB, "scaling_steps": 5,
            "plain_sizes": (4 * KiB, 1 * MiB, 16 * MiB), "plain_rounds": 3,
            "many_keys": 50, "latency_count": 300, "quick": True,
            "overlap": OverlapSettings.quick_settings(),
        }
        base.update(overrides)
        return cls(**base)

    def pool_size(self) -> int:
        return max(self.sync_workers, self.replication_workers, *self.scaling_workers)

    def steps(self) -> int:
        """Progress steps: one per measured configuration."""
        sync = len(self.sync_replicas) * len(self.sync_variants) + 2  # + gloo, echo
        sync += self.replication_rounds * len(REPLICATION_CONFIGS)
        clusters = len(self.scaling_shards) + (1 if self.scaling_replicas > 1 else 0) + 1
        plain = len(self.plain_sizes) + 2
        return sync + clusters * len(self.scaling_workers) + plain + self.overlap.rounds


# -- sync step ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncRow:
    """One synchronous step of the model by ``workers`` workers, in milliseconds."""

    replicas: int
    transport: str
    wire_dtype: str
    workers: int
    shards: int
    model_bytes: int
    step_ms_median: float
    step_ms_best: float
    bytes_moved: int  # by all workers in one step: gradients pushed + values pulled
    transport_bound_ms: float
    gloo_ms_median: float | None
    ratio_to_bound: float
    ratio_to_gloo: float | None


def _echo_ms(model_bytes: int, transport: str, rounds: int, scratch: str) -> float:
    """Best milliseconds of one raw echo stream of ``model_bytes`` each way."""
    endpoint = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{scratch}/sync-echo.sock"
    grad = dense_tensor(model_bytes)
    out = np.empty_like(grad)
    with EchoServer(endpoint) as echo:
        echo.round(grad, out=out)
        return min(echo.round(grad, out=out) for _ in range(rounds)) * 1e3


def gloo_ms(pool: WorkerPool, settings: DistSettings) -> list[float]:
    """Seconds per step of gloo all_reduce of the model, every step of every rank."""
    res = pool.run("gloo", settings.sync_workers, port=free_ports("127.0.0.1", 1)[0],
                   workers=settings.sync_workers, model_bytes=settings.sync_model_bytes,
                   tensors=settings.sync_tensors, steps=settings.sync_steps,
                   warmup=settings.sync_warmup)
    return step_times(res)


def sync_section(pool: WorkerPool, settings: DistSettings, notes: list[str],
                 progress: Progress | None = None) -> dict[str, Any]:
    s = settings
    tick = progress or (lambda _label: None)
    with tempfile.TemporaryDirectory(prefix="pserver-bench-sync-") as scratch:
        echo = {t: _echo_ms(s.sync_model_bytes, t, s.echo_rounds, scratch)
                for t in {v[0] for v in s.sync_variants}}
    tick("sync: echo")
    gloo: float | None = None
    if importlib.util.find_spec("torch") is None:
        notes.append("gloo all_reduce skipped: torch is not installed (pip install torch)")
    else:
        gloo = statistics.median(gloo_ms(pool, s)) * 1e3
    tick("sync: gloo")
    rows: list[SyncRow] = []
    for replicas in s.sync_replicas:
        extra = ("--workers", str(s.sync_workers))
        with LocalCluster.start(shards=s.sync_shards, replicas=replicas, extra=extra) as cluster:
            for transport, wire in s.sync_variants:
                prefix = f"{KEY_PREFIX}/sync-r{replicas}-{transport}-{wire or 'float32'}"
                res = pool.run("sync", s.sync_workers, address=cluster.address,
                               workers=s.sync_workers, prefix=prefix,
                               model_bytes=s.sync_model_bytes, tensors=s.sync_tensors,
                               steps=s.sync_steps, warmup=s.sync_warmup,
                               ipc=transport == "ipc", compression=wire)
                steps = [t * 1e3 for t in step_times(res)]
                push = s.sync_model_bytes // (2 if wire else 1)
                moved = s.sync_workers * (push + s.sync_model_bytes)
                bound = echo[transport] * moved / (2 * s.sync_model_bytes)
                med = statistics.median(steps)
                rows.append(SyncRow(
                    replicas=replicas, transport=transport, wire_dtype=wire or "float32",
                    workers=s.sync_workers, shards=s.sync_shards,
                    model_bytes=s.sync_model_bytes, step_ms_median=med,
                    step_ms_best=min(steps), bytes_moved=moved, transport_bound_ms=bound,
                    gloo_ms_median=gloo, ratio_to_bound=med / bound,
                    ratio_to_gloo=None if gloo is None else med / gloo))
                tick(f"sync R={replicas} {transport} {wire or 'float32'}")
    return {"rows": [asdict(r) for r in rows], "echo_ms": echo, "gloo_ms_median": gloo,
            "workers": s.sync_workers, "model_bytes": s.sync_model_bytes,
            "tensors": s.sync_tensors, "steps": s.sync_steps}


def sync_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in section["rows"]:
        name = (f"sync step {r['model_bytes'] >> 20} MiB, {r['workers']} workers, "
                f"R={r['replicas']} {r['transport']} {r['wire_dtype']}")
        if r["transport"] == "tcp" and r["wire_dtype"] == "float32":
            out.append({"name": name + " / transport bound", "value": r["ratio_to_bound"],
                        "target": f"<= {TARGET_SYNC_BOUND}",
                        "met": r["ratio_to_bound"] <= TARGET_SYNC_BOUND})
        elif r["ratio_to_gloo"] is not None:
            out.append({"name": name + " / gloo all_reduce float32",
                        "value": r["ratio_to_gloo"], "target": f"<= {TARGET_SYNC_GLOO}",
                        "met": r["ratio_to_gloo"] <= TARGET_SYNC_GLOO})
    return out


# -- replication (issue 4) ----------------------------------------------------------------


def replication_section(pool: WorkerPool, settings: DistSettings,
                        progress: Progress | None = None) -> dict[str, Any] | None:
    """Sync steps of the model by ``replication_workers`` workers (tcp, float32) on
    4-shard clusters of each ``REPLICATION_CONFIGS`` entry, a fresh cluster per
    configuration and round, the order reversed every other round; None when
    ``replication_rounds`` is 0. Each row also gives the bytes in the cluster's data
    dir after its last run (its logs: next to nothing in memory)."""
    s = settings
    if s.replication_rounds <= 0:
        return None
    tick = progress or (lambda _label: None)
    w = s.replication_workers
    times: dict[tuple[int, bool], list[float]] = {c: [] for c in REPLICATION_CONFIGS}
    disk: dict[tuple[int, bool], int] = {}
    for rnd in range(s.replication_rounds):
        order = REPLICATION_CONFIGS if rnd % 2 == 0 else REPLICATION_CONFIGS[::-1]
        for replicas, logged in order:
            label = f"R={replicas} {'logged' if logged else 'in memory'}"
            with LocalCluster.start(shards=s.sync_shards, replicas=replicas,
                                    extra=("--workers", str(w)),
                                    in_memory=not logged) as cluster:
                res = pool.run("sync", w, address=cluster.address, workers=w,
                               prefix=f"{KEY_PREFIX}/replication-r{replicas}-"
                                      f"{'log' if logged else 'mem'}-{rnd}",
                               model_bytes=s.sync_model_bytes, tensors=s.sync_tensors,
                               steps=s.sync_steps, warmup=s.sync_warmup, ipc=False,
                               compression=None)
                disk[(replicas, logged)] = _tree_bytes(cluster.workdir / "data")
            times[(replicas, logged)] += [t * 1e3 for t in step_times(res)]
            tick(f"replication {label}")
    rows = [{"replicas": r, "logged": logged, "steps": len(times[(r, logged)]),
             "step_ms_median": statistics.median(times[(r, logged)]),
             "step_ms_best": min(times[(r, logged)]),
             "data_dir_bytes": disk[(r, logged)]}
            for r, logged in REPLICATION_CONFIGS]
    med = {(r["replicas"], r["logged"]): r["step_ms_median"] for r in rows}
    return {"rows": rows, "workers": w, "shards": s.sync_shards,
            "model_bytes": s.sync_model_bytes, "tensors": s.sync_tensors,
            "transport": "tcp", "wire_dtype": "float32", "rounds": s.replication_rounds,
            "r3_over_r1_logged": med[(1, True)] / med[(3, True)],
            "r3_over_r1_in_memory": med[(1, False)] / med[(3, True)]}


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a cluster's data dir, read while it runs)."""
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # a file the cluster removed meanwhile
            pass
    return total


def replication_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """R=3 against R=1 in steps/s, both keeping their logs (the in-memory R=1 is
    reported in the section, not as a target)."""
    ratio = section["r3_over_r1_logged"]
    return [{"name": f"sync steps/s R=3 / R=1, {section['workers']} workers, "
                     f"{section['model_bytes'] >> 20} MiB, tcp float32 (both logged)",
             "value": ratio, "target": f">= {TARGET_R3_R1}", "met": ratio >= TARGET_R3_R1}]


# -- scaling ----------------------------------------------------------------------------


def _scaling_runs(pool: WorkerPool, settings: DistSettings, label: str, task: str,
                  target: str, tick: Progress) -> list[dict[str, Any]]:
    s = settings
    rows = []
    moved = 2 * s.scaling_bytes * s.scaling_steps
    for w in s.scaling_workers:
        key = f"{KEY_PREFIX}/scale-{label}-{w}"
        where: dict[str, Any] = ({"endpoint": target} if task == "plain"
                                 else {"address": target})
        res = pool.run(task, w, workers=w, key=key, size=s.scaling_bytes,
                       steps=s.scaling_steps, **where)
        rows.append({"label": label, "workers": w, "gbps": aggregate_gbps(res, moved)})
        tick(f"scaling {label} {w} workers")
    return rows


def scaling_section(pool: WorkerPool, settings: DistSettings,
                    progress: Progress | None = None) -> dict[str, Any]:
    s = settings
    tick = progress or (lambda _label: None)
    rows: list[dict[str, Any]] = []
    configs = [(n, 1) for n in s.scaling_shards]
    if s.scaling_replicas > 1:
        configs.append((max(s.scaling_shards), s.scaling_replicas))
    for shards, replicas in configs:
        with LocalCluster.start(shards=shards, replicas=replicas) as cluster:
            for row in _scaling_runs(pool, s, f"pserver {shards} shards R={replicas}", "async",
                                     cluster.address, tick):
                rows.append({**row, "shards": shards, "replicas": replicas})
    with PlainServer() as plain:
        for row in _scaling_runs(pool, s, "plain", "plain", plain.endpoint, tick):
            rows.append({**row, "shards": 1, "replicas": 1})
    return {"rows": rows, "size_bytes": s.scaling_bytes, "steps": s.scaling_steps}


def scaling_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """pserver (most shards, R=1) faster than the plain server at each worker count."""
    rows = section["rows"]
    r1 = [r for r in rows if r["replicas"] == 1 and r["label"] != "plain"]
    if not r1:
        return []
    most = max(r["shards"] for r in r1)
    plain = {r["workers"]: r["gbps"] for r in rows if r["label"] == "plain"}
    out = []
    for r in r1:
        if r["shards"] == most and r["workers"] in plain:
            out.append({"name": f"{r['workers']} workers async {most} shards / plain server",
                        "value": r["gbps"] / plain[r["workers"]], "target": "> 1",
                        "met": r["gbps"] > plain[r["workers"]]})
    return out


# -- one worker against the plain server ---------------------------------------------------


def _time(fn: Callable[[], object], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


def plain_section(address: str, settings: DistSettings,
                  progress: Progress | None = None) -> dict[str, Any]:
    """pserver over tcp against the plain server, one worker, interleaved rounds."""
    s = settings
    tick = progress or (lambda _label: None)
    sizes: list[dict[str, Any]] = []
    with pserver.connect(address, ipc=False, timeout=60) as c, PlainServer() as srv, \
            PlainClient(srv.endpoint) as p:
        for size in s.plain_sizes:
            grad = dense_tensor(size)
            out = np.empty_like(grad)
            key = f"{KEY_PREFIX}/plain-{size}"
            c.init({key: grad})
            p.init(key, grad)
            reps = max(1, min(200, (16 * MiB) // grad.nbytes))
            ps: list[float] = []
            pl: list[float] = []
            for r in range(s.plain_rounds + 1):
                a = _time(lambda: c.push_pull_into({key: grad}, {key: out}), reps)  # noqa: B023
                b = _time(lambda: p.push_pull(key, grad, out), reps)  # noqa: B023
                if r:
                    ps.append(a)
                    pl.append(b)
            moved = 2 * grad.nbytes * reps
            sizes.append({"size_bytes": grad.nbytes, "pserver_best_gbps": moved / min(ps) / 1e9,
                          "plain_best_gbps": moved / min(pl) / 1e9,
                          "ratio_best": min(pl) / min(ps)})
            tick(f"plain {grad.nbytes} B")
        model = {f"{KEY_PREFIX}/many/{i}": dense_tensor(s.many_key_bytes)
                 for i in range(s.many_keys)}
        outs = {k: np.empty_like(v) for k, v in model.items()}
        c.init(model)
        for k, v in model.items():
            p.init(k, v)

        def plain_model() -> None:
            for k, v in model.items():
                p.push_pull(k, v, outs[k])

        ps, pl = [], []
        for r in range(s.plain_rounds + 1):
            a = _time(lambda: c.push_pull_into(model, outs), 1)
            b = _time(plain_model, 1)
            if r:
                ps.append(a)
                pl.append(b)
        many = {"keys": s.many_keys, "key_bytes": s.many_key_bytes,
                "pserver_best_ms": min(ps) * 1e3, "plain_best_ms": min(pl) * 1e3,
                "ratio_best": min(pl) / min(ps)}
        tick("plain many keys")
        grad = dense_tensor(4 * KiB)
        out = np.empty_like(grad)
        key = f"{KEY_PREFIX}/plain-latency"
        c.init({key: grad})
        p.init(key, grad)
        ps_lat = pserver_roundtrips(c, key, grad, s.latency_count)
        pl_lat = timed_calls(lambda: p.push_pull(key, grad, out), s.latency_count)
        latency = {"pserver_p50_us": percentiles_us(ps_lat)[0],
                   "plain_p50_us": percentiles_us(pl_lat)[0]}
        tick("plain latency")
    return {"sizes": sizes, "many_keys": many, "latency_4k": latency, "transport": "tcp"}


def plain_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Faster than the plain server at every size (and for many keys)."""
    out = [{"name": f"push_pull {r['size_bytes']} B tcp: plain time / pserver time",
            "value": r["ratio_best"], "target": "> 1", "met": r["ratio_best"] > 1}
           for r in section["sizes"]]
    m = section["many_keys"]
    out.append({"name": f"{m['keys']} keys of {m['key_bytes']} B: plain time / pserver time",
                "value": m["ratio_best"], "target": "> 1", "met": m["ratio_best"] > 1})
    return out


DIST_SECTIONS = ("sync", "replication", "scaling", "plain", "overlap")


def empty_distributed() -> dict[str, Any]:
    """``distributed_report``'s result with no section run."""
    return {**dict.fromkeys(DIST_SECTIONS), "targets": []}


def distributed_report(address: str, settings: DistSettings, notes: list[str],
                       progress: Progress | None = None,
                       sections: Sequence[str] = DIST_SECTIONS) -> dict[str, Any]:
    """The multi-worker sections; ``address`` is the main run's cluster (plain, overlap)."""
    out = empty_distributed()
    with WorkerPool(settings.pool_size()) as pool:
        if "sync" in sections:
            out["sync"] = sync_section(pool, settings, notes, progress)
            out["targets"] += sync_targets(out["sync"])
        if "replication" in sections:
            out["replication"] = replication_section(pool, settings, progress)
            if out["replication"] is not None:
                out["targets"] += replication_targets(out["replication"])
        if "scaling" in sections:
            out["scaling"] = scaling_section(pool, settings, progress)
            out["targets"] += scaling_targets(out["scaling"])
    if "plain" in sections:
        out["plain"] = plain_section(address, settings, progress)
        out["targets"] += plain_targets(out["plain"])
    if "overlap" in sections:
        if importlib.util.find_spec("torch") is None:
            notes.append("torch overlap skipped: torch is not installed (pip install torch)")
        else:
            out["overlap"] = overlap_section(address, settings.overlap, progress)
            out["targets"] += overlap_targets(out["overlap"])
    return out


def format_distributed(report: dict[str, Any]) -> str:
    """The sync, replication, scaling, plain, overlap, optional-baseline and failover
    sections of ``report`` as text ('' if none)."""
    lines: list[str] = []
    sync = report.get("sync")
    if sync:
        gloo = sync["gloo_ms_median"]
        lines += [f"Sync step: {sync['workers']} workers, {sync['model_bytes'] >> 20} MiB model "
                  f"in {sync['tensors']} tensors, median of {sync['steps']} steps; gloo "
                  f"all_reduce float32: {'-' if gloo is None else f'{gloo:.1f}'} ms",
                  f"{'R':>2} {'transport':>9} {'wire':>8} | {'step ms':>8} {'best':>7} | "
                  f"{'bound ms':>8} {'/bound':>6} | {'/gloo':>6}"]
        for r in sync["rows"]:
            g = "-" if r["ratio_to_gloo"] is None else f"{r['ratio_to_gloo']:.2f}"
            lines.append(f"{r['replicas']:>2} {r['transport']:>9} {r['wire_dtype']:>8} | "
                         f"{r['step_ms_median']:>8.1f} {r['step_ms_best']:>7.1f} | "
                         f"{r['transport_bound_ms']:>8.1f} {r['ratio_to_bound']:>6.2f} | {g:>6}")
        lines.append("")
    repl = report.get("replication")
    if repl:
        lines.append(f"Replication: sync step, {repl['workers']} workers, "
                     f"{repl['model_bytes'] >> 20} MiB model, tcp float32, median of "
                     f"{repl['rounds']} rounds")
        for r in repl["rows"]:
            lines.append(f"  R={r['replicas']} {'logged' if r['logged'] else 'in memory':<9} "
                         f"{r['step_ms_median']:>8.1f} ms (best {r['step_ms_best']:.1f})")
        lines += [f"  R=3 / R=1 steps/s: {repl['r3_over_r1_logged']:.2f} (both logged), "
                  f"{repl['r3_over_r1_in_memory']:.2f} (R=1 in memory)", ""]
    scaling = report.get("scaling")
    if scaling:
        lines.append(f"Scaling: async push_pull of {scaling['size_bytes'] >> 20} MiB, "
                     "aggregate GB/s")
        for r in scaling["rows"]:
            lines.append(f"  {r['label']:<24} {r['workers']} workers: {r['gbps']:.3f}")
        lines.append("")
    plain = report.get("plain")
    if plain:
        lines.append("Plain single-process server vs pserver (tcp, one worker): plain time / "
                     "pserver time")
        for r in plain["sizes"]:
            lines.append(f"  {r['size_bytes']:>10} B: pserver {r['pserver_best_gbps']:.3f} GB/s,"
                         f" plain {r['plain_best_gbps']:.3f} GB/s, ratio {r['ratio_best']:.2f}")
        mk, lat = plain["many_keys"], plain["latency_4k"]
        lines += [f"  {mk['keys']} keys x {mk['key_bytes']} B: pserver {mk['pserver_best_ms']:.1f}"
                  f" ms, plain {mk['plain_best_ms']:.1f} ms, ratio {mk['ratio_best']:.2f}",
                  f"  4 KiB p50: pserver {lat['pserver_p50_us']:.0f} µs, plain "
                  f"{lat['plain_p50_us']:.0f} µs", ""]
    ov = report.get("overlap")
    if ov:
        lines += [f"PyTorch overlap: {ov['layers']} layers of {ov['width']}x{ov['width']}, batch "
                  f"{ov['batch']}: step {ov['step_ms_hooks']:.1f} ms with hooks, "
                  f"{ov['step_ms_no_hooks']:.1f} ms without (x{ov['speedup']:.2f}); compute "
                  f"alone {ov['compute_ms']:.1f} ms, push_pull alone {ov['comm_ms']:.1f} ms", ""]
    for name, x in (report.get("optional_baselines") or {}).items():
        if x.get("status") != "measured":
            lines.append(f"{name}: {x.get('status')}")
            continue
        lines.append(f"{name} {x.get('version', '')}: " + ", ".join(
            f"{r['size_bytes']} B {r['best_gbps']:.3f} GB/s" for r in x["rows"]))
    f = report.get("failover")
    if f:
        lines.append(f"Failover over {f['kills']} leader kills: p50 {f['p50_ms']:.0f} ms, p90 "
                     f"{f['p90_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms, max {f['max_ms']:.0f} ms")
    return "\n".join(lines).rstrip()
