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


def to_bfloat16(src: Array, out: Array) -> None:
    """``out`` (uint16: the bits of bfloat16) = ``src`` (float32) rounded to nearest,
    ties to even; a NaN becomes the quiet NaN 0x7FC0 with its sign (as ml_dtypes)."""
    u = src.view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out[...] = np.where(nan, ((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0),
                        rounded).astype(np.uint16)


def from_bfloat16(src: Array, out: Array) -> None:
    """``out`` (float32) = ``src`` (uint16 bfloat16 bits) widened, exactly."""
    out.view(np.uint32)[...] = src.astype(np.uint32) << np.uint32(16)


def to_float16(src: Array, out: Array) -> None:
    """``out`` (uint16: the bits of float16) = ``src`` (float32) as numpy casts it."""
    with np.errstate(over="ignore", invalid="ignore"):
        out.view(np.float16)[...] = src


def from_float16(src: Array, out: Array) -> None:
    """``out`` (float32) = ``src`` (uint16 float16 bits) widened, exactly."""
    out[...] = src.view(np.float16)


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


# -- optimizer updates: torch.optim's formulas, written plainly -------------------------
# Scalars are cast to the parameter's dtype, as the fused kernels receive them.


def _clip(g: Array, clip: float) -> Array:
    return np.clip(g, -clip, clip) if clip > 0 else g


def aggregate(grads: list[Array], out: Array, mean: bool = False) -> None:
    """``out`` = the sum of ``grads`` added in list order (the mean when ``mean``)."""
    out[...] = grads[0]
    for g in grads[1:]:
        out += g
    if mean:
        out /= out.dtype.type(len(grads))


def sgd_step(param: Array, grad: Array, buf: Array | None, *, lr: float, weight_decay: float,
             momentum: float, dampening: float, nesterov: bool, first: bool,
             clip_value: float = 0.0) -> None:
    """torch.optim.SGD for one step; ``buf`` is the momentum buffer (None without)."""
    t = param.dtype.type
    d = _clip(grad.astype(param.dtype), clip_value)
    if weight_decay != 0:
        d = d + t(weight_decay) * param
    if momentum != 0:
        assert buf is not None
        buf[...] = d if first else t(momentum) * buf + t(1 - dampening) * d
        d = d + t(momentum) * buf if nesterov else buf.copy()
    param[...] = param + t(-lr) * d


def adam_step(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array,
              max_exp_avg_sq: Array | None, *, step: int, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, decoupled: bool,
              clip_value: float = 0.0) -> None:
    """torch.optim.Adam (``decoupled=False``) or AdamW (``True``) for step ``step``."""
    t = param.dtype.type
    g = _clip(grad.astype(param.dtype), clip_value)
    if decoupled:
        param[...] = param * t(1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + t(weight_decay) * param
    w1 = t(1 - beta1)
    if w1 < 0.5:
        exp_avg[...] = exp_avg + w1 * (g - exp_avg)
    else:
        exp_avg[...] = g - (g - exp_avg) * (t(1) - w1)
    exp_avg_sq[...] = exp_avg_sq * t(beta2) + t(1 - beta2) * g * g
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    bc1 = 1 - beta1**step
    bc2_sqrt = t(np.sqrt(1 - beta2**step))
    denom = np.sqrt(v) / bc2_sqrt + t(eps)
    param[...] = param + t(-lr / bc1) * (exp_avg / denom)


def adagrad_step(param: Array, grad: Array, state_sum: Array, *, step: int, lr: float,
                 lr_decay: float, weight_decay: float, eps: float,
                 clip_value: float = 0.0) -> None:
    """torch.optim.Adagrad for step ``step`` (1-based)."""
    t = param.dtype.type
    g = _clip(grad.astype(param.dtype), clip_value)
    if weight_decay != 0:
        g = g + t(weight_decay) * param
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum[...] = state_sum + g * g
    param[...] = param + t(-clr) * (g / (np.sqrt(state_sum) + t(eps)))


# --- row index, id dedup and segment sums (twins of kernels/_rowindex.pyx) ---


class RowIndexModel:
    """dict twin of the Cython ``RowIndex``: the meaning of slot assignment.

    A new id takes the most recently freed slot (LIFO free list) or else the next
    never-used slot, in the order ids first appear; deleted ids free their slots
    in input order."""

    def __init__(self) -> None:
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.num_slots = 0

    def __len__(self) -> int:
        return len(self.slot_of)

    def lookup(self, ids: Array) -> Array:
        """The slot of every id, -1 where absent."""
        return np.array([self.slot_of.get(i, -1) for i in ids.tolist()], dtype=np.int64)

    def lookup_or_insert(self, ids: Array) -> tuple[Array, Array]:
        """(slot of every id, input positions that created a row)."""
        slots: list[int] = []
        created: list[int] = []
        for pos, i in enumerate(ids.tolist()):
            slot = self.slot_of.get(i)
            if slot is None:
                if self.free:
                    slot = self.free.pop()
                else:
                    slot = self.num_slots
                    self.num_slots += 1
                self.slot_of[i] = slot
                created.append(pos)
            slots.append(slot)
        return np.array(slots, dtype=np.int64), np.array(created, dtype=np.int64)

    def delete(self, ids: Array) -> int:
        """Remove the ids present; return how many were removed."""
        removed = 0
        for i in ids.tolist():
            slot = self.slot_of.pop(i, None)
            if slot is not None:
                self.free.append(slot)
                removed += 1
        return removed

    def clear(self) -> None:
        """Forget every id and slot."""
        self.slot_of.clear()
        self.free.clear()
        self.num_slots = 0

    def items(self) -> tuple[Array, Array]:
        """(ids, slots) in increasing slot order."""
        pairs = sorted(self.slot_of.items(), key=lambda kv: kv[1])
        return (np.array([k for k, _ in pairs], dtype=np.uint64),
                np.array([v for _, v in pairs], dtype=np.int64))


def dedup_segments(ids: Array) -> tuple[Array, Array]:
    """(unique, inverse): the distinct ids in first-appearance order and, per
    position, the index of its id in ``unique`` (``unique[inverse] == ids``)."""
    _, first, inverse_sorted = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # sorted-unique index -> appearance rank
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return ids[first[order]].astype(np.uint64), rank[inverse_sorted.reshape(-1)].astype(np.int64)


def segment_sum(values: Array, inverse: Array, num_segments: int) -> Array:
    """``out[s]`` = sum of the rows ``values[i]`` with ``inverse[i] == s``, added in
    input order (``np.add.at`` is unbuffered and goes in index order)."""
    out = np.zeros((num_segments, values.shape[1]), dtype=values.dtype)
    np.add.at(out, inverse, values)
    return out
