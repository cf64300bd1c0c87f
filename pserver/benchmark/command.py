"""The ``pserver bench`` click command.

Runs the scenarios of ``scenarios.py`` against a running cluster (``--address``)
or one it starts itself (``pserver serve --port 0``, stopped with SIGTERM at the
end), plus the kernel benchmarks of ``kernels.py`` (in this process, before the
cluster starts) and the sparse-table benchmark of ``sparse.py`` (against the same
cluster); prints a table (or ``--json``: one JSON object) on stdout, shows a
progress bar on stderr, and optionally writes the JSON report to ``--out``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pserver.protocol.errors import PServerError

from .distributed import (
    DIST_SECTIONS,
    DistSettings,
    distributed_report,
    empty_distributed,
    format_distributed,
)
from .extras import optional, ray_section, redis_section
from .failover import failover_section, failover_targets
from .kernels import KernelSettings, format_kernels, kernel_report
from .scenarios import TRANSPORTS, LocalCluster, RunInfo, Settings, format_table, parse_size, run
from .sparse import SparseSettings, format_sparse, sparse_report

ADDRESS_TIMEOUT_S = 10.0  # --address: the first status request's deadline


def _sizes(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = tuple(parse_size(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not sizes:
        raise click.BadParameter("no size given (e.g. 4K,1M)")
    return sizes


# the options of a run: --report-from runs nothing and takes none of them
RUN_OPTIONS = ("address", "shards", "replicas", "sizes", "rounds", "latency_count",
               "transports", "with_kernels", "with_sparse", "with_distributed", "with_extras",
               "failover_kills", "quick", "with_report", "results_dir", "as_json", "out")


def _check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` (and its parents) and write a scratch file in it, so that a
    run does not end in an error after minutes of measuring."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise click.ClickException(f"cannot write {what} in {path}: {exc.strerror or exc}"
                                   ) from None


def _check_writable_file(path: Path, what: str) -> None:
    _check_writable_dir(path.parent, what)
    existed = path.exists()
    try:
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise click.ClickException(f"cannot write {what} to {path}: {exc.strerror or exc}"
                                   ) from None


def _reachable(address: str) -> None:
    """Fail in seconds, in one line, when no cluster answers at ``address``."""
    from pserver.clients.client import cluster_status

    try:
        cluster_status(address, timeout=ADDRESS_TIMEOUT_S)
    except PServerError as exc:
        raise click.ClickException(f"cannot reach a cluster at {address}: {exc}") from None


@click.command()
@click.option(
    "--address",
    default=None,
    help="bootstrap address of a running cluster; without it one is started here",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="shards of the self-started cluster",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="replicas per shard of the self-started cluster",
)
@click.option(
    "--sizes",
    callback=_sizes,
    default=None,
    help="dense tensor sizes, comma-separated (e.g. 4K,64K,1M,16M,64M) "
    "[4K,64K,1M,16M,64M,256M; --quick: 4K,1M,64M]",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="interleaved rounds per size; best and median reported [10; --quick: 5]",
)
@click.option(
    "--latency-count",
    type=click.IntRange(min=1),
    default=None,
    help="4 KiB round trips timed per transport, after a warm-up [2000; --quick: 1000]",
)
@click.option(
    "--transport",
    "transports",
    multiple=True,
    type=click.Choice(TRANSPORTS),
    help="transports to measure (repeatable) [tcp and ipc]",
)
@click.option(
    "--kernels/--no-kernels",
    "with_kernels",
    default=True,
    show_default=True,
    help="kernels on 64 MiB float32 arrays against numpy a += b (the memory limit), "
    "and the row index against a dict loop [9 rounds; --quick: 3]",
)
@click.option(
    "--sparse/--no-sparse",
    "with_sparse",
    default=True,
    show_default=True,
    help="pull_rows/push_rows by batch and dim (1k, 10k, 100k rows; dim 16, 64, 256) of sum "
    "and adagrad tables against a raw echo of the same bytes, over tcp unless --transport "
    "says [7 rounds; --quick: 100k x 64, 3 rounds]",
)
@click.option(
    "--distributed/--no-distributed",
    "with_distributed",
    default=True,
    show_default=True,
    help="multi-worker scenarios in worker processes: sync step of a 64 MiB model with 2 "
    "workers (R=1 and R=3, tcp/ipc, float32/bfloat16) against gloo all_reduce and the "
    "transport bound; with 4 workers, R=3 against R=1 (both logged, and R=1 in memory; "
    "not with --quick); async scaling by shards (1, 2, 4), workers (1, 2, 4) and replicas; "
    "the plain single-process pyzmq server by size, many keys and latency",
)
@click.option(
    "--extras/--no-extras",
    "with_extras",
    default=True,
    show_default=True,
    help="optional baselines where installed, skipped with a note otherwise: Redis SET/GET "
    "of the same bytes (redis-server on PATH and the redis module) and a Ray actor "
    "parameter server (ray)",
)
@click.option(
    "--failover-kills",
    type=click.IntRange(min=0),
    default=None,
    help="SIGKILLs of a 3-replica shard leader under load, timed to the first push the new "
    "leader acknowledges; 0 skips [20; --quick: 3]",
)
@click.option("--quick", is_flag=True, help="fewer sizes and rounds: the whole run under 60 s")
@click.option(
    "--report",
    "with_report",
    is_flag=True,
    help="keep the JSON in --results-dir (unless --out names a file) and write "
    "--docs-dir/benchmarks.md with PNG plots from this run",
)
@click.option(
    "--report-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="write the markdown report and plots from this JSON file and run nothing",
)
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="where --report keeps the run's JSON",
)
@click.option(
    "--docs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs"),
    show_default=True,
    help="where --report writes benchmarks.md and img/bench-*.png",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write the JSON report to this file (e.g. bench/results/run.json)",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="progress bar on stderr [when stderr is a terminal]",
)
def bench(
    address: str | None,
    shards: int,
    replicas: int,
    sizes: tuple[int, ...] | None,
    rounds: int | None,
    latency_count: int | None,
    transports: tuple[str, ...],
    with_kernels: bool,
    with_sparse: bool,
    with_distributed: bool,
    with_extras: bool,
    failover_kills: int | None,
    quick: bool,
    with_report: bool,
    report_from: Path | None,
    results_dir: Path,
    docs_dir: Path,
    as_json: bool,
    out: Path | None,
    progress: bool | None,
) -> None:
    """Throughput and latency benchmark against a running or self-started cluster.

    Dense push_pull throughput by tensor size over tcp and ipc, interleaved round
    by round with a raw pyzmq DEALER/ROUTER echo of the same bytes in the same
    chunking (the transport limit); 4 KiB round-trip latency against a raw pyzmq
    round trip; numpy a += b bandwidth (the memory limit). With --kernels (the
    default): aggregate, adam (fused, numpy reference, torch when installed), sgd
    and adagrad on 64 MiB float32 against numpy a += b, and the row index against
    a Python dict loop. With --sparse (the default): pull_rows/push_rows of 100k
    rows of dim 64 (and other batches and dims) through the cluster against a raw
    echo of the same bytes.
    With --distributed (the default): the multi-worker scenarios (sync step
    against gloo, R=3 against R=1 with 4 workers, scaling, the plain server).
    --failover-kills: leader kills.
    --report: docs/benchmarks.md and plots from the run.
    """
    ctx = click.get_current_context()
    if report_from is not None:
        from .report import write_report

        flags = {p.name: "/".join(p.opts + p.secondary_opts) for p in ctx.command.params}
        given = [flags[n] for n in RUN_OPTIONS
                 if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise click.UsageError(f"--report-from runs nothing and takes only --docs-dir, "
                                   f"not {', '.join(given)}")
        _check_writable_dir(docs_dir / "img", "the report")
        try:
            saved = json.loads(report_from.read_text())
            paths = write_report(saved, docs_dir, str(report_from))
        except (ValueError, KeyError, TypeError) as exc:
            raise click.ClickException(f"{report_from} is not a pserver bench report: "
                                       f"{exc!r}") from None
        except OSError as exc:
            raise click.ClickException(f"cannot write the report: {exc}") from None
        for p in paths:
            click.echo(f"wrote {p}")
        return
    if out is not None:
        _check_writable_file(out, "the JSON report")
    if with_report:
        if out is None:
            _check_writable_dir(results_dir, "the JSON report")
        _check_writable_dir(docs_dir / "img", "the report")
    if address is not None:
        _reachable(address)
    t_start = time.monotonic()
    overrides: dict[str, Any] = {}
    if sizes:
        overrides["sizes"] = sizes
    if rounds is not None:
        overrides["rounds"] = rounds
    if latency_count is not None:
        overrides["latency_count"] = latency_count
    if transports:
        overrides["transports"] = tuple(dict.fromkeys(transports))
    settings = Settings.quick_settings(**overrides) if quick else Settings(**overrides)
    kset = KernelSettings.quick_settings() if quick else KernelSettings()
    sparse_over: dict[str, Any] = {"transports": overrides["transports"]} if transports else {}
    sset = (SparseSettings.quick_settings(**sparse_over) if quick
            else SparseSettings(**sparse_over))
    dset = DistSettings.quick_settings() if quick else DistSettings()
    kills = failover_kills if failover_kills is not None else (3 if quick else 20)

    from tqdm import tqdm

    bar = tqdm(
        total=settings.steps()
        + (kset.steps() if with_kernels else 0)
        + (sset.steps() if with_sparse else 0)
        + (dset.steps() if with_distributed else 0)
        + (2 * len(settings.sizes) if with_extras else 0)
        + kills,
        file=sys.stderr,
        unit="step",
        leave=False,
        dynamic_ncols=True,
        disable=None if progress is None else not progress,
    )

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update()

    cluster: LocalCluster | None = None
    kernels_section: dict[str, Any] | None = None
    sparse_section: dict[str, Any] | None = None
    dist = empty_distributed()
    failover: dict[str, Any] | None = None
    extras_section: dict[str, Any] = {}
    try:
        if with_kernels:  # first: no cluster processes competing for memory bandwidth
            try:
                kernels_section = kernel_report(kset, step)
            except (RuntimeError, ValueError, MemoryError) as exc:
                raise click.ClickException(f"kernel benchmark failed: {exc}") from None
        if address is None:
            bar.set_postfix_str(f"starting {shards} shards")
            try:
                cluster = LocalCluster.start(shards=shards, replicas=replicas)
            except RuntimeError as exc:
                raise click.ClickException(str(exc)) from None
            address = cluster.address
        try:
            report = run(address, settings, RunInfo(self_started=cluster is not None), step)
            if with_sparse:
                sparse_section = sparse_report(address, sset, step, report["notes"])
            if with_distributed:
                dist = distributed_report(address, dset, report["notes"], step)
        except (RuntimeError, OSError, TimeoutError, PServerError) as exc:
            raise click.ClickException(f"benchmark failed: {exc}") from None
        finally:
            if cluster is not None:  # stopped first: the later clusters get the CPUs
                code = cluster.stop()
                cluster = None
                if code not in (0, None):
                    click.echo(f"warning: the self-started cluster exited with {code}",
                               err=True)
        if with_extras:
            rounds_x = min(settings.rounds, 5)
            extras_section = {
                "Redis SET/GET": optional(redis_section, settings.sizes, rounds_x, step),
                "Ray actor parameter server": optional(ray_section, settings.sizes, rounds_x,
                                                       step),
            }
        if kills:
            try:
                failover = failover_section(kills, step)
            except (RuntimeError, OSError, TimeoutError, PServerError) as exc:
                raise click.ClickException(f"failover benchmark failed: {exc}") from None
    finally:
        bar.close()
        if cluster is not None:
            cluster.stop()

    add_sections(report, kernels_section, sparse_section)
    for name in DIST_SECTIONS:
        report[name] = dist[name]
    report["targets"].extend(dist["targets"])
    report["failover"] = failover
    if failover is not None:
        report["targets"].extend(failover_targets(failover))
    report["optional_baselines"] = extras_section
    report["duration_s"] = round(time.monotonic() - t_start, 2)
    text = json.dumps(report, indent=None if as_json else 2)
    if with_report and out is None:
        stamp = report["started_at"][:10]
        out = results_dir / f"{stamp}-{(report['git_commit'] or 'nogit')[:10]}.json"
    click.echo(text if as_json else format_report(report))  # first: never lost
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if with_report:
            from .report import write_report

            for p in write_report(report, docs_dir, str(out)):
                click.echo(f"wrote {p}", err=as_json)
    except OSError as exc:
        raise click.ClickException(f"cannot write the report: {exc}") from None


def add_sections(report: dict[str, Any], kernels_section: dict[str, Any] | None,
                 sparse_section: dict[str, Any] | None) -> None:
    """Put the ``kernels`` and ``sparse`` sections (None when not run) into the
    report, their targets into its ``targets`` and their notes into its ``notes``."""
    report["kernels"] = kernels_section
    report["sparse"] = sparse_section
    report["units"]["kernels"] = "GB/s = 1e9 bytes/s counting each kernel's `counted` bytes"
    report["units"]["sparse"] = "rows/s; GB/s = 1e9 bytes/s of ids + row data per call"
    for section, label in ((kernels_section, "kernels"), (sparse_section, None)):
        if section is None:
            continue
        report["targets"].extend(section["targets"])
        if label:  # the sparse notes went to the report's notes as they came
            report["notes"].extend(f"{label}: {n}" for n in section["notes"])


def format_report(report: dict[str, Any]) -> str:
    """``format_table``'s text with the kernel and sparse tables before the targets."""
    text = format_table(report)
    extra = [format_kernels(report["kernels"]) if report.get("kernels") else "",
             format_sparse(report["sparse"]) if report.get("sparse") else "",
             format_distributed(report)]
    extra = [e for e in extra if e]
    if not extra:
        return text
    marker = "\n\nTargets:\n"
    head, sep, tail = text.partition(marker)
    if not sep:
        return text + "\n\n" + "\n\n".join(extra)
    return head + "\n\n" + "\n\n".join(extra) + sep + tail
