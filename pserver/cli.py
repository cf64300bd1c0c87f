"""The ``pserver`` command line (click): serve, status, shard, bench.

The only module that configures logging. Logs go to stderr; stdout carries
only what a command promises to print (the ready line, status output).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from pserver.kernels import BackendUnavailable, Memory
from pserver.protocol.errors import PServerError
from pserver.protocol.schema import Limits
from pserver.protocol.shardmap import ShardMap

from .config import ConfigError, load_config
from .snapshot import SnapshotError

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )


@click.group()
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def main(log_level: str) -> None:
    """pserver: a sharded parameter server for distributed training."""
    _setup_logging(log_level)


@main.command()
@click.option("--shards", type=int, help="number of shards [1]")
@click.option("--replicas", type=int, help="replicas per shard [3]")
@click.option("--in-memory", "in_memory", is_flag=True, default=None,
              help="with --replicas 1: keep no log on disk (faster; the state survives a "
                   "clean stop, not a crash)")
@click.option("--host", help="address to bind [127.0.0.1]")
@click.option("--port", type=int, help="bootstrap port, 0 picks a free one [7000]")
@click.option("--data-dir", help="where replicas keep their state [./pserver-data]")
@click.option("--mode", type=click.Choice(["async", "sync", "ssp"]), help="default mode [async]")
@click.option("--workers", type=int, help="workers per synchronous step [1]")
@click.option("--staleness", type=int, help="ssp staleness bound [0]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="where tensors live [cpu]")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML file with settings (CLI > env PSERVER_* > file > defaults)",
)
@click.option("--chunk-bytes", type=int, help="tensors above this are cut into chunks [4 MiB]")
@click.option("--frame-bytes", type=int, help="bytes per ZeroMQ frame [1 MiB]")
@click.option(
    "--no-ipc",
    "no_ipc",
    is_flag=True,
    default=None,
    help="do not offer ipc:// endpoints to same-host clients",
)
@click.option("--max-request-bytes", type=int, help="largest accepted request [256 MiB]")
@click.option("--worker-timeout", type=float,
              help="seconds without a heartbeat before a worker leaves the step quorum [30]")
@click.option("--heartbeat-ms", type=int, help="Raft heartbeat interval of replicas [50]")
@click.option("--election-timeout-ms", type=int,
              help="replicas elect a new leader after 1x-2x this without one [300]")
@click.option("--snapshot-log-bytes", type=int,
              help="a replica compacts its log into a snapshot beyond 1x-1.5x this (each "
                   "replica at its own point) [256 MiB]")
@click.option("--restore", "restore_file", type=click.Path(exists=True, dir_okay=False),
              help="start with the keys of a file `pserver export` wrote")
def serve(config_file: str | None, no_ipc: bool | None, restore_file: str | None,
          **options: Any) -> None:
    """Run a cluster on this machine in the foreground."""
    stop_early: list[int] = []  # a SIGTERM/SIGINT before the supervisor exists
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_early.append(signum))
    from .supervisor import Stopping, Supervisor

    if no_ipc:
        options["ipc"] = False
    try:
        config = load_config(options, config_file=config_file)  # OSError: a ConfigError
        if config.device != "cpu":  # refused here once, not by every replica it would start
            Memory(config.device)
        sup = Supervisor(config)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except BackendUnavailable as exc:
        raise click.ClickException(f"--device {config.device}: {exc}") from None
    except OSError as exc:  # picking ports: an unknown host, or one not on this machine
        raise click.ClickException(f"cannot serve on host {config.host!r}: {exc}") from None
    sup.install_signal_handlers()
    if stop_early:
        sup.stop()
    failed: list[BaseException] = []
    try:
        sup.start()
        if restore_file is None:
            sup.announce()
        else:  # the bootstrap must be serving while the keys are loaded
            threading.Thread(target=_restore_then_announce, args=(sup, restore_file, failed),
                             daemon=True).start()
        sup.run()
    except Stopping:
        log.info("stopped during start-up")
    except (RuntimeError, PServerError, OSError) as exc:
        log.error("serve failed: %s", exc)
        sup.shutdown()
        sys.exit(1)
    sup.shutdown()
    if failed:
        sys.exit(1)
    log.info("stopped")


def _restore_then_announce(sup: Any, path: str, failed: list[BaseException]) -> None:
    from pserver.clients.client import connect

    from .export import read

    try:
        arrays = read(Path(path))
        with connect(sup.address, timeout=60.0) as client:
            held = list(client.keys())
            if held:  # init would keep their values, not the file's
                raise ValueError(
                    f"the data dir already holds {len(held)} keys ({', '.join(held[:3])}"
                    f"{', ...' if len(held) > 3 else ''}); --restore starts a cluster "
                    "from the file alone: give it a fresh --data-dir")
            client.init(arrays)
        log.info("restored %d keys from %s", len(arrays), path)
        sup.announce()
    except Exception as exc:
        log.error("restore from %s failed: %s", path, exc)
        failed.append(exc)
        sup.stop()


@main.command()
@click.option("--address", default=None,
              help="bootstrap address [$PSERVER_ADDRESS or tcp://127.0.0.1:7000]")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "npz", "torch"]),
              default="safetensors", show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.argument("out", type=click.Path(dir_okay=False))
def export(address: str | None, fmt: str, timeout: float, out: str) -> None:
    """Write every dense key to OUT, loadable without pserver (same names and shapes)."""
    from pserver.clients.client import connect

    from .export import write

    address = address or os.environ.get("PSERVER_ADDRESS") or "tcp://127.0.0.1:7000"
    try:
        with connect(address, timeout=timeout) as client:
            keys = list(client.keys())
            arrays = client.pull(keys) if keys else {}
        write(arrays, Path(out), fmt)
    except (PServerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"exported {len(arrays)} keys to {out}")


@main.command()
@click.option("--shard-id", type=int, required=True)
@click.option("--num-shards", type=int, required=True)
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    required=True,
    help="tcp://HOST:PORT or ipc://PATH to bind (repeatable)",
)
@click.option("--parent-pid", type=int, default=None, help="exit when this process is gone")
@click.option("--frame-bytes", type=int, default=1 << 20, show_default=True)
@click.option("--chunk-bytes", type=int, default=4 << 20, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="where the shard keeps its tensors")
@click.option("--data-dir", default=None,
              help="where the shard saves its state on a clean stop and loads it at start")
@click.option("--mode", type=click.Choice(["async", "sync", "ssp"]), default="async",
              show_default=True, help="mode of keys whose init names none")
@click.option("--workers", type=int, default=1, show_default=True,
              help="workers per step of sync/ssp keys whose init names none")
@click.option("--staleness", type=int, default=0, show_default=True)
@click.option("--worker-timeout", type=float, default=30.0, show_default=True)
@click.option("--max-request-bytes", type=int, default=Limits.max_request_bytes, show_default=True)
@click.option("--max-keys", type=int, default=Limits.max_keys, show_default=True)
@click.option("--max-key-bytes", type=int, default=Limits.max_key_bytes, show_default=True)
@click.option("--replica-id", type=int, default=0, show_default=True,
              help="this replica's id within its shard (0-based)")
@click.option("--peer", "peer_list", multiple=True,
              help="ID=tcp://HOST:PORT of every replica of the shard, this one included "
                   "(repeatable); without it the shard runs unreplicated")
@click.option("--heartbeat-ms", type=int, default=50, show_default=True)
@click.option("--election-timeout-ms", type=int, default=300, show_default=True)
@click.option("--snapshot-log-bytes", type=int, default=256 << 20, show_default=True)
def shard(
    shard_id: int,
    num_shards: int,
    endpoints: tuple[str, ...],
    parent_pid: int | None,
    frame_bytes: int,
    chunk_bytes: int,
    device: str,
    data_dir: str | None,
    mode: str,
    workers: int,
    staleness: int,
    worker_timeout: float,
    max_request_bytes: int,
    max_keys: int,
    max_key_bytes: int,
    replica_id: int,
    peer_list: tuple[str, ...],
    heartbeat_ms: int,
    election_timeout_ms: int,
    snapshot_log_bytes: int,
) -> None:
    """Run one shard replica process (used by `serve`, or by hand across hosts).

    Prints one JSON line with the bound endpoints once it serves."""
    from pserver.protocol.allocator import keep_freed_buffers

    from .replica import ReplicaServer
    from .server import ShardServer
    from .supervisor import CLUSTER_TOKEN_ENV, EXIT_ADDRESS_IN_USE
    from .wal import WALError

    keep_freed_buffers()

    limits = Limits(
        max_request_bytes=max_request_bytes,
        max_keys=max_keys,
        max_key_bytes=max_key_bytes,
        max_frame_bytes=max(Limits.max_frame_bytes, frame_bytes),
    )
    common: dict[str, Any] = {
        "limits": limits, "frame_bytes": frame_bytes, "chunk_bytes": chunk_bytes,
        "parent_pid": parent_pid, "device": device, "default_mode": mode, "workers": workers,
        "staleness": staleness, "worker_timeout": worker_timeout,
    }
    try:
        server: ShardServer
        if peer_list:
            peers = _parse_peers(peer_list)
            if data_dir is None:
                raise click.ClickException("a replicated shard needs --data-dir")
            server = ReplicaServer(
                shard_id, ShardMap.uniform(num_shards), endpoints, replica_id=replica_id,
                peers=peers, data_dir=data_dir, heartbeat_s=heartbeat_ms / 1000,
                election_ticks=max(2, round(election_timeout_ms / heartbeat_ms)),
                snapshot_log_bytes=snapshot_log_bytes,
                cluster_token=os.environ.get(CLUSTER_TOKEN_ENV), **common)
        else:
            server = ShardServer(shard_id, ShardMap.uniform(num_shards), endpoints,
                                 data_dir=data_dir, **common)
    except (ValueError, WALError) as exc:
        raise click.ClickException(str(exc)) from None
    except BackendUnavailable as exc:
        raise click.ClickException(f"--device {device}: {exc}") from None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ADDRESS_IN_USE)
    except SnapshotError as exc:
        raise click.ClickException(f"cannot restore the shard's state: {exc}") from None
    server.install_signal_handlers()
    # A file-size limit (ulimit -f) makes a log write fail with EFBIG, handled as a
    # failed write (the replica stops), instead of killing the process unannounced.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    print(
        json.dumps({"shard": shard_id, "pid": os.getpid(), "endpoints": server.endpoints}),
        flush=True,
    )
    server.serve_forever()


def _parse_peers(items: tuple[str, ...]) -> dict[int, str]:
    peers: dict[int, str] = {}
    for item in items:
        rid, sep, addr = item.partition("=")
        if not sep or not rid.isdigit() or not addr.startswith("tcp://"):
            raise click.BadParameter(f"{item!r}: expected ID=tcp://HOST:PORT", param_hint="--peer")
        peers[int(rid)] = addr
    return peers


def _format_status(st: dict[str, Any]) -> str:
    lines = [
        f"cluster {st['address']}  epoch {st['epoch']}  mode {st['mode']}  "
        f"keys {st['keys']}  bytes {st['bytes']}"
    ]
    if st.get("workers"):
        lines.append("workers  " + "  ".join(f"{w} {state}" for w, state in st["workers"].items()))
    lines.append(
        f"{'shard':>5} {'replica':>7} {'role':<9} {'pid':>7} {'term':>5} "
        f"{'commit':>8} {'applied':>8} {'keys':>6} {'bytes':>12}  address"
    )
    for s in st["shards"]:
        for r in s["replicas"]:

            def cell(v: Any) -> str:
                return "-" if v is None else str(v)

            lines.append(
                f"{s['id']:>5} {r['id']:>7} {r['role']:<9} {cell(r['pid']):>7} "
                f"{cell(r['term']):>5} {cell(r['commit_index']):>8} "
                f"{cell(r['applied_index']):>8} {cell(s['keys']):>6} {cell(s['bytes']):>12}  "
                f"{r['address']}"
            )
    for s in st["shards"]:
        if s.get("digest_mismatch"):
            lines.append(f"ERROR: the replicas of shard {s['id']} hold different state at the "
                         "same applied index (see the digests in --json)")
    return "\n".join(lines)


@main.command()
@click.option(
    "--address", default=None, help="bootstrap address [$PSERVER_ADDRESS or tcp://127.0.0.1:7000]"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--timeout", type=float, default=5.0, show_default=True)
def status(address: str | None, as_json: bool, timeout: float) -> None:
    """Show the cluster: shards, replicas, roles, indices, keys and bytes."""
    from pserver.clients.client import cluster_status

    address = address or os.environ.get("PSERVER_ADDRESS") or "tcp://127.0.0.1:7000"
    try:
        st = cluster_status(address, timeout=timeout)
    except PServerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(st) if as_json else _format_status(st))


def _add_bench() -> None:
    from .benchmark.command import bench

    main.add_command(bench)


_add_bench()

if __name__ == "__main__":
    main()
