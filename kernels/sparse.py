"""Row-sparse kernels for embedding tables, and deterministic row initializers.

Owns the operations on a table stored as a 2-D array ``values`` (one row per
slot, slots from the row index): each update changes only the rows named by
``slots`` (unique; repeated ids are summed by the caller first, see
``dedup_ids``/``segment_sum``) with ``torch.optim``'s rules, per-row step
counts in ``steps`` (already incremented by the caller). Gradients come as one
(len(slots), dim) array or as blocks of consecutive rows (a message's frames,
applied where they lie: one call checks the slots and computes per-row factors
once for all of them). ``cpu`` runs fused
numba loops (``_cpu.rows_*``), ``numpy`` a row-by-row reference built on
``reference.py``. Initial values depend only on (seed, row id, column), so
every replica creates the same row. Imports neither protocol, pserver nor
clients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import reference
from .dispatch import _cpu, default_backend
from .errors import KernelError

Array = np.ndarray[Any, Any]

INITIALIZERS = ("zeros", "uniform", "normal")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _check(values: Array, slots: Array, grads: Array | Sequence[Array]) -> list[Array]:
    """The gradient blocks (one array, or blocks of consecutive rows that together
    hold one row per slot) in ``values``' dtype, after checking the arguments."""
    if values.ndim != 2 or values.dtype not in _FLOATS or not values.flags.c_contiguous:
        raise KernelError("values must be a C-contiguous 2-D float32/float64 array")
    if slots.dtype != np.int64 or slots.ndim != 1:
        raise KernelError("slots must be a 1-D int64 array")
    blocks = [grads] if isinstance(grads, np.ndarray) else list(grads)
    if (sum(b.shape[0] for b in blocks) != slots.size
            or any(b.ndim != 2 or b.shape[1] != values.shape[1] for b in blocks)):
        got = ", ".join(str(b.shape) for b in blocks)
        raise KernelError(f"grads must have shape {(slots.size, values.shape[1])}, not {got}")
    if slots.size and (slots.min() < 0 or slots.max() >= values.shape[0]):
        raise KernelError("a slot lies outside values")
    return [np.ascontiguousarray(b, dtype=values.dtype) for b in blocks]


def _spans(blocks: list[Array]) -> Iterator[tuple[slice, Array]]:
    """Each block with the slice of ``slots`` (and per-row arrays) it pairs with."""
    at = 0
    for b in blocks:
        yield slice(at, at + b.shape[0]), b
        at += b.shape[0]


def join_blocks(blocks: Sequence[Array]) -> Array:
    """Blocks of consecutive rows as one array (the block itself when there is one)."""
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _state(name: str, a: Array | None, values: Array) -> Array:
    if a is None or a.shape != values.shape or a.dtype != values.dtype:
        raise KernelError(f"{name} must match values ({values.dtype}{list(values.shape)})")
    return a


def accumulate_rows(
    values: Array, slots: Array, grads: Array | Sequence[Array], *, backend: str | None = None
) -> None:
    """``values[slots[j]] += grads[j]``."""
    blocks = _check(values, slots, grads)
    if (backend or default_backend()) == "numpy":
        values[slots] += join_blocks(blocks)
        return
    for span, g in _spans(blocks):
        _cpu(g.size).rows_add(values, slots[span], g)


def sgd_rows(
    values: Array,
    slots: Array,
    grads: Array | Sequence[Array],
    steps: Array,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffer: Array | None = None,
    clip_value: float = 0.0,
    backend: str | None = None,
) -> None:
    """torch.optim.SGD on the named rows; a row's first step is ``steps[row] == 1``."""
    blocks = _check(values, slots, grads)
    buf = _state("momentum_buffer", momentum_buffer, values) if momentum != 0 else values
    if (backend or default_backend()) == "numpy":
        g = join_blocks(blocks)
        for j, r in enumerate(slots):
            reference.sgd_step(
                values[r],
                g[j],
                buf[r] if momentum != 0 else None,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                first=steps[r] == 1,
                clip_value=clip_value,
            )
        return
    t = values.dtype.type
    for span, g in _spans(blocks):
        _cpu(g.size).rows_sgd(
            values,
            buf,
            slots[span],
            g,
            steps,
            t(-lr),
            t(weight_decay),
            t(momentum),
            t(1 - dampening),
            nesterov,
            t(clip_value),
        )


def adam_rows(
    values: Array,
    slots: Array,
    grads: Array | Sequence[Array],
    steps: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    max_exp_avg_sq: Array | None = None,
    clip_value: float = 0.0,
    backend: str | None = None,
) -> None:
    """torch.optim.Adam (AdamW with ``decoupled``) on the named rows, each row with
    its own step count for the bias corrections."""
    blocks = _check(values, slots, grads)
    m, v = _state("exp_avg", exp_avg, values), _state("exp_avg_sq", exp_avg_sq, values)
    vmax = None if max_exp_avg_sq is None else _state("max_exp_avg_sq", max_exp_avg_sq, values)
    if (backend or default_backend()) == "numpy":
        g = join_blocks(blocks)
        for j, r in enumerate(slots):
            reference.adam_step(
                values[r],
                g[j],
                m[r],
                v[r],
                None if vmax is None else vmax[r],
                step=int(steps[r]),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                decoupled=decoupled,
                clip_value=clip_value,
            )
        return
    t = values.dtype.type
    row_steps = steps[slots].astype(np.float64)
    neg_step = (-lr / (1 - beta1**row_steps)).astype(values.dtype)
    bc2_sqrt = np.sqrt(1 - beta2**row_steps).astype(values.dtype)
    for span, g in _spans(blocks):
        _cpu(g.size).rows_adam(
            values,
            m,
            v,
            v if vmax is None else vmax,
            slots[span],
            g,
            neg_step[span],
            bc2_sqrt[span],
            t(1 - beta1),
            t(1) - t(1 - beta1),
            t(beta2),
            t(1 - beta2),
            t(eps),
            t(0 if decoupled else weight_decay),
            t(1 - lr * weight_decay) if decoupled else t(1),
            vmax is not None,
            t(clip_value),
        )


def adagrad_rows(
    values: Array,
    slots: Array,
    grads: Array | Sequence[Array],
    steps: Array,
    state_sum: Array,
    *,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    clip_value: float = 0.0,
    backend: str | None = None,
) -> None:
    """torch.optim.Adagrad on the named rows (the default for tables)."""
    blocks = _check(values, slots, grads)
    s = _state("state_sum", state_sum, values)
    if (backend or default_backend()) == "numpy":
        g = join_blocks(blocks)
        for j, r in enumerate(slots):
            reference.adagrad_step(
                values[r],
                g[j],
                s[r],
                step=int(steps[r]),
                lr=lr,
                lr_decay=lr_decay,
                weight_decay=weight_decay,
                eps=eps,
                clip_value=clip_value,
            )
        return
    t = values.dtype.type
    neg_clr = (-lr / (1 + (steps[slots] - 1) * lr_decay)).astype(values.dtype)
    for span, g in _spans(blocks):
        _cpu(g.size).rows_adagrad(values, s, slots[span], g, neg_clr[span], t(weight_decay),
                                  t(eps), t(clip_value))


def _uniform01(ids: Array, dim: int, seed: int, stream: int) -> Array:
    """(len(ids), dim) float64 in [0, 1), a pure function of (seed, id, column, stream)."""
    with np.errstate(over="ignore"):
        base = reference.hash_ids(ids.astype(np.uint64) ^ np.uint64(seed), 0)
        cols = np.arange(dim, dtype=np.uint64) * _GOLDEN + np.uint64(stream) * np.uint64(
            0xD1B54A32D192ED03
        )
        h = reference.hash_ids(base[:, None] + cols[None, :], 0)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def init_rows(out: Array, ids: Array, init: tuple[Any, ...], seed: int) -> None:
    """Write the initial value of each row id into ``out`` (len(ids) x dim):
    ``("zeros",)``, ``("uniform", a, b)`` or ``("normal", std)`` (mean 0)."""
    if out.ndim != 2 or out.shape[0] != ids.shape[0]:
        raise KernelError("out must have one row per id")
    kind = init[0]
    if kind == "zeros":
        out[...] = 0
    elif kind == "uniform":
        a, b = float(init[1]), float(init[2])
        out[...] = a + (b - a) * _uniform01(ids, out.shape[1], seed, 1)
    elif kind == "normal":
        std = float(init[1])
        u1 = _uniform01(ids, out.shape[1], seed, 2)
        u2 = _uniform01(ids, out.shape[1], seed, 3)
        out[...] = std * np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
    else:
        raise KernelError(f"initializer {kind!r} is not one of {INITIALIZERS}")
