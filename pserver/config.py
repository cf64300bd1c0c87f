"""Server configuration: one frozen dataclass, read once.

Owns every server setting, its default, its environment variable and its
TOML name. Precedence: command line > environment > config file > default.
Imports neither zmq nor kernels.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pserver.protocol.frames import DEFAULT_CHUNK_BYTES, DEFAULT_FRAME_BYTES
from pserver.protocol.schema import MAX_WORKERS, Limits

ENV_PREFIX = "PSERVER_"


class ConfigError(ValueError):
    """A setting has an invalid value or the config file cannot be read."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a cluster started by ``pserver serve`` (and of each shard)."""

    shards: int = 1
    replicas: int = 3
    # replicas=1 only: no log on disk (state survives clean stops, not crashes)
    in_memory: bool = False
    host: str = "127.0.0.1"
    port: int = 7000
    data_dir: str = "./pserver-data"
    mode: str = "async"
    workers: int = 1
    staleness: int = 0
    device: str = "cpu"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    frame_bytes: int = DEFAULT_FRAME_BYTES
    ipc: bool = True
    max_request_bytes: int = Limits.max_request_bytes
    max_keys: int = Limits.max_keys
    max_key_bytes: int = Limits.max_key_bytes
    restart_backoff_max: float = 5.0
    worker_timeout: float = 30.0  # seconds without a heartbeat before a worker is dropped
    heartbeat_ms: int = 50  # Raft heartbeat interval, the replicas' clock tick
    election_timeout_ms: int = 300  # a follower campaigns after 1x to 2x this without a leader
    snapshot_log_bytes: int = 256 << 20  # compact the log into a snapshot beyond this
    limits: Limits = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError("shards must be at least 1")
        if self.replicas < 1:
            raise ConfigError("replicas must be at least 1")
        if self.in_memory and self.replicas != 1:
            raise ConfigError("in_memory needs replicas = 1: replicas keep each other "
                              "identical through their logs")
        if not 0 <= self.port < 65536:
            raise ConfigError("port must be in [0, 65535]")
        if self.mode not in ("async", "sync", "ssp"):
            raise ConfigError(f"mode must be async, sync or ssp, not {self.mode!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, not {self.device!r}")
        if not 1 <= self.workers <= MAX_WORKERS or self.staleness < 0:
            raise ConfigError(f"workers must be in [1, {MAX_WORKERS}] and staleness >= 0")
        if self.heartbeat_ms < 1 or self.election_timeout_ms < 2 * self.heartbeat_ms:
            raise ConfigError("need heartbeat_ms >= 1 and election_timeout_ms >= 2 x heartbeat_ms")
        if self.frame_bytes < 4096 or self.chunk_bytes < self.frame_bytes:
            raise ConfigError("need frame_bytes >= 4096 and chunk_bytes >= frame_bytes")
        if self.max_request_bytes < self.chunk_bytes:
            raise ConfigError(
                f"max_request_bytes ({self.max_request_bytes}) must be at least chunk_bytes "
                f"({self.chunk_bytes}): one chunk travels in one request"
            )
        limits = Limits(
            max_request_bytes=self.max_request_bytes,
            max_keys=self.max_keys,
            max_key_bytes=self.max_key_bytes,
            max_frame_bytes=max(Limits.max_frame_bytes, self.frame_bytes),
        )
        object.__setattr__(self, "limits", limits)

    @property
    def logged(self) -> bool:
        """Whether each shard is a Raft group with a log on disk (every shard unless
        ``in_memory``, a group of one included)."""
        return not self.in_memory


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(ServerConfig) if f.init}


def _coerce(name: str, value: Any) -> Any:
    kind: Any = type(_fields()[name].default)
    if kind is int and (
        isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
    ):
        raise ConfigError(f"setting {name!r}: {value!r} is not an integer")
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {kind.__name__}") from None


def load_config(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServerConfig:
    """Merge the sources; ``cli`` holds only the options given on the command line
    (None values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        table = raw.pop("server", None)
        if table is not None:
            if raw or not isinstance(table, dict):
                raise ConfigError(
                    f"{config_file}: put settings either at the top level or under [server]"
                )
            raw = table
        for raw_name, value in raw.items():
            name = raw_name.replace("-", "_")
            if name not in _fields():
                raise ConfigError(f"unknown setting {name!r} in {config_file}")
            values[name] = _coerce(name, value)
    for name in _fields():
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var])
    for name, value in (cli or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return ServerConfig(**values)
