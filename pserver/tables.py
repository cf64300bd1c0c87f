"""Sparse embedding tables: rows by uint64 id, created on first push.

Owns one table's rows on one shard: the Cython row index (id -> slot), the
row storage and the optimizer state (one row per slot, grown by doubling), the
per-row step counts, and the deterministic initial value of rows never pushed
(a pure function of the table's seed and the row id, so every replica creates
the same row and a pull of an unknown id needs no write). A push sums repeated
ids in input order, then applies the table's row-sparse optimizer (default
``adagrad``). No sockets, threads or clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from pserver.kernels import (
    dedup_ids,
    gather_rows,
    has_repeats,
    new_row_index,
    segment_sum,
    sparse,
)
from pserver.protocol.errors import InvalidArgument, ShapeMismatch

from .optim import OptimizerSpec

Array = np.ndarray[Any, Any]

DEFAULT_TABLE_OPTIMIZER: dict[str, Any] = {"name": "adagrad", "lr": 0.01}
MAX_DIM = 1 << 16
_INITIAL_ROWS = 1024


def parse_init(raw: Any) -> tuple[Any, ...]:
    """``("zeros",)``, ``("uniform", a, b)`` with a < b, or ``("normal", std)``."""
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidArgument(f"init must be a tuple such as ('normal', 0.01), not {raw!r}")
    kind, *args = raw
    shapes = {"zeros": 0, "uniform": 2, "normal": 1}
    if not isinstance(kind, str) or kind not in shapes or len(args) != shapes[kind]:
        raise InvalidArgument(
            "init must be ('zeros',), ('uniform', a, b) or ('normal', std), not " f"{raw!r}")
    nums = []
    for a in args:
        if isinstance(a, bool) or not isinstance(a, int | float) or not np.isfinite(a):
            raise InvalidArgument(f"init arguments must be finite numbers: {raw!r}")
        nums.append(float(a))
    if kind == "uniform" and not nums[0] < nums[1]:
        raise InvalidArgument("uniform(a, b) needs a < b")
    if kind == "normal" and nums[0] < 0:
        raise InvalidArgument("normal(std) needs std >= 0")
    return (kind, *nums)


@dataclass(frozen=True)
class TableSpec:
    """What defines a table: creating it again with the same spec is a no-op."""

    name: str
    dim: int
    dtype: str
    optimizer: OptimizerSpec
    init: tuple[Any, ...]

    @classmethod
    def parse(cls, opts: dict[str, Any]) -> TableSpec:
        name, dim, dtype = opts.get("table"), opts.get("dim"), opts.get("dtype", "float32")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a table needs a non-empty name")
        if type(dim) is not int or not 0 < dim <= MAX_DIM:
            raise InvalidArgument(f"table dim must be an integer in [1, {MAX_DIM}], not {dim!r}")
        if dtype not in ("float32", "float64"):
            raise InvalidArgument(f"table dtype must be float32 or float64, not {dtype!r}")
        raw_opt = opts.get("optimizer")
        optimizer = OptimizerSpec.parse(DEFAULT_TABLE_OPTIMIZER if raw_opt is None else raw_opt)
        return cls(name, dim, dtype, optimizer, parse_init(opts.get("init", ("zeros",))))

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @property
    def seed(self) -> int:
        """Seeds the initializer: the same for a table name on every replica."""
        return xxhash.xxh64_intdigest(self.name.encode("utf-8"))

    def to_wire(self) -> dict[str, Any]:
        return {"table": self.name, "dim": self.dim, "dtype": self.dtype,
                "optimizer": self.optimizer.to_wire(), "init": list(self.init)}


class Table:
    """The rows of one table held by one shard."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.index = new_row_index(_INITIAL_ROWS)
        self.capacity = 0
        self.values: Array = np.empty((0, spec.dim), spec.np_dtype)
        self.state: dict[str, Array] = {}
        self.steps: Array = np.empty(0, np.int64)
        self._marks: Array = np.zeros(0, np.uint8)  # has_repeats' scratch, one per slot
        self.reserve(_INITIAL_ROWS)

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` slots (doubling), keeping what is stored."""
        if rows <= self.capacity:
            return
        cap = max(rows, 2 * self.capacity, _INITIAL_ROWS)
        dim, dt, old = self.spec.dim, self.spec.np_dtype, self.capacity
        values = np.empty((cap, dim), dt)
        values[:old] = self.values
        state = {k: v.reshape(cap, dim)
                 for k, v in self.spec.optimizer.new_state(cap * dim, dt).items()}
        if old:
            for k, v in state.items():
                v[:old] = self.state[k]
        steps = np.zeros(cap, np.int64)
        steps[:old] = self.steps
        self.values, self.state, self.steps, self.capacity = values, state, steps, cap
        self._marks = np.zeros(cap, np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        rows = self.index.num_slots
        per_row = self.values.itemsize * self.spec.dim * (1 + len(self.state))
        return rows * per_row

    def pull(self, ids: Array) -> Array:
        """The rows of ``ids`` as a new (len(ids), dim) array; ids never pushed read
        as their initial value (nothing is inserted)."""
        slots = self.index.lookup(ids)
        out = np.empty((ids.shape[0], self.spec.dim), self.spec.np_dtype)
        present = slots >= 0
        if present.all():
            gather_rows(self.values, slots, out)
        else:
            out[present] = self.values[slots[present]]
            missing = ~present
            fresh = np.empty((int(missing.sum()), self.spec.dim), self.spec.np_dtype)
            sparse.init_rows(fresh, ids[missing], self.spec.init, self.spec.seed)
            out[missing] = fresh
        return out

    def check_push(self, ids: Array, grads: Array | Sequence[Array]) -> None:
        """ShapeMismatch unless ``grads`` (one array or blocks of consecutive rows)
        holds one row of the table's dim and dtype per id."""
        blocks = [grads] if isinstance(grads, np.ndarray) else grads
        rows = sum(b.shape[0] for b in blocks)
        if rows != ids.shape[0] or any(b.ndim != 2 or b.shape[1] != self.spec.dim
                                       or b.dtype != self.spec.np_dtype for b in blocks):
            got = ", ".join(f"{b.dtype}{list(b.shape)}" for b in blocks)
            raise ShapeMismatch(
                f"push to table {self.spec.name!r}: gradients are {got}, expected "
                f"{self.spec.dtype}[{ids.shape[0]}, {self.spec.dim}]", key=self.spec.name)

    def push(self, ids: Array, grads: Array) -> None:
        """Sum repeated ids (in input order), create absent rows with their initial
        value, then apply the optimizer to each pushed row once."""
        self.push_blocks(ids, [grads])

    def push_blocks(self, ids: Array, blocks: Sequence[Array]) -> None:
        """``push`` with the gradients as blocks of consecutive rows (the frames of a
        message, not joined): without repeated ids each block is applied where it
        lies; repeated ids are summed over the joined gradients first."""
        # New ids get slots in the order they first appear, a repeat the slot of its
        # first occurrence: the same map as inserting the deduplicated ids.
        slots, created = self.index.lookup_or_insert(ids)
        self.reserve(self.index.num_slots)
        if created.size:
            new = slots[created]
            fresh = np.empty((created.size, self.spec.dim), self.spec.np_dtype)
            sparse.init_rows(fresh, ids[created], self.spec.init, self.spec.seed)
            self.values[new] = fresh
        if has_repeats(slots, self._marks):
            unique, inverse = dedup_ids(ids)  # first-appearance order, as the slots
            blocks = [segment_sum(sparse.join_blocks(blocks), inverse, unique.shape[0])]
            unique_slots = np.empty(unique.shape[0], np.int64)
            unique_slots[inverse] = slots
            slots = unique_slots
        self.steps[slots] += 1
        self._apply(slots, blocks)

    def _apply(self, slots: Array, grads: Sequence[Array]) -> None:
        opt, hp, v = self.spec.optimizer, self.spec.optimizer.hp, self.values
        if opt.name == "sum":
            sparse.accumulate_rows(v, slots, grads)
        elif opt.name in ("sgd", "momentum"):
            sparse.sgd_rows(v, slots, grads, self.steps, lr=hp["lr"],
                            weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                            dampening=hp["dampening"], nesterov=hp["nesterov"],
                            momentum_buffer=self.state.get("momentum_buffer"),
                            clip_value=hp["clip_value"])
        elif opt.name in ("adam", "adamw"):
            beta1, beta2 = hp["betas"]
            sparse.adam_rows(v, slots, grads, self.steps, self.state["exp_avg"],
                             self.state["exp_avg_sq"], lr=hp["lr"], beta1=beta1, beta2=beta2,
                             eps=hp["eps"], weight_decay=hp["weight_decay"],
                             decoupled=opt.name == "adamw",
                             max_exp_avg_sq=self.state.get("max_exp_avg_sq"),
                             clip_value=hp["clip_value"])
        else:
            sparse.adagrad_rows(v, slots, grads, self.steps, self.state["sum"], lr=hp["lr"],
                                lr_decay=hp["lr_decay"], weight_decay=hp["weight_decay"],
                                eps=hp["eps"], clip_value=hp["clip_value"])
