"""Shared fixtures: a real cluster started with `pserver serve` on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from pserver.supervisor import await_ready

# The machines are shared and noisy, and numba compiles a kernel on its first call:
# a per-example deadline would fail tests for timing, which tests never assert.
settings.register_profile("pserver", deadline=None)
settings.load_profile("pserver")



@dataclass
class Cluster:
    """A `pserver serve` process and its bootstrap address."""

    proc: subprocess.Popen[str]
    address: str
    stderr_path: Path

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the supervisor stops its shards and removes its run directory);
        SIGKILL if that takes longer than ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_cluster(tmp_path: Path, *args: str, timeout: float = 60.0,
                  env: dict[str, str] | None = None) -> Cluster:
    """Run `pserver serve --port 0 ARGS` and wait (with a deadline) for its ready line.
    Without ``--replicas`` in ARGS the cluster is ``--replicas 1 --in-memory``."""
    err = tmp_path / f"serve-{time.monotonic_ns()}.stderr"
    one = [] if "--replicas" in args else ["--replicas", "1", "--in-memory"]
    cmd = [sys.executable, "-m", "pserver", "serve", "--port", "0", *one,
           "--data-dir", str(tmp_path / "data"), *args]
    with err.open("w") as err_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True,
                                env={**os.environ, **(env or {})})
    try:
        return Cluster(proc, await_ready(proc, timeout), err)
    except (TimeoutError, RuntimeError) as exc:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        raise type(exc)(f"{exc}:\n{err.read_text()}") from None


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[object]:
    """Start clusters on demand; every one is stopped at the end of the test."""
    started: list[Cluster] = []

    def factory(*args: str, **kw: object) -> Cluster:
        c = start_cluster(tmp_path, *args, **kw)  # type: ignore[arg-type]
        started.append(c)
        return c

    yield factory
    for c in started:
        c.stop()


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 4-shard cluster shared by the tests of one module."""
    c = start_cluster(tmp_path_factory.mktemp("cluster4"), "--shards", "4")
    yield c
    c.stop()
