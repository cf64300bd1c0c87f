"""One public function per kernel operation; picks the backend.

Owns argument checking for kernels (shapes, dtypes, contiguity) and the choice
of backend: ``cpu`` runs the fused numba kernels of ``_cpu.py``, ``numpy`` the
reference of ``reference.py`` (the oracle; ``PSERVER_KERNELS=numpy``), ``cuda``
the numba-CUDA twins of ``_cuda.py`` (imported only when used; chosen by
``backend="cuda"``, ``PSERVER_KERNELS=cuda``, or a param that is a CUDA device
array). Update rules and hyperparameter names follow ``torch.optim``. Row-id hashing runs in
the compiled Cython module. Imports neither protocol, pserver nor clients.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _hashing, reference
from .errors import BackendUnavailable, KernelError

Array = np.ndarray[Any, Any]


BACKENDS = ("cpu", "numpy", "cuda")
ENV_BACKEND = "PSERVER_KERNELS"
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_SUM_GROUP = 8


def default_backend() -> str:
    """``cpu`` (fused numba kernels) unless ``PSERVER_KERNELS`` asks for ``numpy``
    (the reference) or ``cuda``; read at each call so tests can switch it. A param
    that is a CUDA device array goes to ``cuda`` whatever this says."""
    backend = os.environ.get(ENV_BACKEND, "cpu")
    if backend not in BACKENDS:
        raise KernelError(f"{ENV_BACKEND}={backend!r} is not one of {BACKENDS}")
    return backend


# Elements: smaller updates run single-threaded. Waking numba's idle threads costs
# ~60 us, so in a server (which sleeps between requests) a parallel sgd on 64K
# float32 took 85 us against 19 us serial, and broke even at 256K (81 us); at
# 1M elements it wins (250 against 355 us).
SERIAL_BELOW = 1 << 19


@functools.cache
def _cpu_module() -> Any:
    from . import _cpu as mod  # compiled lazily: importing numba costs ~0.5 s

    return mod


def _cpu(n: int = SERIAL_BELOW) -> Any:
    """The CPU kernels for an update of ``n`` elements: parallel ones, or their serial
    twins below ``SERIAL_BELOW`` (results are the same either way). The module is
    looked up once: a ``from . import`` per update cost ~1.5 us."""
    mod = _cpu_module()
    return mod if n >= SERIAL_BELOW else mod.SERIAL


def _cuda() -> Any:
    """The CUDA kernels (``_cuda.py``), imported on first use; ``BackendUnavailable``
    where no CUDA GPU (nor numba's simulator) can run them."""
    try:
        from . import _cuda as mod
    except ImportError as exc:  # a numba without its CUDA target
        raise BackendUnavailable(f"the cuda backend needs numba's CUDA target: {exc}") from exc
    if not mod.available():
        raise BackendUnavailable(
            "the cuda backend needs a CUDA GPU and driver, and numba.cuda.is_available() is "
            "False on this machine; use the cpu backend instead, or set "
            "NUMBA_ENABLE_CUDASIM=1 before numba is imported to run the CUDA kernels in "
            "numba's simulator")
    return mod


def _is_device(a: object) -> bool:
    """Whether ``a`` is a CUDA device array: numba's (or its simulator's) or any
    object with ``__cuda_array_interface__``; a numpy array never is."""
    if isinstance(a, np.ndarray):
        return False
    return bool(getattr(a, "__cuda_ndarray__", False)) or hasattr(a, "__cuda_array_interface__")


def _choose(backend: str | None, param: object) -> str:
    """The backend of one call: ``backend`` when given, ``cuda`` for a param on the
    device, else ``default_backend()``."""
    if not backend:
        return "cuda" if _is_device(param) else default_backend()
    if backend not in BACKENDS:
        raise KernelError(f"backend {backend!r} is not one of {BACKENDS}")
    return backend


class _OnDevice:
    """The arrays of one ``cuda``-backend call, checked and made 1-D device arrays.

    Device arrays are viewed in place (no copy). numpy arrays are accepted too:
    each is copied to the device for the call (an allocation and a transfer), and
    those the kernel writes are copied back by ``finish``, which then waits for
    the device. With device arrays only, the kernels are queued on the default
    stream and ``finish`` returns at once. ``param`` is checked first and fixes the
    shape and dtype every other array must match."""

    def __init__(self, name: str, param: Any) -> None:
        self.kernels = _cuda()
        self._back: list[tuple[Any, Array]] = []
        self._shape: tuple[int, ...] | None = None
        self.param = self._array(name, param, written=True)
        self.dtype = np.dtype(self.param.dtype)
        if self.dtype not in _FLOATS:
            raise KernelError(f"the cuda backend takes float32 or float64 params, not {self.dtype}")

    def _array(self, name: str, a: Any, *, written: bool) -> Any:
        if isinstance(a, np.ndarray):
            h, shape = _flat(name, a), a.shape
            if self._shape is not None and a.shape != self._shape:
                raise KernelError(f"shape mismatch: {name} {a.shape}, param {self._shape}")
            if written and not a.flags.writeable:
                raise KernelError(f"{name} must be writeable")
            d = self.kernels.to_device(h)
            if written:
                self._back.append((d, h))
        elif _is_device(a):
            try:
                d = self.kernels.as_device(a)
            except TypeError as exc:
                raise KernelError(f"{name}: {exc}") from exc
            if self._shape is not None and tuple(d.shape) != self._shape:
                raise KernelError(f"shape mismatch: {name} {tuple(d.shape)}, param {self._shape}")
            if not d.is_c_contiguous():
                raise KernelError(f"{name} must be C-contiguous")
            shape = tuple(d.shape)
            if d.ndim != 1 and d.size:
                d = d.reshape(d.size)
        else:
            raise KernelError(f"{name} must be a CUDA device array or a numpy array")
        if self._shape is None:
            self._shape = shape
        return d

    def grad(self, grad: Any, name: str = "grad") -> Any:
        """The gradient in the param's dtype (a float16 gradient is widened into a
        new device array: the one case that allocates on the device; a bfloat16 one,
        which only comes from the wire in host memory, is widened on the host)."""
        if isinstance(grad, np.ndarray) and _is_bf16(grad.dtype) and self.dtype in _FLOATS:
            grad = _widen(_flat(name, grad), self.dtype)
        g = self._array(name, grad, written=False)
        gd = np.dtype(g.dtype)
        if gd != self.dtype:
            if gd != np.float16:
                raise KernelError(f"{name} dtype {gd} does not fit param dtype {self.dtype}")
            wide = self.kernels.empty(g.size, self.dtype)
            self.kernels.assign(wide, g)
            g = wide
        return g

    def state(self, name: str, a: Any) -> Any:
        """An optimizer state array: required, written, the param's dtype."""
        if a is None:
            raise KernelError(f"{name} is required")
        s = self._array(name, a, written=True)
        if np.dtype(s.dtype) != self.dtype:
            raise KernelError(f"{name} must be a writeable {self.dtype} array")
        return s

    def finish(self) -> None:
        """Copy the written host arrays back (waits for the device); a no-op when
        every array was on the device."""
        for d, h in self._back:
            d.copy_to_host(h)


def _flat(name: str, a: Array, like: Array | None = None) -> Array:
    if not isinstance(a, np.ndarray):
        raise KernelError(f"{name} must be a numpy array"
                          + (" (it is a CUDA device array: use backend='cuda')"
                             if _is_device(a) else ""))
    if like is not None and a.shape != like.shape:
        raise KernelError(f"shape mismatch: {name} {a.shape}, param {like.shape}")
    if not a.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    return a.reshape(-1)


def _param(param: Array) -> Array:
    p = _flat("param", param)  # first: a non-array has no dtype to check
    if p.dtype.kind not in "fiu":
        raise KernelError(f"param dtype {p.dtype} is not supported")
    if not p.flags.writeable:
        raise KernelError("param must be writeable")
    return p


def _grad(grad: Array, param: Array) -> Array:
    """The gradient as the parameter's dtype (float16 and bfloat16 gradients into
    float32 or float64 params are widened; this is the one case that allocates)."""
    g = _flat("grad", grad, param)
    if g.dtype != param.dtype:
        if not (_is_half(g.dtype) and param.dtype in _FLOATS):
            raise KernelError(f"grad dtype {g.dtype} does not fit param dtype {param.dtype}")
        g = _widen(g, param.dtype)
    return g


def _widen(g: Array, dtype: np.dtype[Any]) -> Array:
    """A flat float16 or bfloat16 gradient as a new array of ``dtype`` (a float)."""
    if dtype == np.float32:
        cast = from_bfloat16 if _is_bf16(g.dtype) else from_float16
        return cast(g, np.empty(g.size, np.float32))
    return g.astype(dtype)


def _is_bf16(dtype: np.dtype[Any]) -> bool:
    """bfloat16 (ml_dtypes' type, which kernels never import)."""
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def _is_half(dtype: np.dtype[Any]) -> bool:
    return dtype == np.float16 or _is_bf16(dtype)


def _read_only(a: Array) -> Array:
    """``a``, or a read-only view of it: numba types a tuple of arrays that differ only
    in writeability as heterogeneous and cannot index it in a loop, so ``aggregate``
    hands its kernel read-only arrays only (gradients in received frames are, a
    widened float16 gradient or a caller's array is not)."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _state(name: str, a: Array | None, param: Array) -> Array:
    if a is None:
        raise KernelError(f"{name} is required")
    s = _flat(name, a, param)
    if s.dtype != param.dtype or not s.flags.writeable:
        raise KernelError(f"{name} must be a writeable {param.dtype} array")
    return s


def accumulate(param: Array, grad: Array, *, backend: str | None = None) -> None:
    """``param += grad`` in place (the ``sum`` optimizer)."""
    chosen = _choose(backend, param)
    if chosen == "cuda":
        dev = _OnDevice("param", param)
        dev.kernels.add(dev.param, dev.grad(grad))
        dev.finish()
        return
    p, g = _param(param), _grad(grad, param)
    if chosen == "numpy" or p.dtype not in _FLOATS:
        reference.accumulate(p, g)
    else:
        _cpu(p.size).add(p, g)


def aggregate(grads: Sequence[Array], out: Array, *, mean: bool = False,
              backend: str | None = None) -> None:
    """``out`` = the sum of ``grads`` added in the given order (their mean when
    ``mean``): deterministic for a fixed order. float16 and bfloat16 gradients are
    widened to ``out``'s dtype first; bfloat16 ones into float32 as they are read,
    without a widened copy (the same bits)."""
    if not grads:
        raise KernelError("aggregate needs at least one gradient")
    chosen = _choose(backend, out)
    if chosen == "cuda":
        _aggregate_cuda(grads, out, mean)
        return
    o = _param(out)
    if chosen == "cpu" and o.dtype == np.float32 \
            and all(isinstance(g, np.ndarray) and _is_bf16(g.dtype) for g in grads):
        bits = [_read_only(_flat(f"grads[{i}]", g, out).view(np.uint16))
                for i, g in enumerate(grads)]
        _sum_groups(_cpu(o.size).sum_bf16_into, o, bits, mean)
        return
    gs = [_read_only(_grad(g, out)) for g in grads]
    if chosen == "numpy" or o.dtype not in _FLOATS:
        reference.aggregate(gs, o, mean)
        return
    _sum_groups(_cpu(o.size).sum_into, o, gs, mean)


def _sum_groups(kernel: Any, o: Array, gs: Sequence[Array], mean: bool) -> None:
    """One fused pass per group of up to 8 gradients (each group compiles once per
    size); the additions stay in list order, so the bits equal the reference's."""
    t = o.dtype.type
    for start in range(0, len(gs), _SUM_GROUP):
        last = start + _SUM_GROUP >= len(gs)
        kernel(o, tuple(gs[start:start + _SUM_GROUP]), start == 0,
               t(len(gs)) if mean and last else t(1))


def _aggregate_cuda(grads: Sequence[Any], out: Any, mean: bool) -> None:
    """``aggregate`` on the device: ``out = g0 + g1`` in one pass, then ``+= g``
    for the rest in order (the same bits as the CPU kernels), ``/= W`` for the mean."""
    dev = _OnDevice("out", out)
    gs = [dev.grad(g, f"grads[{i}]") for i, g in enumerate(grads)]
    cu, o = dev.kernels, dev.param
    if len(gs) == 1:
        cu.assign(o, gs[0])
    else:
        cu.sum2(o, gs[0], gs[1])
        for g in gs[2:]:
            cu.add(o, g)
    if mean:
        cu.scale(o, len(gs))
    dev.finish()


def sgd(param: Array, grad: Array, *, lr: float, weight_decay: float = 0.0,
        momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        momentum_buffer: Array | None = None, first: bool = True, clip_value: float = 0.0,
        backend: str | None = None) -> None:
    """One torch.optim.SGD step in place. With ``momentum`` the caller owns
    ``momentum_buffer`` (``first`` on the first step, when it is initialised from
    the gradient). ``clip_value`` > 0 clips each gradient element first."""
    chosen = _choose(backend, param)
    dev = _OnDevice("param", param) if chosen == "cuda" else None
    if dev is not None:
        p, g, kern = dev.param, dev.grad(grad), dev.kernels
        buf = dev.state("momentum_buffer", momentum_buffer) if momentum != 0 else None
    else:
        p, g = _param(param), _grad(grad, param)
        buf = _state("momentum_buffer", momentum_buffer, param) if momentum != 0 else None
        if chosen == "numpy":
            reference.sgd_step(p, g, buf, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               dampening=dampening, nesterov=nesterov, first=first,
                               clip_value=clip_value)
            return
        kern = _cpu(p.size)
    t = p.dtype.type
    if buf is None:
        kern.sgd(p, g, t(-lr), t(weight_decay), t(clip_value))
    else:
        kern.sgd_momentum(p, g, buf, t(-lr), t(weight_decay), t(momentum),
                          t(1 - dampening), nesterov, first, t(clip_value))
    if dev is not None:
        dev.finish()


def adam(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, *, step: int,
         lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, decoupled: bool = False,
         max_exp_avg_sq: Array | None = None, clip_value: float = 0.0,
         backend: str | None = None) -> None:
    """One torch.optim.Adam step (AdamW with ``decoupled``), step counted from 1.
    ``max_exp_avg_sq`` given means amsgrad."""
    if step < 1:
        raise KernelError("step counts from 1")
    chosen = _choose(backend, param)
    dev = _OnDevice("param", param) if chosen == "cuda" else None
    if dev is not None:
        p, g, kern = dev.param, dev.grad(grad), dev.kernels
        m, v = dev.state("exp_avg", exp_avg), dev.state("exp_avg_sq", exp_avg_sq)
        vmax = None if max_exp_avg_sq is None else dev.state("max_exp_avg_sq", max_exp_avg_sq)
    else:
        p, g = _param(param), _grad(grad, param)
        m, v = _state("exp_avg", exp_avg, param), _state("exp_avg_sq", exp_avg_sq, param)
        vmax = (None if max_exp_avg_sq is None
                else _state("max_exp_avg_sq", max_exp_avg_sq, param))
        if chosen == "numpy":
            reference.adam_step(p, g, m, v, vmax, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                                clip_value=clip_value)
            return
        kern = _cpu(p.size)
    t = p.dtype.type
    bc1, w1 = 1 - beta1**step, t(1 - beta1)
    if dev is None and vmax is None and weight_decay == 0 and clip_value == 0:
        kern.adam_plain(p, g, m, v, t(-lr / bc1), t(np.sqrt(1 - beta2**step)), w1, t(1) - w1,
                        t(beta2), t(1 - beta2), t(eps))
    else:
        kern.adam(p, g, m, v, v if vmax is None else vmax, t(-lr / bc1),
                  t(np.sqrt(1 - beta2**step)), w1, t(1) - w1, t(beta2), t(1 - beta2), t(eps),
                  t(0 if decoupled else weight_decay),
                  t(1 - lr * weight_decay) if decoupled else t(1), vmax is not None,
                  t(clip_value))
    if dev is not None:
        dev.finish()


def adagrad(param: Array, grad: Array, state_sum: Array, *, step: int, lr: float,
            lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
            clip_value: float = 0.0, backend: str | None = None) -> None:
    """One torch.optim.Adagrad step, step counted from 1; the caller owns
    ``state_sum`` (initialised to ``initial_accumulator_value``)."""
    if step < 1:
        raise KernelError("step counts from 1")
    chosen = _choose(backend, param)
    dev = _OnDevice("param", param) if chosen == "cuda" else None
    if dev is not None:
        p, g, kern = dev.param, dev.grad(grad), dev.kernels
        s = dev.state("state_sum", state_sum)
    else:
        p, g = _param(param), _grad(grad, param)
        s = _state("state_sum", state_sum, param)
        if chosen == "numpy":
            reference.adagrad_step(p, g, s, step=step, lr=lr, lr_decay=lr_decay,
                                   weight_decay=weight_decay, eps=eps, clip_value=clip_value)
            return
        kern = _cpu(p.size)
    t = p.dtype.type
    clr = lr / (1 + (step - 1) * lr_decay)
    kern.adagrad(p, g, s, t(-clr), t(weight_decay), t(eps), t(clip_value))
    if dev is not None:
        dev.finish()


def _half_bits(name: str, a: Array, half: str, n: int, writeable: bool = False) -> Array:
    """``a`` (``half``, i.e. bfloat16 or float16, or uint16; C-contiguous; ``n``
    elements) as flat uint16 bits."""
    b = _flat(name, a)
    if b.dtype.itemsize != 2 or b.dtype.name not in (half, "uint16"):
        raise KernelError(f"{name} must be a {half} (or uint16) array, not {b.dtype}")
    if b.size != n:
        raise KernelError(f"size mismatch: {name} has {b.size} elements, expected {n}")
    if writeable and not b.flags.writeable:
        raise KernelError(f"{name} must be writeable")
    return b.view(np.uint16)


def _f32(name: str, a: Array, writeable: bool = False) -> Array:
    f = _flat(name, a)
    if f.dtype != np.float32:
        raise KernelError(f"{name} must be float32, not {f.dtype}")
    if writeable and not f.flags.writeable:
        raise KernelError(f"{name} must be writeable")
    return f


# The casts of wire data always run the serial kernels: one core nearly reaches memory
# bandwidth here (bfloat16, 64 MiB: 5.3-5.8 ms serial, 4.2-4.4 ms on two threads), and
# they run in clients and shards that share the cores, one frame at a time (parallel,
# a sync step of two workers took twice as long). They cast host memory: the ``cuda``
# backend runs them on the CPU too.


def _narrow(half: str, src: Array, out: Array, backend: str | None) -> Array:
    s = _f32("src", src)
    bits = _half_bits("out", out, half, s.size, writeable=True)
    kernel = "to_" + half
    if _choose(backend, src) == "numpy":
        getattr(reference, kernel)(s, bits)
    else:
        getattr(_cpu(0), kernel)(s.view(np.uint32), bits)
    return out


def _widen_into(half: str, src: Array, out: Array, backend: str | None) -> Array:
    f = _f32("out", out, writeable=True)
    bits = _half_bits("src", src, half, f.size)
    kernel = "from_" + half
    if _choose(backend, out) == "numpy":
        getattr(reference, kernel)(bits, f)
    else:
        getattr(_cpu(0), kernel)(bits, f.view(np.uint32))
    return out


def to_bfloat16(src: Array, out: Array, *, backend: str | None = None) -> Array:
    """``out[:] = src`` cast from float32 to bfloat16 (``out`` bfloat16 or uint16 bits,
    same size), rounded to nearest with ties to even, bit for bit as
    ``src.astype(ml_dtypes.bfloat16)``; returns ``out``. 2-3x faster than that cast."""
    return _narrow("bfloat16", src, out, backend)


def from_bfloat16(src: Array, out: Array, *, backend: str | None = None) -> Array:
    """``out[:] = src`` widened from bfloat16 (or its uint16 bits) to float32, exactly;
    returns ``out``."""
    return _widen_into("bfloat16", src, out, backend)


def to_float16(src: Array, out: Array, *, backend: str | None = None) -> Array:
    """``out[:] = src`` cast from float32 to float16 (``out`` float16 or uint16 bits,
    same size), bit for bit as ``src.astype(np.float16)`` (overflow gives inf, without
    numpy's warning); returns ``out``. About 4x faster than numpy's cast."""
    return _narrow("float16", src, out, backend)


def from_float16(src: Array, out: Array, *, backend: str | None = None) -> Array:
    """``out[:] = src`` widened from float16 (or its uint16 bits) to float32, exactly;
    returns ``out``. About 4x faster than numpy's cast."""
    return _widen_into("float16", src, out, backend)


def _as_ids(ids: Array) -> Array:
    if ids.dtype == np.int64:
        ids = ids.view(np.uint64)
    if ids.dtype != np.uint64 or ids.ndim != 1:
        raise KernelError(f"ids must be a 1-D uint64 (or int64) array, got {ids.dtype} {ids.shape}")
    return np.ascontiguousarray(ids)


def shard_of_ids(ids: Array, seed: int, num_shards: int, out: Array | None = None) -> Array:
    """The shard of every row id (splitmix64 hash modulo ``num_shards``)."""
    ids = _as_ids(ids)
    if num_shards <= 0:
        raise KernelError("num_shards must be positive")
    if out is None:
        out = np.empty(ids.shape[0], dtype=np.int64)
    elif out.shape != ids.shape or out.dtype != np.int64:
        raise KernelError(f"out must be int64 of shape {ids.shape}")
    _hashing.shard_of_ids(ids, seed, num_shards, out)
    return out


def partition_by_shard(ids: Array, seed: int, num_shards: int) -> tuple[Array, Array]:
    """(order, offsets): ids grouped by shard, stable; shard s owns
    ``ids[order[offsets[s]:offsets[s + 1]]]``."""
    ids = _as_ids(ids)
    if num_shards <= 0:
        raise KernelError("num_shards must be positive")
    order = np.empty(ids.shape[0], dtype=np.int64)
    offsets = np.empty(num_shards + 1, dtype=np.int64)
    _hashing.partition_by_shard(ids, seed, num_shards, order, offsets)
    return order, offsets


def _row_bytes(name: str, a: Array, writeable: bool = False) -> Array:
    """``a`` (2-D, C-contiguous) viewed as rows of bytes."""
    if not isinstance(a, np.ndarray) or a.ndim != 2 or not a.flags.c_contiguous:
        raise KernelError(f"{name} must be a 2-D C-contiguous array")
    if writeable and not a.flags.writeable:
        raise KernelError(f"{name} must be writeable")
    return a.view(np.uint8).reshape(a.shape[0], a.shape[1] * a.itemsize)


def _positions(pos: Array) -> Array:
    if not isinstance(pos, np.ndarray) or pos.dtype != np.int64 or pos.ndim != 1:
        raise KernelError("positions must be a 1-D int64 array")
    return np.ascontiguousarray(pos)


def gather_rows(src: Array, pos: Array, out: Array | None = None) -> Array:
    """``out[j] = src[pos[j]]`` (``np.take(src, pos, axis=0)``) with one memcpy per
    row, without the GIL; ``out`` (len(pos), src.shape[1]) of src's dtype is made
    when not given. KernelError for a position outside ``src``."""
    pos = _positions(pos)
    if out is None:
        out = np.empty((pos.shape[0], *src.shape[1:]), src.dtype)
    if out.dtype != src.dtype or out.shape != (pos.shape[0], *src.shape[1:]):
        raise KernelError(f"out must be {src.dtype}{[pos.shape[0], *src.shape[1:]]}")
    try:
        _hashing.gather_rows(_row_bytes("src", src), pos, _row_bytes("out", out, True))
    except (IndexError, ValueError) as exc:
        raise KernelError(str(exc)) from None
    return out


def scatter_rows(out: Array, pos: Array, src: Array) -> None:
    """``out[pos[j]] = src[j]`` (``out[pos] = src`` for distinct positions) with one
    memcpy per row, without the GIL. KernelError for a position outside ``out``."""
    pos = _positions(pos)
    if out.dtype != src.dtype or src.shape != (pos.shape[0], *out.shape[1:]):
        raise KernelError(f"src must be {out.dtype}{[pos.shape[0], *out.shape[1:]]}")
    try:
        _hashing.scatter_rows(_row_bytes("out", out, True), pos, _row_bytes("src", src))
    except (IndexError, ValueError) as exc:
        raise KernelError(str(exc)) from None


# --- row index, id dedup and segment sums (Cython, kernels/_rowindex.pyx) ---------------
# Appended as one block; the import can join the others at the top when this settles.

from . import _rowindex  # noqa: E402


def _i64_out(name: str, out: Array | None, n: int) -> Array:
    if out is None:
        return np.empty(n, dtype=np.int64)
    if (not isinstance(out, np.ndarray) or out.dtype != np.int64 or out.shape != (n,)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise KernelError(f"{name} must be a writeable C-contiguous int64 array of shape ({n},)")
    return out


class RowIndex:
    """uint64 row id -> int64 row slot, checked in front of the Cython table.

    Slots are deterministic: a new id takes the most recently freed slot, else
    the next never-used one, in the order ids first appear; so replicas that
    apply the same batches get the same slots whatever their capacity. Ids are
    1-D uint64 (int64 is read as its bits); bad arguments raise ``KernelError``.
    Methods write into ``out`` arrays when given and allocate them otherwise.
    """

    __slots__ = ("_index",)

    def __init__(self, capacity_hint: int = 0) -> None:
        if capacity_hint < 0:
            raise KernelError("capacity_hint must be >= 0")
        self._index = _rowindex.RowIndex(capacity_hint)

    def lookup(self, ids: Array, out: Array | None = None) -> Array:
        """The slot of every id, -1 where absent."""
        ids = _as_ids(ids)
        out = _i64_out("out", out, ids.shape[0])
        self._index.lookup(ids, out)
        return out

    def lookup_or_insert(self, ids: Array, out: Array | None = None,
                         created: Array | None = None) -> tuple[Array, Array]:
        """(slots, created positions): the slot of every id, inserting the absent
        ones, and the input positions that created a row (first occurrences of
        new ids, in order; a view of ``created`` when given, len(ids) long)."""
        ids = _as_ids(ids)
        n = ids.shape[0]
        out = _i64_out("out", out, n)
        created = _i64_out("created", created, n)
        made = self._index.lookup_or_insert(ids, out, created)
        return out, created[:made]

    def delete(self, ids: Array) -> int:
        """Remove the ids (absent ones are ignored); return how many were removed.
        Their slots are freed in input order and reused last freed first."""
        return self._index.delete(_as_ids(ids))

    def reserve(self, n: int) -> None:
        """Grow now so that ``n`` ids fit without growing again."""
        if n < 0:
            raise KernelError("n must be >= 0")
        self._index.reserve(n)

    def clear(self) -> None:
        """Remove every id and forget every slot (the capacity is kept)."""
        self._index.clear()

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return repr(self._index)

    @property
    def capacity(self) -> int:
        """Number of hash buckets (a power of two, at most 0.7 used)."""
        return self._index.capacity

    @property
    def num_slots(self) -> int:
        """Slots ever handed out: the number of rows the caller's storage needs."""
        return self._index.num_slots

    def items(self) -> tuple[Array, Array]:
        """(ids, slots) held, in increasing slot order (a snapshot)."""
        return self._index.items()

    def ids(self) -> Array:
        """The ids held (uint64), in increasing slot order."""
        return self._index.ids()

    def slots(self) -> Array:
        """The slots in use (int64), increasing; pairs with ``ids()``."""
        return self._index.slots()

    def free_slots(self) -> Array:
        """The free list (int64), oldest first; the last one is reused next."""
        return self._index.free_slots()

    def restore(self, ids: Array, slots: Array, num_slots: int, free_slots: Array) -> None:
        """Load a snapshot (``items()``, ``num_slots``, ``free_slots()``) so later
        inserts assign the slots the snapshotted index would have assigned."""
        ids = _as_ids(ids)
        slots = np.ascontiguousarray(slots)
        free = np.ascontiguousarray(free_slots)
        for name, a in (("slots", slots), ("free_slots", free)):
            if a.dtype != np.int64 or a.ndim != 1:
                raise KernelError(f"{name} must be a 1-D int64 array")
        try:
            self._index.restore(ids, slots, num_slots, free)
        except ValueError as exc:
            raise KernelError(str(exc)) from exc


def new_row_index(capacity_hint: int = 0) -> RowIndex:
    """An empty row index sized for ``capacity_hint`` ids (it grows past that)."""
    return RowIndex(capacity_hint)


def dedup_ids(ids: Array, *, inverse: Array | None = None, unique: Array | None = None,
              scratch: RowIndex | None = None) -> tuple[Array, Array]:
    """(unique, inverse): the distinct ids in first-appearance order (uint64) and,
    per position, the index of its id in ``unique`` (``unique[inverse] == ids``).

    ``inverse`` and ``unique`` (int64 and uint64, len(ids)) receive the results
    when given; ``unique`` is then returned as a view of its first k entries.
    ``scratch``, a ``RowIndex`` kept by the caller, is cleared and used as the
    hash table, so nothing is allocated per call."""
    ids = _as_ids(ids)
    n = ids.shape[0]
    inverse = _i64_out("inverse", inverse, n)
    if unique is None:
        unique = np.empty(n, dtype=np.uint64)
    elif (not isinstance(unique, np.ndarray) or unique.dtype != np.uint64
          or unique.shape != (n,) or not unique.flags.c_contiguous
          or not unique.flags.writeable):
        raise KernelError(f"unique must be a writeable C-contiguous uint64 array of shape ({n},)")
    table = None if scratch is None else scratch._index
    k = _rowindex.dedup_segments(ids, inverse, unique, table)
    return unique[:k], inverse


def has_repeats(slots: Array, marks: Array) -> bool:
    """True when a value occurs twice in ``slots`` (1-D int64): whether a push that
    the row index mapped to ``slots`` named a row twice. ``marks`` is the caller's
    zeroed uint8 scratch, longer than the largest slot, and is zero again after
    the call. ``KernelError`` for a slot outside it."""
    if not isinstance(slots, np.ndarray) or slots.dtype != np.int64 or slots.ndim != 1:
        raise KernelError("slots must be a 1-D int64 array")
    if (not isinstance(marks, np.ndarray) or marks.dtype != np.uint8 or marks.ndim != 1
            or not marks.flags.c_contiguous or not marks.flags.writeable):
        raise KernelError("marks must be a writeable C-contiguous 1-D uint8 array")
    try:
        return bool(_rowindex.has_repeats(np.ascontiguousarray(slots), marks))
    except ValueError as exc:
        raise KernelError(str(exc)) from exc


def segment_sum(values: Array, inverse: Array, num_segments: int,
                out: Array | None = None) -> Array:
    """``out[s]`` = the sum of the rows ``values[i]`` with ``inverse[i] == s``.

    The rows are added in input order, so repeated ids in one push sum to the
    same bits on every run and replica. ``values`` is 2-D C-contiguous float32
    or float64; ``inverse`` 1-D int64 with one entry per row, each in
    [0, num_segments); ``out`` (num_segments, dim) of the same dtype is
    overwritten (rows no input maps to become zeros) and returned."""
    if not isinstance(values, np.ndarray) or values.ndim != 2 or values.dtype not in _FLOATS:
        raise KernelError("values must be a 2-D float32 or float64 array")
    if not values.flags.c_contiguous:
        raise KernelError("values must be C-contiguous")
    if (not isinstance(inverse, np.ndarray) or inverse.dtype != np.int64
            or inverse.shape != (values.shape[0],)):
        raise KernelError(f"inverse must be int64 of shape ({values.shape[0]},)")
    if num_segments < 0:
        raise KernelError("num_segments must be >= 0")
    shape = (num_segments, values.shape[1])
    if out is None:
        out = np.empty(shape, dtype=values.dtype)
    elif (not isinstance(out, np.ndarray) or out.dtype != values.dtype or out.shape != shape
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise KernelError(f"out must be a writeable C-contiguous {values.dtype} array of "
                          f"shape {shape}")
    try:
        _rowindex.segment_sum(values, np.ascontiguousarray(inverse), out)
    except ValueError as exc:
        raise KernelError(str(exc)) from exc
    return out
