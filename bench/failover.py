"""Failover benchmark of issue 4 (the code is ``pserver.benchmark.failover``).

    .venv/bin/python bench/failover.py [--kills 50] [--throughput] [--json OUT]

SIGKILLs the leader of a 3-replica shard under load ``--kills`` times and prints
the time from each kill to the first push the new leader acknowledged
(p50/p90/p99/max; targets p50 <= 500 ms, p99 <= 1000 ms). ``--throughput`` also
times a synchronous step of a 64 MiB model by 4 worker processes against R=3
and R=1 clusters in the same run (target: R=3 at least 0.5 of R=1's steps/s).
``pserver bench --failover-kills N`` runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pserver.benchmark.distributed import DistSettings, sync_section
from pserver.benchmark.failover import failover_section
from pserver.benchmark.workers import WorkerPool


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--json", dest="out", default=None)
    args = ap.parse_args()
    result: dict[str, Any] = {"command": "bench/failover.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False))}
    f = result["failover"] = failover_section(args.kills, lambda s: print(s, flush=True))
    print(f"failover over {f['kills']} kills: p50 {f['p50_ms']:.0f} ms  p90 {f['p90_ms']:.0f} ms"
          f"  p99 {f['p99_ms']:.0f} ms  max {f['max_ms']:.0f} ms"
          "  (targets p50 <= 500, p99 <= 1000)")
    if args.throughput:
        settings = DistSettings(sync_workers=4, sync_replicas=(3, 1),
                                sync_variants=(("ipc", None),), sync_steps=5)
        with WorkerPool(4) as pool:
            sync = sync_section(pool, settings, [])
        by_r = {r["replicas"]: 1e3 / r["step_ms_median"] for r in sync["rows"]}
        result["sync_64mib_4_workers"] = {"r3_steps_per_s": by_r[3], "r1_steps_per_s": by_r[1],
                                          "ratio": by_r[3] / by_r[1], "detail": sync}
        print(f"sync 64 MiB, 4 workers: R=3 {by_r[3]:.2f} steps/s, R=1 {by_r[1]:.2f} steps/s, "
              f"ratio {by_r[3] / by_r[1]:.2f} (target >= 0.5)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
