"""The CUDA backend against the numpy reference, case by case (a script).

Run as a fresh process by ``test_cuda_sim.py`` (``NUMBA_ENABLE_CUDASIM=1``, tiny
arrays) and ``test_cuda_gpu.py`` (a real GPU, ~1M elements)::

    NUMBA_ENABLE_CUDASIM=1 python tests/kernels/cuda_cases.py --plan sim --out r.json

Each case runs a few optimizer steps on device arrays (``backend`` left unset:
a device param selects ``cuda``) and the same steps through the numpy reference,
then compares every written array: bit for bit for the sums (``accumulate``,
``aggregate``), within per-dtype tolerances for the optimizers (NVVM may fuse
``a + b * c`` into one FMA). A few extra cases check float16 gradients, host
arrays under ``backend="cuda"``, 2-D params, the grid-stride loops, argument
errors, ``__cuda_array_interface__`` objects, ``PSERVER_KERNELS=cuda``, and
that ``import pserver.kernels`` does not import numba.cuda. The results go to
``--out`` as JSON: ``{"cases": {id: {"ok", "max_abs_err", "detail",
"seconds"}}, "seconds", "simulated", "plan"}``.

Importing this module imports neither numba nor pserver: the tests read
``case_ids`` at collection time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

# size -> optimizer steps per case
PLANS: dict[str, dict[int, int]] = {
    "sim": {0: 2, 1: 2, 7: 2, 300: 2, 1000: 2},
    "gpu": {7: 100, 4099: 100, 1_000_003: 20},
}
DTYPES = ("float32", "float64")
TOL = {"float32": {"rtol": 1e-4, "atol": 1e-5}, "float64": {"rtol": 1e-11, "atol": 1e-13}}

# name -> (operation, hyperparameters); sums are compared bit for bit
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "accumulate": ("accumulate", {}),
    "aggregate-sum": ("aggregate", {"mean": False}),
    "aggregate-mean": ("aggregate", {"mean": True}),
    "sgd-plain": ("sgd", {}),
    "sgd-weight-decay": ("sgd", {"weight_decay": 0.01}),
    "sgd-momentum": ("sgd", {"momentum": 0.9}),
    "sgd-dampening": ("sgd", {"momentum": 0.9, "dampening": 0.3}),
    "sgd-nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
    "sgd-clip": ("sgd", {"momentum": 0.5, "clip_value": 0.3, "weight_decay": 0.01}),
    "adam": ("adam", {}),
    "adam-weight-decay": ("adam", {"weight_decay": 0.01}),
    "adamw": ("adam", {"weight_decay": 0.01, "decoupled": True}),
    "amsgrad": ("adam", {"amsgrad": True}),
    "adamw-amsgrad": ("adam", {"weight_decay": 0.01, "decoupled": True, "amsgrad": True}),
    "adam-low-beta1": ("adam", {"beta1": 0.3}),
    "adam-clip": ("adam", {"clip_value": 0.5}),
    "adagrad": ("adagrad", {}),
    "adagrad-decay": ("adagrad", {"lr_decay": 0.01, "weight_decay": 0.001}),
    "adagrad-clip": ("adagrad", {"clip_value": 0.3}),
}
EXACT_OPS = ("accumulate", "aggregate")
SPECIAL = ("lazy-import", "float16-grad", "host-arrays", "2d-param", "grid-stride",
           "bad-arguments", "foreign-arrays", "env-backend")


def case_ids(plan: str) -> list[str]:
    """Every case id the plan produces, in run order (no imports needed)."""
    ids = [f"{v}-{d}-n{n}" for v in VARIANTS for d in DTYPES for n in PLANS[plan]]
    return ids + [f"special-{s}" for s in SPECIAL]


class _Env:
    """What a case needs: the kernels, numba.cuda and a seeded generator."""

    def __init__(self, kernels: Any, cuda: Any, seed: int) -> None:
        self.k = kernels
        self.cuda = cuda
        self.rng = np.random.default_rng(seed)

    def rand(self, n: int | tuple[int, ...], dtype: Any, scale: float = 1.0) -> Array:
        return (self.rng.standard_normal(n) * scale).astype(dtype)

    def dev(self, a: Array) -> Any:
        return self.cuda.to_device(a)


def _compare(got: list[Any], want: list[Array], exact: bool) -> tuple[bool, float, str]:
    """(ok, max abs error, detail) over pairs of (device or host, host) arrays."""
    worst, detail = 0.0, ""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        h = g.copy_to_host() if hasattr(g, "copy_to_host") else np.asarray(g)
        if h.shape != w.shape or h.dtype != w.dtype:
            return False, float("inf"), f"array {i}: {h.dtype}{h.shape} vs {w.dtype}{w.shape}"
        if h.size:
            worst = max(worst, float(np.max(np.abs(h.astype(np.float64) - w))))
        if exact:
            if h.tobytes() != w.tobytes():
                return False, worst, f"array {i} differs in its bits"
        else:
            try:
                np.testing.assert_allclose(h, w, **TOL[w.dtype.name])
            except AssertionError as exc:
                return False, worst, f"array {i}: {exc}"
    return True, worst, detail


def _variant(env: _Env, name: str, dtype: str, n: int, steps: int) -> tuple[bool, float, str]:
    op, hp = VARIANTS[name]
    hp = dict(hp)
    k, dt = env.k, np.dtype(dtype)
    start = env.rand(n, dt)
    if op == "accumulate":
        ref, dp = start.copy(), env.dev(start)
        for _ in range(steps):
            g = env.rand(n, dt)
            k.accumulate(ref, g, backend="numpy")
            k.accumulate(dp, env.dev(g))
        return _compare([dp], [ref], exact=True)
    if op == "aggregate":
        ref, dp = np.empty(n, dt), env.dev(np.full(n, np.nan, dt))
        for _ in range(2):  # the second round must overwrite the first
            gs = [env.rand(n, dt) for _ in range(4)]
            k.aggregate(gs, ref, backend="numpy", **hp)
            k.aggregate([env.dev(g) for g in gs], dp, **hp)
        return _compare([dp], [ref], exact=True)
    if op == "sgd":
        hp.setdefault("lr", 0.05)
        host = [start.copy(), np.zeros(n, dt)]
        devs = [env.dev(a) for a in host]
        for step in range(1, steps + 1):
            g = env.rand(n, dt)
            k.sgd(host[0], g, momentum_buffer=host[1], first=step == 1, backend="numpy", **hp)
            k.sgd(devs[0], env.dev(g), momentum_buffer=devs[1], first=step == 1, **hp)
        return _compare(devs, host, exact=False)
    if op == "adam":
        amsgrad = hp.pop("amsgrad", False)
        host = [start.copy(), np.zeros(n, dt), np.zeros(n, dt)] + (
            [np.zeros(n, dt)] if amsgrad else [])
        devs = [env.dev(a) for a in host]
        for step in range(1, steps + 1):
            g = env.rand(n, dt)
            for arrays, grad, backend in ((host, g, "numpy"), (devs, env.dev(g), None)):
                vmax = arrays[3] if amsgrad else None
                k.adam(arrays[0], grad, arrays[1], arrays[2], step=step, lr=1e-2,
                       max_exp_avg_sq=vmax, backend=backend, **hp)
        return _compare(devs, host, exact=False)
    if op == "adagrad":
        host = [start.copy(), np.full(n, 0.1, dt)]
        devs = [env.dev(a) for a in host]
        for step in range(1, steps + 1):
            g = env.rand(n, dt)
            k.adagrad(host[0], g, host[1], step=step, lr=0.1, backend="numpy", **hp)
            k.adagrad(devs[0], env.dev(g), devs[1], step=step, lr=0.1, **hp)
        return _compare(devs, host, exact=False)
    raise AssertionError(op)


def _float16_grad(env: _Env) -> tuple[bool, float, str]:
    """float16 gradients are widened into float32 params (sgd with momentum, adam)."""
    k, n = env.k, 301
    host = [env.rand(n, np.float32), np.zeros(n, np.float32)]
    devs = [env.dev(a) for a in host]
    adam_h = [env.rand(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    adam_d = [env.dev(a) for a in adam_h]
    for step in (1, 2, 3):
        g = env.rand(n, np.float16)
        k.sgd(host[0], g, lr=0.1, momentum=0.9, momentum_buffer=host[1], first=step == 1,
              backend="numpy")
        k.sgd(devs[0], env.dev(g), lr=0.1, momentum=0.9, momentum_buffer=devs[1],
              first=step == 1)
        k.adam(*adam_h[:1], g, *adam_h[1:], step=step, lr=1e-2, backend="numpy")
        k.adam(*adam_d[:1], env.dev(g), *adam_d[1:], step=step, lr=1e-2)
    out_h, out_d = np.empty(n, np.float32), env.dev(np.empty(n, np.float32))
    gs = [env.rand(n, np.float16) for _ in range(3)]
    k.aggregate(gs, out_h, mean=True, backend="numpy")
    k.aggregate([env.dev(g) for g in gs], out_d, mean=True)
    ok, err, detail = _compare(devs + adam_d, host + adam_h, exact=False)
    if ok:
        ok, err2, detail = _compare([out_d], [out_h], exact=True)
        err = max(err, err2)
    return ok, err, detail


def _host_arrays(env: _Env) -> tuple[bool, float, str]:
    """``backend="cuda"`` with numpy arrays: staged through the device and the
    written arrays copied back (adam with amsgrad, aggregate); and a device param
    with a host gradient."""
    k, n = env.k, 257
    runs = {b: [env.rand(n, np.float64)] + [np.zeros(n) for _ in range(3)] for b in ("r", "c")}
    runs["c"][0][...] = runs["r"][0]
    for step in (1, 2):
        g = env.rand(n, np.float64)
        for b, backend in (("r", "numpy"), ("c", "cuda")):
            p, m, v, vmax = runs[b]
            k.adam(p, g, m, v, step=step, lr=1e-2, max_exp_avg_sq=vmax, backend=backend)
    ok, err, detail = _compare(runs["c"], runs["r"], exact=False)
    gs = [env.rand((3, 5), np.float32) for _ in range(3)]
    want, got = np.empty((3, 5), np.float32), np.empty((3, 5), np.float32)
    k.aggregate(gs, want, backend="numpy")
    k.aggregate(gs, got, backend="cuda")
    if ok:
        ok, _, detail = _compare([got], [want], exact=True)
    p = env.rand(n, np.float32)  # a device param with a host gradient
    dp, g = env.dev(p), env.rand(n, np.float32)
    k.sgd(p, g, lr=0.5, backend="numpy")
    k.sgd(dp, g, lr=0.5)
    if ok:
        ok, _, detail = _compare([dp], [p], exact=False)
    return ok, err, detail


def _two_d(env: _Env) -> tuple[bool, float, str]:
    """A (13, 7) param and state: flattened on the device, shape kept."""
    k = env.k
    host = [env.rand((13, 7), np.float32), np.full((13, 7), 0.1, np.float32)]
    devs = [env.dev(a) for a in host]
    for step in (1, 2, 3):
        g = env.rand((13, 7), np.float32)
        k.adagrad(host[0], g, host[1], step=step, lr=0.1, backend="numpy")
        k.adagrad(devs[0], env.dev(g), devs[1], step=step, lr=0.1)
    return _compare(devs, host, exact=False)


def _grid_stride(env: _Env) -> tuple[bool, float, str]:
    """More elements than the largest grid has threads: the loops must stride."""
    from pserver.kernels import _cuda

    blocks, threads = _cuda.geometry(1 << 40)
    n = 2 * blocks * threads + 3
    if _cuda.geometry(n)[0] * _cuda.geometry(n)[1] >= n:
        return False, 0.0, f"grid {_cuda.geometry(n)} covers {n} elements without striding"
    k, dt = env.k, np.float32
    p = env.rand(n, dt)
    g = env.rand(n, dt)
    ref, dp = p.copy(), env.dev(p)
    k.accumulate(ref, g, backend="numpy")
    k.accumulate(dp, env.dev(g))
    host = [p.copy(), np.zeros(n, dt), np.zeros(n, dt)]
    devs = [env.dev(a) for a in host]
    k.adam(*host[:1], g, *host[1:], step=1, lr=1e-2, backend="numpy")
    k.adam(*devs[:1], env.dev(g), *devs[1:], step=1, lr=1e-2)
    ok, err, detail = _compare([dp], [ref], exact=True)
    if ok:
        ok, err, detail = _compare(devs, host, exact=False)
    return ok, err, detail


def _bad_arguments(env: _Env) -> tuple[bool, float, str]:
    """Bad device arguments raise KernelError and leave the param untouched."""
    k, cuda = env.k, env.cuda
    from pserver.kernels import KernelError

    p = env.dev(np.zeros(8))
    calls: dict[str, Callable[[], None]] = {
        "non-contiguous": lambda: k.sgd(env.dev(np.zeros(16))[::2], env.dev(np.ones(8)),
                                        lr=0.1),
        "shape": lambda: k.sgd(p, env.dev(np.ones(9)), lr=0.1),
        "state-dtype": lambda: k.adagrad(p, env.dev(np.ones(8)),
                                         env.dev(np.zeros(8, np.float32)), step=1, lr=0.1),
        "grad-dtype": lambda: k.sgd(p, env.dev(np.ones(8, np.int32)), lr=0.1),
        "int-param": lambda: k.accumulate(env.dev(np.zeros(8, np.int64)),
                                          env.dev(np.ones(8, np.int64))),
        "cpu-backend": lambda: k.sgd(p, env.dev(np.ones(8)), lr=0.1, backend="cpu"),
        "no-buffer": lambda: k.sgd(p, env.dev(np.ones(8)), lr=0.1, momentum=0.9),
        "host-object": lambda: k.sgd(p, [1.0] * 8, lr=0.1),
        "unknown-backend": lambda: k.sgd(p, env.dev(np.ones(8)), lr=0.1, backend="gpu"),
    }
    for what, call in calls.items():
        try:
            call()
        except KernelError:
            pass
        else:
            return False, 0.0, f"{what}: no KernelError"
    cuda.synchronize()
    if np.any(p.copy_to_host() != 0):
        return False, 0.0, "param changed by a rejected call"
    return True, 0.0, ""


class _Foreign:
    """A device array known only by ``__cuda_array_interface__`` (like CuPy's)."""

    def __init__(self, d: Any) -> None:
        self._d = d

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return dict(self._d.__cuda_array_interface__)


def _foreign_arrays(env: _Env) -> tuple[bool, float, str]:
    """Objects with ``__cuda_array_interface__`` are viewed without a copy on a
    GPU; the simulator's arrays have no such interface, so there only numba's
    own device arrays are accepted and a foreign object is a KernelError."""
    from numba import config

    from pserver.kernels import KernelError

    k, n = env.k, 100
    p, g = env.rand(n, np.float32), env.rand(n, np.float32)
    dp, dg = env.dev(p), env.dev(g)
    if config.ENABLE_CUDASIM:
        try:
            k.sgd(_Foreign(dp), _Foreign(dg), lr=0.5)
        except KernelError:
            return True, 0.0, ""
        return False, 0.0, "a foreign object was accepted by the simulator"
    k.sgd(p, g, lr=0.5, backend="numpy")
    k.sgd(_Foreign(dp), _Foreign(dg), lr=0.5)
    return _compare([dp], [p], exact=False)


def _env_backend(env: _Env) -> tuple[bool, float, str]:
    """``PSERVER_KERNELS=cuda`` sends host arrays through the cuda backend."""
    import os

    from pserver.kernels import dispatch

    old = os.environ.get("PSERVER_KERNELS")
    os.environ["PSERVER_KERNELS"] = "cuda"
    try:
        if env.k.default_backend() != "cuda" or dispatch._choose(None, np.zeros(1)) != "cuda":
            return False, 0.0, "PSERVER_KERNELS=cuda did not select cuda"
        p, g = np.ones(5, np.float32), np.full(5, 2.0, np.float32)
        env.k.sgd(p, g, lr=0.5)
        return _compare([p], [np.zeros(5, np.float32)], exact=True)
    finally:
        if old is None:
            del os.environ["PSERVER_KERNELS"]
        else:
            os.environ["PSERVER_KERNELS"] = old


def run(plan: str, seed: int = 0) -> dict[str, Any]:
    """Run every case of ``plan``; a case that raises is recorded as failed."""
    t0 = time.perf_counter()
    from pserver import kernels

    lazy = {"after import": "numba.cuda" in sys.modules}
    kernels.accumulate(np.zeros(3), np.ones(3), backend="cpu")
    lazy["after a cpu kernel"] = "numba.cuda" in sys.modules
    lazy["_cuda imported"] = "pserver.kernels._cuda" in sys.modules
    from numba import config, cuda

    env = _Env(kernels, cuda, seed)
    results: dict[str, dict[str, Any]] = {}
    results["special-lazy-import"] = {
        "ok": not any(lazy.values()), "max_abs_err": 0.0,
        "detail": "" if not any(lazy.values()) else f"numba.cuda imported early: {lazy}"}
    jobs: list[tuple[str, Callable[[], tuple[bool, float, str]]]] = []
    for v in VARIANTS:
        for d in DTYPES:
            for n, steps in PLANS[plan].items():
                jobs.append((f"{v}-{d}-n{n}",
                             lambda v=v, d=d, n=n, s=steps: _variant(env, v, d, n, s)))
    jobs += [("special-float16-grad", lambda: _float16_grad(env)),
             ("special-host-arrays", lambda: _host_arrays(env)),
             ("special-2d-param", lambda: _two_d(env)),
             ("special-grid-stride", lambda: _grid_stride(env)),
             ("special-bad-arguments", lambda: _bad_arguments(env)),
             ("special-foreign-arrays", lambda: _foreign_arrays(env)),
             ("special-env-backend", lambda: _env_backend(env))]
    for case, job in jobs:
        t = time.perf_counter()
        try:
            ok, err, detail = job()
        except Exception:
            ok, err, detail = False, float("nan"), traceback.format_exc(limit=8)
        results[case] = {"ok": bool(ok), "max_abs_err": err, "detail": detail,
                         "seconds": round(time.perf_counter() - t, 4)}
    return {"plan": plan, "simulated": bool(config.ENABLE_CUDASIM), "cases": results,
            "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    """Run a plan and write the JSON report; exit 0 when every case passed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", choices=sorted(PLANS), default="sim")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = run(args.plan, args.seed)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=True))
    failed = [c for c, r in report["cases"].items() if not r["ok"]]
    print(f"{len(report['cases']) - len(failed)}/{len(report['cases'])} cases passed in "
          f"{report['seconds']} s (simulated={report['simulated']})")
    for c in failed:
        print(f"FAILED {c}: {report['cases'][c]['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
