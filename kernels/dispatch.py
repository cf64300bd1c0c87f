"""One public function per kernel operation; picks the backend.

Owns argument checking for kernels (shapes, dtypes, contiguity) and the choice
of backend. The dense update kernels run on numpy for now; the fused numba
CPU and numba-CUDA backends plug in here without changing callers. Row-id
hashing runs in the compiled Cython module. Imports neither protocol, pserver
nor clients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _hashing, reference
from .errors import KernelError

Array = np.ndarray[Any, Any]


def _check_pair(param: Array, grad: Array) -> None:
    if param.shape != grad.shape:
        raise KernelError(f"shape mismatch: param {param.shape}, grad {grad.shape}")
    if not param.flags.writeable:
        raise KernelError("param must be writeable")


def accumulate(param: Array, grad: Array) -> None:
    """``param += grad`` in place."""
    _check_pair(param, grad)
    reference.accumulate(param, grad)


def sgd(param: Array, grad: Array, lr: float, scratch: Array | None = None) -> None:
    """``param -= lr * grad`` in place (torch.optim.SGD without momentum).

    With ``scratch`` (a caller-owned 1-D array of the parameter's dtype) nothing is
    allocated: ``lr * grad`` goes to scratch-sized blocks that stay in cache. The
    result is bit-identical to the reference either way."""
    _check_pair(param, grad)
    if scratch is None or scratch.dtype != param.dtype or grad.dtype != param.dtype:
        reference.sgd(param, grad, lr)
        return
    lr_t = param.dtype.type(lr)
    p, g = param.reshape(-1), grad.reshape(-1)
    step = scratch.size
    for i in range(0, p.size, step):
        j = min(p.size, i + step)
        t = scratch[: j - i]
        np.multiply(g[i:j], lr_t, out=t)
        np.subtract(p[i:j], t, out=p[i:j])


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
