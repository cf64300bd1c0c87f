"""Where the time of one small request goes: CPU per call on each side.

    .venv/bin/python bench/profile_request.py [--size 4096] [--calls 3000] [--transport tcp]
                                              [--cprofile] [--logged] [--replicas 1]

Starts ``pserver serve --shards 1 --replicas 1 --in-memory`` (``--logged``: without
``--in-memory``, a Raft group of one; ``--replicas 3``: a logged group of three,
whose leader's CPU is the server's) and a raw pyzmq echo server, then
times lockstep ``push_pull`` and ``pull`` calls of one float32 tensor against raw
round trips of the same bytes, and reads the CPU seconds each process used (the client's
from ``getrusage``, the servers' from ``/proc/PID/stat``, zmq I/O threads
included). Wall time per call minus the CPU of both sides is time spent waiting
for the other side or for a core. ``--cprofile`` also prints the client's
cProfile top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import time
from collections.abc import Callable

import numpy as np

import pserver
from pserver.benchmark.baselines import EchoServer
from pserver.benchmark.scenarios import LocalCluster
from pserver.clients.client import cluster_status


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(call: Callable[[], object], calls: int, server_pid: int) -> dict[str, float]:
    for _ in range(calls // 10):  # warm-up
        call()
    c0, s0, t0 = _self_cpu(), _proc_cpu(server_pid), time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - t0
    return {"wall_us": wall / calls * 1e6,
            "client_cpu_us": (_self_cpu() - c0) / calls * 1e6,
            "server_cpu_us": (_proc_cpu(server_pid) - s0) / calls * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--logged", action="store_true",
                    help="a shard with its log on disk (a Raft group of one), not --in-memory")
    ap.add_argument("--replicas", type=int, default=1,
                    help="replicas of the shard (more than 1: logged)")
    args = ap.parse_args()
    grad = np.full(max(1, args.size // 4), 1e-3, np.float32)
    in_memory = args.replicas == 1 and not args.logged
    with LocalCluster.start(shards=1, replicas=args.replicas, in_memory=in_memory) as cluster, \
            EchoServer() as echo:
        replicas = cluster_status(cluster.address)["shards"][0]["replicas"]
        pid = int(next(r for r in replicas if r["role"] == "leader")["pid"])
        with pserver.connect(cluster.address, ipc=args.transport == "ipc") as client:
            client.init({"k": grad})
            rows = {"pserver push_pull": _measure(lambda: client.push_pull({"k": grad}),
                                                  args.calls, pid),
                    "pserver pull": _measure(lambda: client.pull(["k"]), args.calls, pid),
                    "raw echo": _measure(lambda: echo.roundtrips(grad, 1), args.calls,
                                         echo.proc.pid)}
            print(f"{grad.nbytes} B lockstep calls ({args.transport}), per call:")
            for name, r in rows.items():
                print(f"  {name:<18} wall {r['wall_us']:7.1f} µs  client CPU "
                      f"{r['client_cpu_us']:6.1f} µs  server CPU {r['server_cpu_us']:6.1f} µs")
            if args.cprofile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.calls):
                    client.push_pull({"k": grad})
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
