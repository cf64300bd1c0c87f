"""CPU per pull_rows / push_rows call: wall time, the shards' CPU and the client's.

    .venv/bin/python bench/profile_rows.py [--rows 100000] [--dim 64] [--calls 40]

Starts a 4-shard cluster (1 replica, tcp, in a temporary directory), creates a ``sum``
and an ``adagrad`` table, and times ``--calls`` calls of each operation after 3
warm-up calls. The shards' CPU comes from ``/proc/PID/stat``, the client's from
``getrusage`` (all its threads): on a 2-core machine their sum against the wall
time says how CPU-bound a call is.
"""

from __future__ import annotations

import argparse
import time

from profile_request import _proc_cpu, _self_cpu  # the sibling script's CPU clocks

import pserver
from pserver.benchmark.scenarios import LocalCluster
from pserver.benchmark.sparse import row_grads, row_ids
from pserver.clients.client import cluster_status


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    ids, grads = row_ids(args.rows), row_grads(args.rows, args.dim)
    with LocalCluster.start(shards=4, replicas=1) as cluster:  # its own temporary dir
        pids = [s["replicas"][0]["pid"] for s in cluster_status(cluster.address)["shards"]]
        with pserver.connect(cluster.address, ipc=False, timeout=60) as client:
            for opt in ("sum", "adagrad"):
                name = f"profile-rows-{opt}"
                client.create_table(name, args.dim,
                                    optimizer={"name": "sum"} if opt == "sum" else None)
                client.push_rows(name, ids, grads)  # creates the rows
                calls = {"push_rows": lambda n=name: client.push_rows(n, ids, grads),
                         "pull_rows": lambda n=name: client.pull_rows(n, ids)}
                for op, call in calls.items():
                    for _ in range(3):
                        call()
                    shards0, own0 = sum(map(_proc_cpu, pids)), _self_cpu()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    wall = (time.perf_counter() - t0) / args.calls
                    shards = (sum(map(_proc_cpu, pids)) - shards0) / args.calls
                    own = (_self_cpu() - own0) / args.calls
                    print(f"{op} {opt:8s} {args.rows} x {args.dim}: wall {wall * 1e3:6.1f} ms, "
                          f"shards CPU {shards * 1e3:6.1f} ms, client CPU {own * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
