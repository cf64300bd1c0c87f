"""Fused optimizer kernels (numba CPU) against the numpy reference.

Each update rule runs 100-step trajectories against ``kernels/reference.py`` on
random shapes (empty, size 1, odd sizes) and both float dtypes, within per-dtype
tolerances: LLVM fuses ``a + b * c`` into one FMA (one rounding instead of two),
so the fused kernels may differ from numpy in the last bit. The rule itself is
checked against torch.optim's formula written out by hand. Determinism, which
replicas rely on, is checked bit for bit: two processes, and one thread versus
two, produce the same bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pserver import kernels
from pserver.kernels import KernelError

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
SIZES = [0, 1, 3, 17, 1000, 4099]


def _bits(a: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(a).tobytes()


TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-11, "atol": 1e-13}}


def _close(a: Any, b: Any) -> None:
    np.testing.assert_allclose(a, b, **TOL[a.dtype.type])


def _rand(rng: np.random.Generator, n: int, dtype: Any, scale: float = 1.0) -> Any:
    return (rng.standard_normal(n) * scale).astype(dtype)


SGD_CASES = {
    "plain": {},
    "weight-decay": {"weight_decay": 0.01},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "clip": {"momentum": 0.5, "clip_value": 0.3},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_trajectory_matches_the_reference(case: str, n: int, dtype: Any) -> None:
    rng = np.random.default_rng(n)
    hp = {"lr": 0.05, "weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0,
          "nesterov": False, "clip_value": 0.0, **SGD_CASES[case]}
    p = {b: _rand(rng, n, dtype) for b in ("cpu", "numpy")}
    p["numpy"][...] = p["cpu"]
    buf = {b: np.zeros(n, dtype) for b in p}
    for step in range(1, 101):
        g = _rand(rng, n, dtype)
        for b, param in p.items():
            kernels.sgd(param, g, momentum_buffer=buf[b], first=step == 1, backend=b, **hp)
    _close(p["cpu"], p["numpy"])
    _close(buf["cpu"], buf["numpy"])


ADAM_CASES = {
    "adam": {},
    "adam-weight-decay": {"weight_decay": 0.01},
    "adamw": {"weight_decay": 0.01, "decoupled": True},
    "amsgrad": {"amsgrad": True},
    "low-beta1": {"beta1": 0.3},  # the other branch of torch's lerp
    "clip": {"clip_value": 0.5},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adam_trajectory_matches_the_reference(case: str, n: int, dtype: Any) -> None:
    rng = np.random.default_rng(n + 1)
    hp = dict(ADAM_CASES[case])
    amsgrad = hp.pop("amsgrad", False)
    start = _rand(rng, n, dtype)
    runs = {}
    for b in ("cpu", "numpy"):
        runs[b] = (start.copy(), np.zeros(n, dtype), np.zeros(n, dtype),
                   np.zeros(n, dtype) if amsgrad else None)
    grads = [_rand(rng, n, dtype) for _ in range(100)]
    for step, g in enumerate(grads, start=1):
        for b, (p, m, v, vmax) in runs.items():
            kernels.adam(p, g, m, v, step=step, lr=1e-2, max_exp_avg_sq=vmax, backend=b, **hp)
    for cpu_arr, ref_arr in zip(runs["cpu"], runs["numpy"], strict=True):
        if cpu_arr is not None:
            _close(cpu_arr, ref_arr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lr_decay", [0.0, 0.01])
def test_adagrad_trajectory_matches_the_reference(lr_decay: float, n: int, dtype: Any) -> None:
    rng = np.random.default_rng(n + 2)
    start = _rand(rng, n, dtype)
    runs = {b: (start.copy(), np.full(n, 0.1, dtype)) for b in ("cpu", "numpy")}
    for step in range(1, 101):
        g = _rand(rng, n, dtype)
        for b, (p, s) in runs.items():
            kernels.adagrad(p, g, s, step=step, lr=0.1, lr_decay=lr_decay, weight_decay=0.001,
                            backend=b)
    _close(runs["cpu"][0], runs["numpy"][0])
    _close(runs["cpu"][1], runs["numpy"][1])


def test_adam_first_step_follows_the_formula() -> None:
    """torch.optim.Adam, step 1 written out: m = (1-b1) g, v = (1-b2) g^2,
    p -= lr / (1-b1) * m / (sqrt(v) / sqrt(1-b2) + eps), in float64."""
    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(50), rng.standard_normal(50)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    want = p0 - lr / (1 - b1) * m / (np.sqrt(v) / np.sqrt(1 - b2) + eps)
    p, ms, vs = p0.copy(), np.zeros(50), np.zeros(50)
    kernels.adam(p, g, ms, vs, step=1, lr=lr, beta1=b1, beta2=b2, eps=eps)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ms, m, rtol=1e-12)


def test_adamw_decays_the_weights_before_the_step() -> None:
    p, g = np.full(4, 2.0), np.zeros(4)  # zero gradient: only the decay acts
    kernels.adam(p, g, np.zeros(4), np.zeros(4), step=1, lr=0.1, weight_decay=0.5,
                 decoupled=True)
    np.testing.assert_allclose(p, 2.0 * (1 - 0.1 * 0.5))


def test_momentum_and_nesterov_follow_the_formula() -> None:
    g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    for nesterov in (False, True):
        p, buf = np.zeros(2), np.zeros(2)
        kernels.sgd(p, g1, lr=0.1, momentum=0.9, momentum_buffer=buf, first=True,
                    nesterov=nesterov)
        kernels.sgd(p, g2, lr=0.1, momentum=0.9, momentum_buffer=buf, first=False,
                    nesterov=nesterov)
        b2 = 0.9 * g1 + g2
        d1 = g1 + 0.9 * g1 if nesterov else g1
        d2 = g2 + 0.9 * b2 if nesterov else b2
        np.testing.assert_allclose(buf, b2)
        np.testing.assert_allclose(p, -0.1 * d1 - 0.1 * d2)


def test_adagrad_follows_the_formula() -> None:
    g = np.array([2.0, -1.0])
    p, s = np.zeros(2), np.full(2, 0.5)
    kernels.adagrad(p, g, s, step=3, lr=0.1, lr_decay=0.5)
    clr = 0.1 / (1 + 2 * 0.5)
    np.testing.assert_allclose(s, 0.5 + g * g)
    np.testing.assert_allclose(p, -clr * g / (np.sqrt(0.5 + g * g) + 1e-10))


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=40),
       st.floats(0.01, 5.0))
def test_clip_value_bounds_each_gradient_element(values: list[float], clip: float) -> None:
    g = np.array(values)
    p = np.zeros_like(g)
    kernels.sgd(p, g, lr=1.0, clip_value=clip)
    np.testing.assert_array_equal(p, -np.clip(g, -clip, clip))


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_aggregate_sums_in_order_and_takes_the_mean(backend: str) -> None:
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(1001).astype(np.float32) for _ in range(4)]
    out = np.empty(1001, np.float32)
    kernels.aggregate(grads, out, backend=backend)
    want = grads[0].copy()
    for g in grads[1:]:
        want += g
    assert _bits(out) == _bits(want)
    kernels.aggregate(grads, out, mean=True, backend=backend)
    assert _bits(out) == _bits(want / np.float32(4))


def test_aggregate_takes_read_only_writeable_and_float16_gradients_together() -> None:
    """A sync step mixes gradients in received frames (read-only), widened float16
    ones and arrays restored from a snapshot (writeable); numba once refused the mix
    (a tuple of differently typed arrays) and the step failed."""
    rng = np.random.default_rng(6)
    plain = rng.standard_normal(1001).astype(np.float32)
    frame = np.frombuffer(rng.standard_normal(1001).astype(np.float32).tobytes(), np.float32)
    half = rng.standard_normal(1001).astype(np.float16)
    assert not frame.flags.writeable
    for grads in ([plain, frame], [frame, plain], [half, frame], [frame, half, plain]):
        out = np.empty(1001, np.float32)
        kernels.aggregate(grads, out, mean=True)
        want = np.empty(1001, np.float32)
        kernels.aggregate(grads, want, mean=True, backend="numpy")
        assert _bits(out) == _bits(want)
    assert plain.flags.writeable  # the caller's array is left as it was


def test_float16_gradients_go_into_float32_parameters() -> None:
    p = np.ones(8, np.float32)
    kernels.sgd(p, np.full(8, 0.5, np.float16), lr=1.0)
    np.testing.assert_array_equal(p, np.full(8, 0.5, np.float32))


@pytest.mark.parametrize("call", [
    pytest.param(lambda p, g: kernels.adam(p, g, np.zeros(3), np.zeros(4), step=1, lr=0.1),
                 id="state-shape"),
    pytest.param(lambda p, g: kernels.adam(p, g, np.zeros(4), np.zeros(4), step=0, lr=0.1),
                 id="step-0"),
    pytest.param(lambda p, g: kernels.sgd(p, g, lr=0.1, momentum=0.9), id="no-buffer"),
    pytest.param(lambda p, g: kernels.adagrad(p, g, np.zeros(4, np.float32), step=1, lr=0.1),
                 id="state-dtype"),
    pytest.param(lambda p, g: kernels.aggregate([], p), id="no-gradients"),
])
def test_bad_arguments_raise_kernel_error(call: Any) -> None:
    p, g = np.zeros(4), np.ones(4)
    with pytest.raises(KernelError):
        call(p, g)
    np.testing.assert_array_equal(p, np.zeros(4))


_CHILD = """
import hashlib, numpy as np
from pserver import kernels
from pserver.kernels import sparse
from pserver.kernels.dispatch import SERIAL_BELOW
rng = np.random.default_rng(11)
n = SERIAL_BELOW + 12_347  # the parallel kernels, split differently by 1 and 2 threads
digest = hashlib.sha256()
def add(*arrays):
    for a in arrays:
        digest.update(a.tobytes())
p0 = rng.standard_normal(n).astype(np.float32)
grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
for hp in ({}, {"weight_decay": 0.01}, {"weight_decay": 0.01, "decoupled": True}):
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step, g in enumerate(grads, 1):
        kernels.adam(p, g, m, v, step=step, lr=1e-3, **hp)
    add(p, m, v)
p, buf = p0.copy(), np.zeros(n, np.float32)
for step, g in enumerate(grads, 1):
    kernels.sgd(p, g, lr=0.1, momentum=0.9, momentum_buffer=buf, first=step == 1,
                weight_decay=0.01)
add(p, buf)
p, acc = p0.copy(), np.zeros(n, np.float32)
for step, g in enumerate(grads, 1):
    kernels.adagrad(p, g, acc, step=step, lr=0.1)
add(p, acc)
out = np.empty(n, np.float32)
kernels.aggregate(grads, out, mean=True)
add(out)
rows = n // 64 + 1
values = rng.standard_normal((rows, 64)).astype(np.float32)
slots = rng.permutation(rows).astype(np.int64)
g = rng.standard_normal((rows, 64)).astype(np.float32)
steps = np.ones(rows, np.int64)
v1, s1 = values.copy(), np.zeros_like(values)
sparse.adagrad_rows(v1, slots, g, steps, s1, lr=0.1)
v2, m2, q2 = values.copy(), np.zeros_like(values), np.zeros_like(values)
sparse.adam_rows(v2, slots, g, steps, m2, q2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.01)
add(v1, s1, v2, m2, q2)
print(digest.hexdigest())
"""


@pytest.mark.parametrize("threads", [("2", "2"), ("1", "2")], ids=["same", "1-vs-2-threads"])
def test_processes_compute_the_same_bits(threads: tuple[str, str]) -> None:
    """Replicas apply the same updates in different processes and must agree,
    however many threads each process gives numba: every parallel kernel (dense
    and rows, each vectorized with a scalar tail per thread's share) on an odd size
    above the serial threshold."""
    runs = [
        subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       check=True, timeout=120,
                       env={**os.environ, "NUMBA_NUM_THREADS": n}).stdout.strip()
        for n in threads
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 64


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_serial_and_parallel_kernels_give_the_same_bits(name: str) -> None:
    """Small updates run the serial twins, large ones the parallel kernels: replicas
    must not care which."""
    from pserver.kernels import _cpu

    rng = np.random.default_rng(12)
    n = 70_001
    p0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    outs = []
    for kern in (_cpu, _cpu.SERIAL):
        p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        f32 = np.float32
        if name == "sgd":
            kern.sgd(p, g, f32(-0.1), f32(0.01), f32(0))
        elif name == "adam":
            kern.adam(p, g, m, v, v, f32(-0.01), f32(0.03), f32(0.1), f32(0.9), f32(0.999),
                      f32(0.001), f32(1e-8), f32(0), f32(1), False, f32(0))
        else:
            kern.adagrad(p, g, m, f32(-0.1), f32(0), f32(1e-10), f32(0))
        outs.append(p.tobytes() + m.tobytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp-from-m", "lerp-from-g"])
def test_plain_adam_gives_the_bits_of_the_general_kernel(beta1: float) -> None:
    """Adam without weight decay, amsgrad or clipping runs a branch-free kernel;
    it must agree bit for bit with the general one over many steps."""
    from pserver.kernels import _cpu

    rng = np.random.default_rng(13)
    n = 70_001
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    f32 = np.float32
    outs = []
    for plain in (True, False):
        p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        for step, g in enumerate(grads, 1):
            args = (f32(-0.01 / (1 - beta1**step)), f32(np.sqrt(1 - 0.999**step)),
                    f32(1 - beta1), f32(1) - f32(1 - beta1), f32(0.999), f32(0.001), f32(1e-8))
            if plain:
                _cpu.adam_plain(p, g, m, v, *args)
            else:
                _cpu.adam(p, g, m, v, v, *args, f32(0), f32(1), False, f32(0))
        outs.append(p.tobytes() + m.tobytes() + v.tobytes())
    assert outs[0] == outs[1]
