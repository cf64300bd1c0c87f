"""Back-to-back pushes through a replicated cluster: the latency of each, over
compactions.

    .venv/bin/python bench/replicated_pushes.py [--pushes 150] [--size 16M]
                                                [--shards 4] [--replicas 3] [-- SERVE_ARGS]

Starts ``pserver serve --shards S --replicas R`` (extra arguments after ``--`` go to
``serve``, e.g. ``--snapshot-log-bytes 64M``; ``--replicas 1`` is a logged group of
one, ``--replicas 1 -- --in-memory`` the unlogged shard), runs ``push_pull_into`` of one
float32 key of ``--size`` bytes ``--pushes`` times, and prints every push's
milliseconds in rows of 15, then the median, p99, max and total. With 16 MiB pushes
over 4 shards each replica logs 4 MiB per push, so 150 pushes cross the default
256 MiB compaction point about twice.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pserver
from pserver.benchmark.scenarios import LocalCluster, parse_size


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pushes", type=int, default=150)
    ap.add_argument("--size", type=parse_size, default=16 << 20)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("serve_args", nargs="*")
    args = ap.parse_args()
    grad = np.full(args.size // 4, 1e-3, np.float32)
    out = np.empty_like(grad)
    with LocalCluster.start(shards=args.shards, replicas=args.replicas, in_memory=False,
                            extra=args.serve_args) as cluster, \
            pserver.connect(cluster.address, timeout=60) as client:
        client.init({"w": grad})
        ms = []
        for _ in range(args.pushes):
            t0 = time.perf_counter()
            client.push_pull_into({"w": grad}, {"w": out})
            ms.append((time.perf_counter() - t0) * 1e3)
    for i in range(0, len(ms), 15):
        print(f"{i:>4}: " + " ".join(f"{x:5.0f}" for x in ms[i:i + 15]))
    a = np.array(ms)
    print(f"median {np.median(a):.0f} ms  p99 {np.percentile(a, 99):.0f} ms  "
          f"max {a.max():.0f} ms  total {a.sum() / 1e3:.1f} s")


if __name__ == "__main__":
    main()
