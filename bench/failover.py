"""Failover benchmark of issue 4 (the code is ``pserver.benchmark.failover``).

    .venv/bin/python bench/failover.py [--kills 50] [--throughput] [--json OUT]

SIGKILLs the leader of a 3-replica shard under load ``--kills`` times and prints
the time from each kill to the first push the new leader acknowledged
(p50/p90/p99/max; targets p50 <= 500 ms, p99 <= 1000 ms). ``--throughput`` also
times a synchronous step of a 64 MiB model by 4 worker processes on R=3 and R=1
clusters in the same run (target: R=3 at least 0.5 of R=1's steps/s, both keeping
their logs; R=1 in memory is shown too): the replication section of ``pserver
bench``. ``pserver bench --failover-kills N`` runs the kills.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pserver.benchmark.distributed import DistSettings, replication_section
from pserver.benchmark.failover import failover_section
from pserver.benchmark.workers import WorkerPool


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="0: no kills (with --throughput)")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--json", dest="out", default=None)
    args = ap.parse_args()
    result: dict[str, Any] = {"command": "bench/failover.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False))}
    if args.kills > 0:
        f = result["failover"] = failover_section(args.kills, lambda s: print(s, flush=True))
        print(f"failover over {f['kills']} kills: p50 {f['p50_ms']:.0f} ms  "
              f"p90 {f['p90_ms']:.0f} ms  p99 {f['p99_ms']:.0f} ms  max {f['max_ms']:.0f} ms"
              "  (targets p50 <= 500, p99 <= 1000)")
    if args.throughput:
        settings = DistSettings()
        with WorkerPool(settings.replication_workers) as pool:
            repl = replication_section(pool, settings, lambda s: print(s, flush=True))
        assert repl is not None
        result["replication"] = repl
        for r in repl["rows"]:
            print(f"sync 64 MiB, {repl['workers']} workers, R={r['replicas']} "
                  f"{'logged' if r['logged'] else 'in memory'}: {1e3 / r['step_ms_median']:.2f}"
                  " steps/s")
        print(f"R=3 / R=1: {repl['r3_over_r1_logged']:.2f} both logged (target >= 0.5), "
              f"{repl['r3_over_r1_in_memory']:.2f} against R=1 in memory")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
