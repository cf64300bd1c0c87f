"""Unit tests for pserver.config.load_config: precedence and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pserver.config import ConfigError, ServerConfig, load_config
from pserver.protocol.frames import DEFAULT_CHUNK_BYTES, DEFAULT_FRAME_BYTES
from pserver.protocol.schema import Limits

NO_ENV: dict[str, str] = {}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pserver.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load_config(env=NO_ENV)
    assert cfg == ServerConfig()
    assert (cfg.shards, cfg.replicas, cfg.host, cfg.port) == (1, 3, "127.0.0.1", 7000)
    assert (cfg.data_dir, cfg.mode, cfg.device) == ("./pserver-data", "async", "cpu")
    assert (cfg.chunk_bytes, cfg.frame_bytes) == (DEFAULT_CHUNK_BYTES, DEFAULT_FRAME_BYTES)
    assert cfg.ipc is True
    assert cfg.limits == Limits()
    assert (cfg.heartbeat_ms, cfg.election_timeout_ms) == (50, 300)  # Raft timing (issue 4)


def test_process_environment_is_not_read_when_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSERVER_SHARDS", "9")
    assert load_config(env=NO_ENV).shards == 1
    assert load_config().shards == 9  # env=None reads os.environ


def test_toml_top_level_keys(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'shards = 4\nmode = "sync"\nworkers = 2\nhost = "0.0.0.0"\n'
                           "restart_backoff_max = 1.5\nipc = false\n")
    cfg = load_config(env=NO_ENV, config_file=path)
    assert (cfg.shards, cfg.mode, cfg.workers, cfg.host) == (4, "sync", 2, "0.0.0.0")
    assert cfg.restart_backoff_max == 1.5
    assert cfg.ipc is False
    assert cfg.port == 7000  # untouched settings keep their defaults


def test_toml_server_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[server]\nshards = 4\nport = 7100\ndata-dir = "/tmp/ps"\n')
    cfg = load_config(env=NO_ENV, config_file=str(path))
    assert (cfg.shards, cfg.port, cfg.data_dir) == (4, 7100, "/tmp/ps")


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "shards = 4\nport = 7100\n")
    cfg = load_config(env={"PSERVER_SHARDS": "6"}, config_file=path)
    assert cfg.shards == 6
    assert cfg.port == 7100  # the file still supplies what env does not


def test_cli_overrides_env_and_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "shards = 4\nport = 7100\nreplicas = 5\n")
    env = {"PSERVER_SHARDS": "6", "PSERVER_PORT": "7200"}
    cfg = load_config(cli={"shards": 8}, env=env, config_file=path)
    assert cfg.shards == 8  # cli
    assert cfg.port == 7200  # env
    assert cfg.replicas == 5  # file
    assert cfg.mode == "async"  # default


def test_cli_none_values_are_ignored() -> None:
    cfg = load_config(cli={"shards": None, "mode": None}, env={"PSERVER_SHARDS": "3"})
    assert cfg.shards == 3
    assert cfg.mode == "async"


@pytest.mark.parametrize(
    ("var", "value", "field", "expected"),
    [
        pytest.param("PSERVER_SHARDS", "5", "shards", 5, id="int"),
        pytest.param("PSERVER_MODE", "ssp", "mode", "ssp", id="str"),
        pytest.param("PSERVER_DATA_DIR", "/data", "data_dir", "/data", id="underscore-name"),
        pytest.param("PSERVER_RESTART_BACKOFF_MAX", "0.25", "restart_backoff_max", 0.25,
                     id="float"),
        pytest.param("PSERVER_IPC", "false", "ipc", False, id="bool-false"),
        pytest.param("PSERVER_IPC", "0", "ipc", False, id="bool-0"),
        pytest.param("PSERVER_IPC", "yes", "ipc", True, id="bool-yes"),
        pytest.param("PSERVER_DEVICE", "cuda", "device", "cuda", id="device"),
    ],
)
def test_env_values_are_coerced(var: str, value: str, field: str, expected: Any) -> None:
    assert getattr(load_config(env={var: value}), field) == expected


def test_cli_strings_are_coerced() -> None:
    cfg = load_config(cli={"port": "0", "shards": "2"}, env=NO_ENV)
    assert (cfg.port, cfg.shards) == (0, 2)


def test_limits_follow_settings() -> None:
    cfg = load_config(cli={"max_keys": 10, "max_key_bytes": 64, "max_request_bytes": 1 << 20,
                           "chunk_bytes": 1 << 20}, env=NO_ENV)
    assert (cfg.limits.max_keys, cfg.limits.max_key_bytes) == (10, 64)
    assert cfg.limits.max_request_bytes == 1 << 20


def test_a_request_cap_below_one_chunk_is_refused() -> None:
    """One chunk travels in one request, so a smaller cap could never carry it."""
    with pytest.raises(ConfigError, match="chunk_bytes"):
        load_config(cli={"max_request_bytes": 1000}, env=NO_ENV)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"PSERVER_SHARDS": "0"}, id="shards-0"),
        pytest.param({"PSERVER_SHARDS": "-2"}, id="shards-negative"),
        pytest.param({"PSERVER_REPLICAS": "0"}, id="replicas-0"),
        pytest.param({"PSERVER_MODE": "foo"}, id="mode-foo"),
        pytest.param({"PSERVER_DEVICE": "tpu"}, id="device-tpu"),
        pytest.param({"PSERVER_PORT": "70000"}, id="port-too-big"),
        pytest.param({"PSERVER_PORT": "-1"}, id="port-negative"),
        pytest.param({"PSERVER_WORKERS": "0"}, id="workers-0"),
        pytest.param({"PSERVER_STALENESS": "-1"}, id="staleness-negative"),
        pytest.param({"PSERVER_FRAME_BYTES": "100"}, id="frame-bytes-tiny"),
        pytest.param({"PSERVER_FRAME_BYTES": "8192", "PSERVER_CHUNK_BYTES": "4096"},
                     id="chunk-smaller-than-frame"),
        pytest.param({"PSERVER_SHARDS": "four"}, id="shards-not-a-number"),
        pytest.param({"PSERVER_PORT": "7000.5"}, id="port-not-an-int"),
        pytest.param({"PSERVER_RESTART_BACKOFF_MAX": "soon"}, id="float-not-a-number"),
        pytest.param({"PSERVER_IPC": "maybe"}, id="bool-unreadable"),
    ],
)
def test_bad_env_values_raise_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_config(env=env)


@pytest.mark.parametrize(
    "cli",
    [
        pytest.param({"shards": 0}, id="shards-0"),
        pytest.param({"mode": "foo"}, id="mode-foo"),
        pytest.param({"port": "abc"}, id="port-not-a-number"),
        pytest.param({"heartbeat_ms": 0}, id="heartbeat-0"),
        pytest.param({"heartbeat_ms": 100, "election_timeout_ms": 150},
                     id="election-below-two-heartbeats"),
    ],
)
def test_bad_cli_values_raise_config_error(cli: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_config(cli=cli, env=NO_ENV)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("shards = 0\n", id="shards-0"),
        pytest.param('mode = "foo"\n', id="mode-foo"),
        pytest.param("bogus = 1\n", id="unknown-key"),
        pytest.param("[server]\nbogus = 1\n", id="unknown-key-in-table"),
        pytest.param('port = "abc"\n', id="port-not-a-number"),
        pytest.param("shards = [1, 2]\n", id="shards-a-list"),
        pytest.param("shards = \n", id="not-toml"),
    ],
)
def test_bad_file_raises_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_config(env=NO_ENV, config_file=_toml(tmp_path, text))


def test_file_setting_is_never_silently_dropped(tmp_path: Path) -> None:
    """A file with top-level settings and a [server] table: each setting either takes
    effect or is reported; the top-level ``port`` must not vanish without a word."""
    path = _toml(tmp_path, "port = 7100\n[server]\nshards = 4\n")
    try:
        cfg = load_config(env=NO_ENV, config_file=path)
    except ConfigError:
        return
    assert cfg.shards == 4
    assert cfg.port == 7100


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(env=NO_ENV, config_file=tmp_path / "nope.toml")


def test_unknown_file_key_fails_even_when_env_sets_the_rest(tmp_path: Path) -> None:
    """A typo in the file ("shard" for "shards") is reported, not silently ignored."""
    path = _toml(tmp_path, "shards = 2\nshard = 3\n")
    with pytest.raises(ConfigError, match="shard"):
        load_config(env={"PSERVER_SHARDS": "4"}, config_file=path)


def test_config_is_frozen() -> None:
    cfg = load_config(env=NO_ENV)
    with pytest.raises(AttributeError):
        cfg.shards = 5  # type: ignore[misc]


def test_every_shard_keeps_a_log_unless_in_memory_with_one_replica() -> None:
    assert ServerConfig().logged
    assert ServerConfig(replicas=1).logged  # a Raft group of one: durable too
    assert not ServerConfig(replicas=1, in_memory=True).logged
    assert not load_config({"replicas": 1}, env={"PSERVER_IN_MEMORY": "1"}).logged
    with pytest.raises(ConfigError, match="in_memory needs replicas = 1"):
        ServerConfig(replicas=3, in_memory=True)
