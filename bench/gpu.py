"""GPU check and kernel benchmarks for the ``cuda`` backend: one script for a GPU machine.

1. Runs ``pytest -m gpu tests/kernels`` (the CUDA kernels against the numpy
   reference on ~1M-element arrays; see ``tests/kernels/test_cuda_gpu.py``).
2. Times the kernels through the public API on 64 MiB float32 device arrays,
   against a device-to-device copy of the same 64 MiB (``cuMemcpyDtoD``, read +
   written bytes) as the bandwidth limit: ``aggregate`` of 4 gradients, ``sgd``
   (plain and with momentum), fused ``adam``; and, where torch with CUDA is
   installed, ``torch._fused_adam_`` on the same sizes.
3. Prints GB/s (1e9 B/s) and the ratio to the copy bandwidth, and writes the
   figures as JSON to ``bench/results/gpu-<date>.json``.

Bytes per element: copy 2 (read + write, in units of the array), ``aggregate``
9 as implemented (``out = g0 + g1`` then ``out += g2``, ``out += g3``) and 5 at
the ideal (4 read, 1 written: reported as ``effective``), ``sgd`` 3, ``sgd``
with momentum 5, ``adam`` 7 (param, grad, two moments read; param and moments
written). Times are the best of ``--rounds`` rounds of ``--reps`` calls each,
synchronised around each round, so numba's per-launch overhead is included.

    python bench/gpu.py                 # tests, then benchmarks
    python bench/gpu.py --skip-tests --mib 256 --reps 50

Without a GPU it exits with status 2 and says why (the simulator does not count).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NO_GPU_EXIT = 2


class NoGPU(RuntimeError):
    """No CUDA GPU can run the benchmarks here."""


def require_gpu() -> str:
    """The GPU's name; ``NoGPU`` (with the reason) when there is none."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise NoGPU("NUMBA_ENABLE_CUDASIM is set: simulator timings mean nothing; unset it "
                    "and run on a machine with a CUDA GPU")
    try:
        from numba import cuda
    except ImportError as exc:
        raise NoGPU(f"numba's CUDA target cannot be imported: {exc}") from exc
    if not cuda.is_available():
        raise NoGPU("no CUDA GPU here (numba.cuda.is_available() is False: no device, or no "
                    "driver); run bench/gpu.py on a machine with an NVIDIA GPU")
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def run_gpu_tests() -> dict[str, Any]:
    """``pytest -m gpu tests/kernels``: exit status and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels"]
    print("$", " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-500:]
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-4000:], sep="\n")
    print(summary, flush=True)
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": summary,
            "seconds": round(time.perf_counter() - t, 2)}


def _best(fn: Callable[[], None], sync: Callable[[], None], reps: int, rounds: int) -> float:
    """Best seconds per call over ``rounds`` rounds of ``reps`` calls (after a warm-up)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def _torch_fused_adam(n: int, reps: int, rounds: int) -> tuple[float | None, str]:
    """Seconds per ``torch._fused_adam_`` call on n float32 elements, or (None, why)."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA"
    try:
        p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        step = torch.tensor(1.0, device="cuda")

        def call() -> None:
            torch._fused_adam_([p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9,
                               beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                               maximize=False)

        return _best(call, torch.cuda.synchronize, reps, rounds), ""
    except Exception as exc:  # an API that moves between torch versions
        return None, f"torch._fused_adam_ failed: {exc!r}"


def bench_kernels(mib: float, reps: int, rounds: int) -> dict[str, Any]:
    """Time the cuda-backend kernels against a device-to-device copy."""
    from numba import cuda

    from pserver import kernels

    n = int(mib * (1 << 20)) // 4
    nbytes = n * 4
    rng = np.random.default_rng(0)
    host = rng.standard_normal(n, dtype=np.float32)
    p, src, dst = cuda.to_device(host), cuda.to_device(host), cuda.device_array(n, np.float32)
    grads = [cuda.to_device(rng.standard_normal(n, dtype=np.float32)) for _ in range(4)]
    m, v, buf = (cuda.to_device(np.zeros(n, np.float32)) for _ in range(3))
    out = cuda.device_array(n, np.float32)
    g = grads[0]
    steps = iter(range(1, 1 << 30))

    cases: dict[str, tuple[Callable[[], None], int, int]] = {
        # name: (call, element bytes moved as implemented, at the ideal)
        "copy": (lambda: dst.copy_to_device(src), 2, 2),
        "aggregate4": (lambda: kernels.aggregate(grads, out), 9, 5),
        "aggregate4-mean": (lambda: kernels.aggregate(grads, out, mean=True), 11, 5),
        "sgd": (lambda: kernels.sgd(p, g, lr=1e-3), 3, 3),
        "sgd-momentum": (lambda: kernels.sgd(p, g, lr=1e-3, momentum=0.9,
                                             momentum_buffer=buf, first=False), 5, 5),
        "adam": (lambda: kernels.adam(p, g, m, v, step=next(steps), lr=1e-3), 7, 7),
    }
    results: dict[str, Any] = {}
    for name, (call, moved, ideal) in cases.items():
        sec = _best(call, cuda.synchronize, reps, rounds)
        results[name] = {"seconds": sec, "bytes": moved * nbytes,
                         "gbps": moved * nbytes / sec / 1e9,
                         "effective_gbps": ideal * nbytes / sec / 1e9}
    torch_sec, why = _torch_fused_adam(n, reps, rounds)
    if torch_sec is not None:
        results["torch-fused-adam"] = {"seconds": torch_sec, "bytes": 7 * nbytes,
                                       "gbps": 7 * nbytes / torch_sec / 1e9,
                                       "effective_gbps": 7 * nbytes / torch_sec / 1e9}
    limit = results["copy"]["gbps"]
    for r in results.values():
        r["ratio_to_copy"] = r["gbps"] / limit
        r["effective_ratio_to_copy"] = r["effective_gbps"] / limit
    if torch_sec is not None:
        results["adam"]["speed_vs_torch_fused"] = torch_sec / results["adam"]["seconds"]
    return {"elements": n, "mib": mib, "reps": reps, "rounds": rounds, "results": results,
            "torch": why or "measured"}


def _print(report: dict[str, Any]) -> None:
    res = report["results"]
    print(f"\n{report['mib']} MiB float32 ({report['elements']} elements), best of "
          f"{report['rounds']} x {report['reps']} calls; limit = device-to-device copy")
    print(f"{'kernel':<18}{'ms':>9}{'GB/s':>9}{'/copy':>8}{'eff GB/s':>10}{'eff/copy':>10}")
    for name, r in res.items():
        print(f"{name:<18}{r['seconds'] * 1e3:>9.3f}{r['gbps']:>9.1f}{r['ratio_to_copy']:>8.2f}"
              f"{r['effective_gbps']:>10.1f}{r['effective_ratio_to_copy']:>10.2f}")
    if "speed_vs_torch_fused" in res["adam"]:
        print(f"adam vs torch._fused_adam_: {res['adam']['speed_vs_torch_fused']:.2f}x")
    else:
        print(f"torch._fused_adam_: {report['torch']}")


def main(argv: list[str] | None = None) -> int:
    """Run the GPU tests and the benchmarks; write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="array size in MiB (float32)")
    ap.add_argument("--reps", type=int, default=20, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (best is kept)")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/gpu-<date>.json)")
    args = ap.parse_args(argv)
    try:
        device = require_gpu()
    except NoGPU as exc:
        print(f"bench/gpu.py: {exc}", file=sys.stderr)
        return NO_GPU_EXIT
    import numba

    print(f"device: {device}; numba {numba.__version__}", flush=True)
    tests = None if args.skip_tests else run_gpu_tests()
    report = bench_kernels(args.mib, args.reps, args.rounds)
    _print(report)
    out = args.out or RESULTS / f"gpu-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device,
            "numba": numba.__version__, "python": platform.python_version(),
            "tests": tests, **report}
    out.write_text(json.dumps(full, indent=1))
    print(f"wrote {out}")
    return 1 if tests is not None and tests["returncode"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
