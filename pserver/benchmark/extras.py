"""Optional baselines: Redis SET/GET and a Ray actor parameter server.

Owns the two extras of ``pserver bench`` that need software pserver does not depend
on. Each one runs where its parts are installed and is otherwise skipped with a
note saying what is missing:

- **Redis**: a ``redis-server`` started here on a free 127.0.0.1 port (no
  persistence), driven by the ``redis`` Python client: ``SET`` of a tensor's bytes
  then ``GET`` of them back, the bytes a push and a pull move. What a user who keeps
  parameters in Redis reaches.
- **Ray**: a Ray actor holding a dict of numpy arrays, ``push_pull`` applying
  ``value -= lr * grad`` and returning the value, called with ``ray.get`` from
  this process (``ray.init`` with 2 CPUs, no dashboard). What a user who writes a
  parameter server as a Ray actor reaches.

Both report best-of-rounds GB/s (pushed + pulled bytes) by tensor size, in the
same run as pserver's dense rows.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pserver.supervisor import free_ports

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
REDIS_MAX_BYTES = 512 << 20  # a Redis string holds at most 512 MB
LR = 0.01


def optional(section: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run an optional baseline; its failure is a note in the report, not the run's."""
    try:
        return section(*args)
    except Exception as exc:  # a third-party part failed: say so, measure the rest
        log.warning("optional baseline %s failed: %r", section.__name__, exc)
        return {"status": f"skipped: failed with {type(exc).__name__}: {exc}"}


def _rows(sizes: Sequence[int], rounds: int, once: Callable[[np.ndarray[Any, Any]], None],
          tick: Progress, label: str) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        grad = np.full(max(1, size // 4), 1e-3, np.float32)
        once(grad)  # warm-up (creates the key)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            once(grad)
            best = min(best, time.perf_counter() - t0)
        rows.append({"size_bytes": grad.nbytes, "best_ms": best * 1e3,
                     "best_gbps": 2 * grad.nbytes / best / 1e9})
        tick(f"{label} {grad.nbytes} B")
    return rows


def redis_section(sizes: Sequence[int], rounds: int,
                  progress: Progress | None = None) -> dict[str, Any]:
    """SET + GET of each size through a redis-server started here."""
    tick = progress or (lambda _label: None)
    server = shutil.which("redis-server")
    if server is None or importlib.util.find_spec("redis") is None:
        missing = "no redis-server on PATH" if server is None else "the redis module"
        return {"status": f"skipped: {missing} (apt install redis-server; pip install redis)"}
    import redis

    port = free_ports("127.0.0.1", 1)[0]
    workdir = tempfile.mkdtemp(prefix="pserver-bench-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", workdir, "--proto-max-bulk-len", str(REDIS_MAX_BYTES)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    return {"status": "skipped: redis-server did not start"}
                time.sleep(0.05)

        def once(grad: np.ndarray[Any, Any]) -> None:
            r.set("pserver-bench", grad.tobytes())
            back = r.get("pserver-bench")
            assert back is not None and len(back) == grad.nbytes

        usable = [s for s in sizes if s < REDIS_MAX_BYTES]
        rows = _rows(usable, rounds, once, tick, "redis")
        info = r.info("server")
        r.close()
        return {"status": "measured", "version": info.get("redis_version"), "rows": rows,
                "what": "SET of the bytes, then GET of them back (redis-py, one connection)"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def ray_section(sizes: Sequence[int], rounds: int,
                progress: Progress | None = None) -> dict[str, Any]:
    """push_pull of each size through a Ray actor parameter server."""
    tick = progress or (lambda _label: None)
    if importlib.util.find_spec("ray") is None:
        return {"status": "skipped: ray is not installed (pip install ray)"}
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    try:
        @ray.remote
        class ParameterServer:
            def __init__(self) -> None:
                self.values: dict[int, np.ndarray[Any, Any]] = {}

            def push_pull(self, grad: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
                value = self.values.get(grad.size)
                if value is None:
                    value = self.values[grad.size] = np.zeros_like(grad)
                value -= LR * grad
                return value

        ps = ParameterServer.remote()  # type: ignore[attr-defined]

        def once(grad: np.ndarray[Any, Any]) -> None:
            back = ray.get(ps.push_pull.remote(grad), timeout=120)
            assert back.nbytes == grad.nbytes

        rows = _rows(sizes, rounds, once, tick, "ray")
        return {"status": "measured", "version": ray.__version__, "rows": rows,
                "what": "ray.get(actor.push_pull.remote(grad)): value -= lr * grad, returned"}
    finally:
        ray.shutdown()
