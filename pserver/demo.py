"""``make demo``: train a real model through a replicated cluster and kill a leader.

Starts ``pserver serve --shards 4 --replicas 3 --mode sync --workers 2`` as a
child process, then two worker processes train a two-layer MLP (numpy forward
and backward) on scikit-learn's handwritten digits, each on its half of every
batch: they push gradients and pull the parameters the server's momentum SGD
computed from the mean gradient. Half way through, the demo kills the leader of
the shard that holds the first layer with SIGKILL and training goes on once a
new leader is elected. Prints a progress bar, the failover time (the longest
step after the kill, and when the new leader was seen), the throughput and the
test accuracy, then stops the cluster with SIGTERM.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

import pserver
from pserver.supervisor import await_ready

EPOCHS = 6
BATCH = 64  # per step, split over the workers
HIDDEN = 512
WORKERS = 2
OPTIMIZER = {"name": "momentum", "lr": 0.05, "momentum": 0.9}


def load_digits_split() -> tuple[np.ndarray[Any, Any], ...]:
    """Digits (from the scikit-learn wheel), scaled to [0, 1]; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def init_params(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(1 / HIDDEN)).astype(
            np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray[Any, Any]], x: np.ndarray[Any, Any]) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    h = np.maximum(x @ p["fc1.weight"] + p["fc1.bias"], 0)
    return h, h @ p["fc2.weight"] + p["fc2.bias"]


def gradients(p: dict[str, np.ndarray[Any, Any]], x: np.ndarray[Any, Any],
              y: np.ndarray[Any, Any]) -> tuple[float, dict[str, np.ndarray[Any, Any]]]:
    """Softmax cross-entropy loss of the batch and its gradient for every parameter."""
    h, logits = forward(p, x)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = float(-np.log(prob[np.arange(len(y)), y] + 1e-12).mean())
    d = prob
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    dh = (d @ p["fc2.weight"].T) * (h > 0)
    return loss, {
        "fc1.weight": (x.T @ dh).astype(np.float32), "fc1.bias": dh.sum(0).astype(np.float32),
        "fc2.weight": (h.T @ d).astype(np.float32), "fc2.bias": d.sum(0).astype(np.float32),
    }


def steps_per_epoch(n: int) -> int:
    return n // BATCH


def worker(address: str, rank: int, progress: Any) -> None:
    """One training process: its half of every batch, synchronous steps."""
    xtr, ytr, _, _ = load_digits_split()
    with pserver.connect(address, worker_id=rank, num_workers=WORKERS, timeout=60) as client:
        if rank == 0:
            client.init(init_params(), optimizer=OPTIMIZER)
        client.barrier()  # every worker starts from the values rank 0 created
        params = client.pull(list(init_params()))
        rng = np.random.default_rng(1)  # the same batch order on every worker
        per = BATCH // WORKERS
        for _ in range(EPOCHS):
            order = rng.permutation(len(xtr))
            for s in range(steps_per_epoch(len(xtr))):
                idx = order[s * BATCH + rank * per: s * BATCH + (rank + 1) * per]
                loss, grads = gradients(params, xtr[idx], ytr[idx])
                params = client.push_pull(grads)
                progress.put((rank, loss, time.time()))
        client.barrier()
    progress.put((rank, None, time.time()))


def start_cluster(data_dir: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pserver", "--log-level", "warning", "serve", "--shards", "4",
         "--replicas", "3", "--mode", "sync", "--workers", str(WORKERS), "--port", "0",
         "--data-dir", data_dir],
        stdout=subprocess.PIPE, text=True)
    try:
        return proc, await_ready(proc)
    except (TimeoutError, RuntimeError) as exc:
        proc.kill()
        raise SystemExit(f"the cluster did not start: {exc}") from None


def leader_of_key(address: str, key: str) -> dict[str, Any]:
    with pserver.connect(address) as c:
        shard = c.shard_map.shard_for(key, 0)
        st = c.status()
    lead: dict[str, Any] = next(r for r in st["shards"][shard]["replicas"]
                                if r["role"] == "leader")
    return lead | {"shard": shard}


def main() -> None:
    data_dir = tempfile.mkdtemp(prefix="pserver-demo-")
    proc, address = start_cluster(data_dir)
    print(f"cluster of 4 shards x 3 replicas ready at {address} (sync, {WORKERS} workers)")
    xtr, _ytr, xte, yte = load_digits_split()
    total = EPOCHS * steps_per_epoch(len(xtr))
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(address, r, progress)) for r in range(WORKERS)]
    killed_at: float | None = None
    killed: dict[str, Any] = {}
    step_end: list[float] = []
    losses: list[float] = []
    done = 0
    try:
        for p in procs:
            p.start()
        counts = [0] * WORKERS
        with tqdm(total=total, desc="training (digits MLP)", unit="step") as bar:
            while done < WORKERS:
                rank, loss, when = progress.get(timeout=180)
                if loss is None:
                    done += 1
                    continue
                counts[rank] += 1
                if rank == 0:
                    losses.append(loss)
                if min(counts) > len(step_end):
                    step_end.append(when)
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
                    if len(step_end) == total // 2 and killed_at is None:
                        killed = leader_of_key(address, "fc1.weight")
                        os.kill(killed["pid"], signal.SIGKILL)
                        killed_at = time.time()
                        bar.write(f"SIGKILL to the leader of shard {killed['shard']} "
                                  f"(replica {killed['id']}, pid {killed['pid']}) at step "
                                  f"{len(step_end)}")
        for p in procs:
            p.join(60)
        with pserver.connect(address) as client:
            params = client.pull(list(init_params()))
            status = client.status()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    _, logits = forward(params, xte)
    accuracy = float((logits.argmax(1) == yte).mean())
    gaps = np.diff(np.array(step_end))
    after = [g for t, g in zip(step_end[1:], gaps, strict=True)
             if killed_at is not None and t >= killed_at]
    failover = max(after[:5]) if after else float("nan")
    span = step_end[-1] - step_end[0]
    nbytes = sum(v.nbytes for v in init_params().values())
    shard = status["shards"][killed["shard"]] if killed else None
    print("\nsummary")
    rows = [
        ("model", f"MLP 64-{HIDDEN}-10, {nbytes / 2**20:.2f} MiB, momentum SGD on the server"),
        ("data", f"digits: {len(xtr)} train / {len(xte)} test images"),
        ("steps", f"{len(step_end)} synchronous steps of {BATCH} images, {WORKERS} workers"),
        ("test accuracy", f"{accuracy * 100:.1f} %"),
        ("failover", f"longest step after the kill {failover * 1e3:.0f} ms "
                     f"(median step {np.median(gaps) * 1e3:.1f} ms)"),
        ("throughput", f"{len(step_end) * BATCH / span:.0f} images/s, "
                       f"{len(step_end) * nbytes * 2 * WORKERS / span / 1e6:.0f} MB/s pushed + "
                       "pulled"),
    ]
    if shard is not None:
        roles = ", ".join(f"{r['id']}:{r['role']}(term {r['term']})" for r in shard["replicas"])
        rows.append((f"shard {killed['shard']} now", roles))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"cluster stopped (exit code {proc.returncode})")


if __name__ == "__main__":
    main()
