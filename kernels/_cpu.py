"""numba CPU kernels: fused, parallel, deterministic element-wise updates.

Owns the compiled loops behind ``dispatch``. Every kernel is
``@njit(parallel=True, nogil=True, cache=True, error_model="numpy")``, writes in
place into arrays the caller owns, allocates nothing, and is element-wise (no
reductions), so the result does not depend on how the loop is split over
threads: the same inputs give the same bits in every process, whatever the
thread count. ``error_model="numpy"``: a division by zero gives inf/nan as in
numpy instead of raising, and without that per-element check LLVM vectorizes
the loops (sqrt and division eight floats at a time: rows_adagrad of 1.6M
float32 went from 6.1 to 1.2 ms); IEEE sqrt and division are correctly rounded
either way, so the bits do not change. No fastmath;
LLVM does fuse ``a + b * c`` into one FMA, so a result may differ from the
numpy reference in the last bit (one rounding instead of two). Scalars arrive
already cast to the parameter's dtype, so a float32 update computes in
float32. Must not import ``numba.cuda``.

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
already says otherwise: numba's default threading layer is OpenMP, whose idle
threads otherwise spin for a while after every parallel loop. A shard runs a
loop per update with gaps between them, so each gap burned a whole core; on a
2-core host that core was taken from the shard's own I/O, the other shards and
the clients (``bench/profile_request.py``: 7.3 ms of server CPU per 1 MiB
push_pull spinning, 0.8 ms passive). OpenMP reads the setting when numba
starts its thread pool, at the first parallel loop, after this import.
"""

from __future__ import annotations

import os
import types
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from numba import njit, prange

_opts: dict[str, Any] = {"parallel": True, "nogil": True, "cache": True,
                         "error_model": "numpy"}


@njit(**_opts)
def add(p, g):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        p[i] = p[i] + g[i]


@njit(inline="always")
def _clip(x, c):  # type: ignore[no-untyped-def]
    if c > 0:
        if x > c:
            return c
        if x < -c:
            return -c
    return x


@njit(**_opts)
def sgd(p, g, neg_lr, wd, clip):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        d = _clip(g[i], clip)
        if wd != 0:
            d = d + wd * p[i]
        p[i] = p[i] + neg_lr * d


@njit(**_opts)
def sgd_momentum(p, g, buf, neg_lr, wd, momentum, keep, nesterov, first, clip):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        d = _clip(g[i], clip)
        if wd != 0:
            d = d + wd * p[i]
        b = d if first else momentum * buf[i] + keep * d
        buf[i] = b
        if nesterov:
            d = d + momentum * b
        else:
            d = b
        p[i] = p[i] + neg_lr * d


@njit(inline="always")
def _moments(gi, mi, vi, w1, omw1, b2, w2):  # type: ignore[no-untyped-def]
    """Adam's new first and second moments of one element. ``omw1`` is ``1 - w1`` in
    the parameter's dtype: an int ``1 - w1`` here made numba compute that branch in
    float64, and the mixed loop did not vectorize (adam at 1.3 ns an element
    instead of 0.75, single-threaded, whichever branch was taken)."""
    if w1 < 0.5:  # torch's lerp: exp_avg.lerp_(grad, 1 - beta1)
        mi = mi + w1 * (gi - mi)
    else:
        mi = gi - (gi - mi) * omw1
    return mi, vi * b2 + w2 * gi * gi


@njit(**_opts)
def adam(  # type: ignore[no-untyped-def]
    p, g, m, v, vmax, neg_step_size, bc2_sqrt, w1, omw1, b2, w2, eps, wd, decay, amsgrad, clip
):
    for i in prange(p.size):
        gi = _clip(g[i], clip)
        pi = p[i] * decay  # decay is 1 - lr * weight_decay for AdamW, else 1
        if wd != 0:
            gi = gi + wd * pi
        mi, vi = _moments(gi, m[i], v[i], w1, omw1, b2, w2)
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = max(vi, vmax[i])
            vmax[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi + neg_step_size * (mi / denom)


@njit(**_opts)
def adam_plain(p, g, m, v, neg_step_size, bc2_sqrt, w1, omw1, b2, w2, eps):  # type: ignore[no-untyped-def]
    """``adam`` without weight decay, amsgrad or clipping (the usual case): the
    same arithmetic without the per-element branches, hence the same bits."""
    for i in prange(p.size):
        mi, vi = _moments(g[i], m[i], v[i], w1, omw1, b2, w2)
        m[i] = mi
        v[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = p[i] + neg_step_size * (mi / denom)


@njit(**_opts)
def adagrad(p, g, s, neg_clr, wd, eps, clip):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        gi = _clip(g[i], clip)
        if wd != 0:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s[i] = si
        p[i] = p[i] + neg_clr * (gi / (np.sqrt(si) + eps))


# -- row-sparse updates: rows[slots[j]] updated with grads[j]; slots are unique ---------


@njit(**_opts)
def rows_add(values, slots, grads):  # type: ignore[no-untyped-def]
    for j in prange(slots.size):
        r = slots[j]
        for k in range(values.shape[1]):
            values[r, k] = values[r, k] + grads[j, k]


@njit(**_opts)
def rows_sgd(values, buf, slots, grads, steps, neg_lr, wd, momentum, keep, nesterov, clip):  # type: ignore[no-untyped-def]
    for j in prange(slots.size):
        r = slots[j]
        first = steps[r] == 1
        for k in range(values.shape[1]):
            d = _clip(grads[j, k], clip)
            if wd != 0:
                d = d + wd * values[r, k]
            if momentum != 0:
                b = d if first else momentum * buf[r, k] + keep * d
                buf[r, k] = b
                if nesterov:
                    d = d + momentum * b
                else:
                    d = b
            values[r, k] = values[r, k] + neg_lr * d


@njit(**_opts)
def rows_adam(  # type: ignore[no-untyped-def]
    values, m, v, vmax, slots, grads, neg_step, bc2_sqrt, w1, omw1, b2, w2, eps, wd, decay, amsgrad,
    clip
):
    for j in prange(slots.size):
        r = slots[j]
        for k in range(values.shape[1]):
            gi = _clip(grads[j, k], clip)
            pi = values[r, k] * decay
            if wd != 0:
                gi = gi + wd * pi
            mi, vi = _moments(gi, m[r, k], v[r, k], w1, omw1, b2, w2)
            m[r, k] = mi
            v[r, k] = vi
            if amsgrad:
                vi = max(vi, vmax[r, k])
                vmax[r, k] = vi
            denom = np.sqrt(vi) / bc2_sqrt[j] + eps
            values[r, k] = pi + neg_step[j] * (mi / denom)


@njit(**_opts)
def rows_adagrad(values, s, slots, grads, neg_clr, wd, eps, clip):  # type: ignore[no-untyped-def]
    for j in prange(slots.size):
        r = slots[j]
        for k in range(values.shape[1]):
            gi = _clip(grads[j, k], clip)
            if wd != 0:
                gi = gi + wd * values[r, k]
            si = s[r, k] + gi * gi
            s[r, k] = si
            values[r, k] = values[r, k] + neg_clr[j] * (gi / (np.sqrt(si) + eps))


@njit(**_opts)
def sum_into(out, grads, first, divisor):  # type: ignore[no-untyped-def]
    """One pass: out = ((g0 + g1) + g2) ... in tuple order (added to out unless
    ``first``), divided by ``divisor`` when it is not 1."""
    n = len(grads)
    for i in prange(out.size):
        s = grads[0][i] if first else out[i] + grads[0][i]
        for j in range(1, n):
            s = s + grads[j][i]
        if divisor != 1:
            s = s / divisor
        out[i] = s


@njit(**_opts)
def sum_bf16_into(out, grads, first, divisor):  # type: ignore[no-untyped-def]
    """``sum_into`` of bfloat16 gradients (their uint16 bits) into a float32 ``out``:
    each is widened exactly as it is read, so the bits equal widening them first."""
    n = len(grads)
    for i in prange(out.size):
        w = np.uint32(np.uint32(grads[0][i]) << np.uint32(16)).view(np.float32)
        s = w if first else out[i] + w
        for j in range(1, n):
            s = s + np.uint32(np.uint32(grads[j][i]) << np.uint32(16)).view(np.float32)
        if divisor != 1:
            s = s / divisor
        out[i] = s


@njit(**_opts)
def to_bfloat16(bits, out):  # type: ignore[no-untyped-def]
    """out (uint16 bits) = bfloat16 of the float32 values whose uint32 bits are ``bits``
    (the caller makes the views: ``.view`` inside a parallel kernel gave wrong
    results), rounded to nearest, ties to even, as
    ml_dtypes casts: the top 16 bits after adding 0x7FFF plus the lowest kept bit; a
    NaN becomes the quiet NaN 0x7FC0 with its sign."""
    for i in prange(bits.size):
        u = bits[i]
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            out[i] = np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
        else:
            out[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                               >> np.uint32(16))


@njit(**_opts)
def from_bfloat16(src, bits):  # type: ignore[no-untyped-def]
    """float32 values (their uint32 ``bits``) = src (uint16 bfloat16 bits) widened:
    exact, the bits shifted up."""
    for i in prange(src.size):
        bits[i] = np.uint32(src[i]) << np.uint32(16)


@njit(**_opts)
def to_float16(bits, out):  # type: ignore[no-untyped-def]
    """out (uint16 bits) = float16 of the float32 values whose uint32 bits are ``bits``,
    bit for bit as numpy casts (checked on all 2**32 inputs): rounded to nearest, ties
    to even, in integer arithmetic for normal results (carry into the exponent
    included) and by scaling by 2**24 and ``rint`` for subnormal ones; 65520 and up
    overflow to inf; a NaN keeps the top 10 bits of its payload (at least 1)."""
    for i in prange(bits.size):
        u = bits[i]
        a = u & np.uint32(0x7FFFFFFF)
        normal = ((a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1)))
                  >> np.uint32(13)) - np.uint32(0x1C000)
        scaled = min(np.uint32(a).view(np.float32) * np.float32(16777216.0),
                     np.float32(2048.0))
        sub = np.uint32(np.rint(scaled))
        nan = np.uint32(0x7C00) | max((a & np.uint32(0x7FFFFF)) >> np.uint32(13),
                                      np.uint32(1))
        if a > np.uint32(0x7F800000):
            h = nan
        elif a >= np.uint32(0x477FF000):
            h = np.uint32(0x7C00)
        elif a >= np.uint32(0x38800000):
            h = normal
        else:
            h = sub
        out[i] = np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | h)


@njit(**_opts)
def from_float16(src, bits):  # type: ignore[no-untyped-def]
    """float32 values (their uint32 ``bits``) = src (uint16 float16 bits) widened,
    exactly: exponent rebiased, subnormals by scaling their significand by 2**-24,
    inf and NaN (payload kept) as they are."""
    for i in prange(src.size):
        h = np.uint32(src[i])
        e = (h >> np.uint32(10)) & np.uint32(0x1F)
        m = h & np.uint32(0x3FF)
        if e == np.uint32(0x1F):
            b = np.uint32(0x7F800000) | (m << np.uint32(13))
        elif e != np.uint32(0):
            b = ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
        else:
            b = np.float32(np.float32(m) * np.float32(5.9604644775390625e-08)).view(np.uint32)
        bits[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | b


def _serial_twin(kernel: Any) -> Any:
    """The same loop compiled without ``parallel``: waking numba's thread pool costs
    ~20 us, more than a small update itself. Same arithmetic, hence the same bits."""
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"  # its own on-disk cache entry
    return njit(nogil=True, cache=True, error_model="numpy")(twin)


SERIAL = types.SimpleNamespace(**{
    name: _serial_twin(globals()[name])
    for name in ("add", "sgd", "sgd_momentum", "adam", "adam_plain", "adagrad", "sum_into",
                 "rows_add", "rows_sgd", "rows_adam", "rows_adagrad", "sum_bf16_into",
                 "to_bfloat16", "from_bfloat16", "to_float16", "from_float16")
})
