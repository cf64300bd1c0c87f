"""numba-CUDA kernels: the GPU twins of ``_cpu.py`` and their host-side launchers.

Owns the ``@cuda.jit`` kernels behind the ``cuda`` backend of ``dispatch`` and
the launch geometry. Each kernel does the same per-element arithmetic, in the
same order, as its ``_cpu.py`` twin, in a grid-stride loop, so any array size
works with any grid. The host callers take 1-D (or C-contiguous, flattened here)
device arrays: numba ``DeviceNDArray``, or anything with
``__cuda_array_interface__`` (CuPy, torch CUDA tensors), viewed without a copy.
They cast scalars to the parameter's dtype, launch on the default stream and
return without synchronising; nothing is allocated beyond numba's launch
bookkeeping. Argument checks (shapes, dtypes, host arrays) belong to ``dispatch``.

Imported lazily, only when the ``cuda`` backend is used: never at
``import pserver.kernels``. Runs in numba's CUDA simulator when
``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported. Always imports
``numba.cuda`` (never ``numba_cuda.numba.cuda``, which breaks the simulator).

Differences from the CPU kernels: NVVM contracts ``a + b * c`` into FMAs where
it chooses, so results can differ from ``_cpu.py`` and the numpy reference in
the last bit (as the CPU kernels do); ``sqrt`` and division are IEEE-rounded
(no fastmath). Element-wise only, so the result does not depend on the grid.
"""

from __future__ import annotations

import warnings
from typing import Any

import numba
import numba.cuda
import numpy as np
from numba.core.errors import NumbaPerformanceWarning

# numba's CUDA API is built at import time (and swapped for the simulator's), so
# its names are opaque to a type checker
cuda: Any = numba.cuda
SIMULATED: bool = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))

# Launch geometry. On a GPU: up to 256 threads per block (a multiple of the warp,
# 32, so fewer for small arrays) and up to 32 blocks per multiprocessor; larger
# arrays are covered by the grid-stride loops. In the simulator every CUDA thread
# is a Python thread (~0.2 ms or more each), so the grid is kept tiny: blocks of
# at most 16 threads (multiples of 8), at most 4 of them, which also makes the
# tests walk the grid-stride loops many times.
THREAD_UNIT = 8 if SIMULATED else 32
MAX_THREADS = 16 if SIMULATED else 256
BLOCKS_PER_SM = 32
SIM_MAX_BLOCKS = 4

_state: dict[str, Any] = {}
_launches: dict[tuple[int, int, int], Any] = {}
_MAX_CACHED_LAUNCHES = 4096


def available() -> bool:
    """Whether kernels can run here: a CUDA GPU and driver, or the simulator."""
    if "available" not in _state:
        _state["available"] = bool(SIMULATED or cuda.is_available())
    return bool(_state["available"])


def _max_blocks() -> int:
    blocks = _state.get("max_blocks")
    if blocks is None:
        if SIMULATED:
            blocks = SIM_MAX_BLOCKS
        else:
            sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
            blocks = max(1, sms) * BLOCKS_PER_SM
        _state["max_blocks"] = blocks
    return int(blocks)


def geometry(n: int) -> tuple[int, int]:
    """(blocks, threads per block) for ``n`` elements (``n`` > 0)."""
    threads = min(MAX_THREADS, -(-n // THREAD_UNIT) * THREAD_UNIT)
    blocks = min((n + threads - 1) // threads, _max_blocks())
    return blocks, threads


def _launch(kernel: Any, n: int) -> Any:
    """``kernel`` configured for ``n`` elements. Real launch configurations are
    cached; numba's low-occupancy warning (a grid under 128 blocks, i.e. every
    small tensor) is silenced once, when a configuration is made."""
    blocks, threads = geometry(n)
    if SIMULATED:  # the simulator's kernel[...] configures the kernel object itself
        return kernel[blocks, threads]
    key = (id(kernel), blocks, threads)
    launch = _launches.get(key)
    if launch is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            launch = kernel[blocks, threads]
        if len(_launches) >= _MAX_CACHED_LAUNCHES:
            _launches.clear()
        _launches[key] = launch
    return launch


def as_device(a: Any) -> Any:
    """``a`` as a numba device array, without copying. Raises ``TypeError`` for
    anything that is not on the device (host arrays are ``dispatch``'s business)."""
    if getattr(a, "__cuda_ndarray__", False):
        return a
    if not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):
        if SIMULATED:
            raise TypeError("the CUDA simulator only runs numba's (simulated) device arrays")
        return cuda.as_cuda_array(a)
    raise TypeError(f"{type(a).__name__} is not a CUDA device array")


def flat(a: Any) -> Any:
    """A 1-D view of a C-contiguous device array (no copy; an empty array is
    returned as it is, since nothing is launched on it)."""
    a = as_device(a)
    if a.ndim == 1 or a.size == 0:
        return a
    if not a.is_c_contiguous():
        raise ValueError("device array must be C-contiguous")
    return a.reshape(a.size)


def to_device(host: np.ndarray[Any, Any]) -> Any:
    """A new device copy of a host array (allocates; synchronous)."""
    return cuda.to_device(host)


def empty(n: int, dtype: np.dtype[Any]) -> Any:
    """A new uninitialised 1-D device array (allocates)."""
    return cuda.device_array(n, dtype=dtype)


def synchronize() -> None:
    """Wait for every queued kernel on the device."""
    cuda.synchronize()


# -- kernels --------------------------------------------------------------------------
# The bodies mirror _cpu.py statement by statement; keep them in step.


@cuda.jit(device=True)  # small enough that NVVM inlines it
def _clip(x, c):  # type: ignore[no-untyped-def]
    if c > 0:
        if x > c:
            return c
        if x < -c:
            return -c
    return x


@cuda.jit(cache=True)
def _add(p, g):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i] = p[i] + g[i]


@cuda.jit(cache=True)
def _sum2(out, a, b):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit(cache=True)
def _assign(dst, src):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit(cache=True)
def _scale(p, factor):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i] = p[i] / factor


@cuda.jit(cache=True)
def _sgd(p, g, neg_lr, wd, clip):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = _clip(g[i], clip)
        if wd != 0:
            d = d + wd * p[i]
        p[i] = p[i] + neg_lr * d


@cuda.jit(cache=True)
def _sgd_momentum(p, g, buf, neg_lr, wd, momentum, keep, nesterov, first, clip):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = _clip(g[i], clip)
        if wd != 0:
            d = d + wd * p[i]
        b = d if first else momentum * buf[i] + keep * d
        buf[i] = b
        if nesterov:  # noqa: SIM108 (statement for statement as in _cpu.py)
            d = d + momentum * b
        else:
            d = b
        p[i] = p[i] + neg_lr * d


@cuda.jit(cache=True)
def _adam(p, g, m, v, vmax, neg_step_size, bc2_sqrt, w1, omw1, b2, w2, eps, wd, decay,  # type: ignore[no-untyped-def]
          amsgrad, clip):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = _clip(g[i], clip)
        pi = p[i] * decay  # decay is 1 - lr * weight_decay for AdamW, else 1
        if wd != 0:
            gi = gi + wd * pi
        mi = m[i]
        if w1 < 0.5:  # noqa: SIM108 (torch's lerp: exp_avg.lerp_(grad, 1 - beta1))
            mi = mi + w1 * (gi - mi)
        else:
            mi = gi - (gi - mi) * omw1  # 1 - w1 in p's dtype, as on the CPU
        vi = v[i] * b2 + w2 * gi * gi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = max(vi, vmax[i])
            vmax[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi + neg_step_size * (mi / denom)


@cuda.jit(cache=True)
def _adagrad(p, g, s, neg_clr, wd, eps, clip):  # type: ignore[no-untyped-def]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = _clip(g[i], clip)
        if wd != 0:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s[i] = si
        p[i] = p[i] + neg_clr * (gi / (np.sqrt(si) + eps))


# -- host callers ---------------------------------------------------------------------
# Same argument order as the _cpu.py kernels. Arrays: device arrays of equal size
# (checked by dispatch); scalars are cast to the parameter's dtype here.


def add(p: Any, g: Any) -> None:
    """``p += g``."""
    p, g = flat(p), flat(g)
    if p.size:
        _launch(_add, p.size)(p, g)


def sum2(out: Any, a: Any, b: Any) -> None:
    """``out = a + b`` (the first step of an aggregate: one pass instead of a copy
    and an add, with the same bits)."""
    out, a, b = flat(out), flat(a), flat(b)
    if out.size:
        _launch(_sum2, out.size)(out, a, b)


def assign(dst: Any, src: Any) -> None:
    """``dst[...] = src``, converting the element type (float16 to float32)."""
    dst, src = flat(dst), flat(src)
    if dst.size:
        _launch(_assign, dst.size)(dst, src)


def scale(p: Any, factor: float) -> None:
    """``p /= factor``."""
    p = flat(p)
    if p.size:
        _launch(_scale, p.size)(p, p.dtype.type(factor))


def sgd(p: Any, g: Any, neg_lr: float, wd: float, clip: float) -> None:
    """Plain SGD (no momentum): ``p += neg_lr * (clip(g) + wd * p)``."""
    p, g = flat(p), flat(g)
    if p.size:
        t = p.dtype.type
        _launch(_sgd, p.size)(p, g, t(neg_lr), t(wd), t(clip))


def sgd_momentum(p: Any, g: Any, buf: Any, neg_lr: float, wd: float, momentum: float,
                 keep: float, nesterov: bool, first: bool, clip: float) -> None:
    """SGD with a momentum buffer (``keep`` is ``1 - dampening``)."""
    p, g, buf = flat(p), flat(g), flat(buf)
    if p.size:
        t = p.dtype.type
        _launch(_sgd_momentum, p.size)(p, g, buf, t(neg_lr), t(wd), t(momentum), t(keep),
                                       bool(nesterov), bool(first), t(clip))


def adam(p: Any, g: Any, m: Any, v: Any, vmax: Any, neg_step_size: float, bc2_sqrt: float,
         w1: float, omw1: float, b2: float, w2: float, eps: float, wd: float, decay: float,
         amsgrad: bool, clip: float) -> None:
    """Adam / AdamW, one fused pass; ``vmax`` is read and written only with
    ``amsgrad`` (pass ``v`` otherwise)."""
    p, g, m, v, vmax = flat(p), flat(g), flat(m), flat(v), flat(vmax)
    if p.size:
        t = p.dtype.type
        _launch(_adam, p.size)(p, g, m, v, vmax, t(neg_step_size), t(bc2_sqrt), t(w1), t(omw1),
                               t(b2), t(w2), t(eps), t(wd), t(decay), bool(amsgrad), t(clip))


def adagrad(p: Any, g: Any, s: Any, neg_clr: float, wd: float, eps: float,
            clip: float) -> None:
    """Adagrad, one fused pass over the value, gradient and sum of squares."""
    p, g, s = flat(p), flat(g), flat(s)
    if p.size:
        t = p.dtype.type
        _launch(_adagrad, p.size)(p, g, s, t(neg_clr), t(wd), t(eps), t(clip))
