"""Worker processes for the multi-worker benchmarks.

Owns ``WorkerPool``: up to W ``spawn``-ed processes started once per benchmark
run and reused by every multi-worker scenario (each task names the ranks it
runs on), and the task functions those processes run:

- ``sync_task``: ``push_pull`` of a model in ``sync`` mode, step after step, timing
  each step (rank 0 creates the keys; every worker then waits on ``barrier``).
- ``async_task``: ``push_pull`` of one shared key in ``async`` mode for a number
  of steps after a common start (the pool's start event), for aggregate
  throughput.
- ``gloo_task``: ``torch.distributed`` gloo ``all_reduce`` of the same tensors
  with the same number of processes (torch imported in the worker only).
- ``plain_task``: the plain single-process parameter server's client
  (``plainps.PlainClient``) pushing and pulling one key, for the many-workers
  comparison.

Each task returns a list of seconds (one per timed step) to the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

TASK_TIMEOUT = 600.0


def model_arrays(model_bytes: int, tensors: int, prefix: str) -> dict[str, Array]:
    """``tensors`` float32 tensors of ``model_bytes`` in total (equal parts)."""
    n = max(1, model_bytes // 4 // tensors)
    return {f"{prefix}/t{i}": np.zeros(n, np.float32) for i in range(tensors)}


def sync_task(address: str, rank: int, workers: int, prefix: str, model_bytes: int,
              tensors: int, steps: int, warmup: int, ipc: bool,
              compression: str | None) -> list[float]:
    """Seconds per synchronous step (one ``push_pull_into`` of the whole model)."""
    import pserver

    model = model_arrays(model_bytes, tensors, prefix)
    grads = {k: np.full_like(v, 1e-3) for k, v in model.items()}
    out = {k: np.empty_like(v) for k, v in model.items()}
    with pserver.connect(address, worker_id=rank, num_workers=workers, timeout=120,
                         ipc=ipc) as c:
        if rank == 0:
            c.init(model, optimizer={"name": "sgd", "lr": 0.01}, mode="sync",
                   compression=compression)
        c.barrier()
        times: list[float] = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            c.push_pull_into(grads, out)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        c.barrier()  # nobody leaves while another still needs the step quorum
    return times


def async_task(address: str, rank: int, workers: int, key: str, size: int, steps: int,
               start: Any) -> list[float]:
    """One entry: the seconds ``steps`` ``push_pull`` calls took after the start."""
    import pserver

    grad = np.full(max(1, size // 4), 1e-3, np.float32)
    out = np.empty_like(grad)
    with pserver.connect(address, worker_id=rank, num_workers=workers, timeout=120) as c:
        c.init({key: grad}, mode="async")
        c.push_pull_into({key: grad}, {key: out})  # warm-up: connections, first apply
        if not start.wait(TASK_TIMEOUT):
            raise TimeoutError("the common start never came")
        t0 = time.perf_counter()
        for _ in range(steps):
            c.push_pull_into({key: grad}, {key: out})
        return [time.perf_counter() - t0]


def plain_task(endpoint: str, rank: int, workers: int, key: str, size: int, steps: int,
               start: Any) -> list[float]:
    """``async_task`` against the plain single-process parameter server."""
    from .plainps import PlainClient

    grad = np.full(max(1, size // 4), 1e-3, np.float32)
    out = np.empty_like(grad)
    with PlainClient(endpoint) as c:
        c.init(key, grad)
        c.push_pull(key, grad, out)
        if not start.wait(TASK_TIMEOUT):
            raise TimeoutError("the common start never came")
        t0 = time.perf_counter()
        for _ in range(steps):
            c.push_pull(key, grad, out)
        return [time.perf_counter() - t0]


def gloo_task(port: int, rank: int, workers: int, model_bytes: int, tensors: int,
              steps: int, warmup: int) -> list[float]:
    """Seconds per step of gloo ``all_reduce`` (sum, then / W: the mean gradient) of
    every tensor of the model, as data-parallel training without a server does."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=workers)
    try:
        ts = [torch.full((max(1, model_bytes // 4 // tensors),), 1e-3) for _ in range(tensors)]
        times: list[float] = []
        for i in range(warmup + steps):
            dist.barrier()
            t0 = time.perf_counter()
            for t in ts:
                dist.all_reduce(t)
                t.div_(workers)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times
    finally:
        dist.destroy_process_group()


TASKS: dict[str, Callable[..., list[float]]] = {
    "sync": sync_task, "async": async_task, "gloo": gloo_task, "plain": plain_task,
}


@dataclass
class _Start:
    """What a task waits on for the common start: says it is ready, then waits."""

    rank: int
    results: Any
    event: Any

    def wait(self, timeout: float) -> bool:
        self.results.put((self.rank, None, "ready"))
        return bool(self.event.wait(timeout))


def _worker_main(rank: int, tasks: Any, results: Any, start: Any) -> None:
    """Run tasks until ``None``; each result is (rank, ok, value), and a task with a
    common start first sends (rank, None, "ready")."""
    while True:
        item = tasks.get()
        if item is None:
            return
        name, kwargs = item
        if name in ("async", "plain"):
            kwargs = {**kwargs, "start": _Start(rank, results, start)}
        try:
            results.put((rank, True, TASKS[name](rank=rank, **kwargs)))
        except BaseException as exc:  # reported to the parent, which raises
            results.put((rank, False, f"{type(exc).__name__}: {exc}\n"
                                      f"{traceback.format_exc(limit=5)}"))


@dataclass
class WorkerPool:
    """``size`` spawned worker processes; ``run`` gives a task to ranks 0..ranks-1."""

    size: int

    def __post_init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.size)]
        self._results: Any = ctx.Queue()
        self._start: Any = ctx.Event()
        env = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # gloo workers: no thread pools fighting
        try:
            self._procs = [ctx.Process(target=_worker_main, daemon=True,
                                       args=(r, self._tasks[r], self._results, self._start))
                           for r in range(self.size)]
            for p in self._procs:
                p.start()
        finally:
            if env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env

    def run(self, name: str, ranks: int, timeout: float = TASK_TIMEOUT,
            **kwargs: Any) -> list[list[float]]:
        """Run task ``name`` on ranks ``0..ranks-1``; their results by rank.
        Tasks with a common start (async, plain) begin timing together: the start
        event is set once every rank has said it is ready."""
        if not 1 <= ranks <= self.size:
            raise ValueError(f"{ranks} workers asked of a pool of {self.size}")
        self._start.clear()
        for r in range(ranks):
            self._tasks[r].put((name, kwargs))
        return self._collect(ranks, timeout)

    def _collect(self, workers: int, timeout: float) -> list[list[float]]:
        deadline = time.monotonic() + timeout
        got: dict[int, list[float]] = {}
        ready: set[int] = set()
        errors: list[str] = []
        while len(got) + len(errors) < workers:
            left = deadline - time.monotonic()
            if left <= 0 or not all(p.is_alive() for p in self._procs):
                self.close()
                raise RuntimeError("benchmark workers stopped answering"
                                   + (": " + "; ".join(errors) if errors else ""))
            try:
                rank, ok, value = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if ok is None:
                ready.add(rank)
                if len(ready) == workers:
                    self._start.set()
            elif ok:
                got[rank] = value
            else:
                errors.append(f"worker {rank}: {value}")
                self._start.set()  # the others are not left waiting for it
        if errors:
            raise RuntimeError("benchmark worker failed: " + "; ".join(errors))
        return [got[r] for r in range(workers)]

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_times(per_rank: Sequence[list[float]]) -> list[float]:
    """Seconds per step of ranks that stepped together: a step ends for everyone when
    the slowest rank is done with it."""
    return [max(ts) for ts in zip(*per_rank, strict=True)]


def aggregate_gbps(per_worker: Sequence[list[float]], moved_per_worker: int) -> float:
    """Aggregate GB/s of workers that started together: all bytes / slowest time."""
    slowest = max(t[0] for t in per_worker)
    return len(per_worker) * moved_per_worker / slowest / 1e9
