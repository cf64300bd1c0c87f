"""numpy reference implementations: the test oracle for every kernel.

Owns the plain-numpy meaning of each operation. Functions write into arrays
the caller owns. Imports numpy only (never numba).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def accumulate(param: Array, grad: Array) -> None:
    """``param += grad`` (the ``sum`` optimizer)."""
    np.add(param, grad, out=param, casting="same_kind")


def sgd(param: Array, grad: Array, lr: float) -> None:
    """``param -= lr * grad`` computed in the parameter's dtype."""
    param -= param.dtype.type(lr) * grad.astype(param.dtype, copy=False)


def hash_ids(ids: Array, seed: int) -> Array:
    """splitmix64(id + seed) of every uint64 id."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def partition_by_shard(ids: Array, seed: int, num_shards: int) -> tuple[Array, Array]:
    """(order, offsets): positions of ids grouped by shard, stable within a shard,
    and each shard's start in ``order``."""
    shards = (hash_ids(ids, seed) % np.uint64(num_shards)).astype(np.int64)
    order = np.argsort(shards, kind="stable").astype(np.int64)
    counts = np.bincount(shards, minlength=num_shards)
    offsets = np.zeros(num_shards + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets
