"""The shard state machine: the tensors one shard owns and the operations on them.

Owns every key part stored on this shard (value, dtype, full shape, optimizer,
mode) and applies validated commands to them deterministically: the same
commands in the same order give bit-identical state. Validation
(``check_*``) is separate from application (``apply_*``) so the replicated log
can sit between them. No sockets, threads or clocks here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from pserver import kernels
from pserver.protocol.errors import InvalidArgument, KeyNotFound, ShapeMismatch, WrongShard
from pserver.protocol.frames import DEFAULT_CHUNK_BYTES, join_frames, part_range
from pserver.protocol.schema import DTYPES, KeyRef, TensorMeta
from pserver.protocol.shardmap import ShardMap

from .optim import OptimizerSpec
from .sessions import Sessions
from .tables import Table, TableSpec

log = logging.getLogger(__name__)

MODES = ("async", "sync", "ssp")
COMPRESSIONS = ("none", "float16", "bfloat16", "topk")
_HALF = ("float16", "bfloat16")
_BF16 = DTYPES["bfloat16"]
DIGEST_MARKS = 8  # digest marks kept waiting for their check
AVAILABLE_MODES = MODES
Pieces = list[np.ndarray[Any, Any]]  # a gradient as consecutive 1-D pieces (its frames)


@dataclass
class Slot:
    """One stored key part: elements [offset, offset+count) of ``key``."""

    key: str
    part: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    count: int
    value: np.ndarray[Any, Any]
    optimizer: OptimizerSpec
    mode: str
    compression: tuple[Any, ...] = ("none",)  # what clients send: see parse_compression
    workers: int = 1  # sync/ssp: how many workers push each step
    staleness: int = 0  # ssp: how many steps a worker may run ahead of the slowest
    sync_step: int = 0  # sync: steps applied
    worker_steps: dict[int, int] = field(default_factory=dict)  # pushes received per worker
    # sync: step -> worker -> its gradient, until every live worker pushed the step
    pending: dict[int, dict[int, Pieces]] = field(default_factory=dict)
    state: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)  # optimizer slots
    step: int = 0  # updates applied
    # Readers still holding ``value``'s memory (objects with a ``done`` flag, e.g.
    # zero-copy sends in flight). Writing while one is not done copies first.
    leases: list[Any] = field(default_factory=list)
    _whole: list[Any] | None = field(default=None, repr=False, compare=False)

    def whole_push(self) -> list[Any] | None:
        """The wire descriptor of a push of this whole part in one frame of its own
        dtype, when such a push needs no check beyond matching it exactly: async mode,
        no compression, an optimizer that updates this dtype. None otherwise."""
        if self._whole is None and self.mode == "async" and self.compression == ("none",) \
                and (self.optimizer.name == "sum" or self.dtype in ("float32", "float64")):
            self._whole = [self.key, self.part, self.dtype, list(self.shape), self.offset,
                           self.count, 1]
        return self._whole

    def lease(self, reader: Any) -> None:
        """Record that ``reader`` uses ``value``'s memory until ``reader.done``."""
        if len(self.leases) >= 64:  # a key only ever pulled: forget finished readers
            self.leases = [r for r in self.leases if not r.done]
        self.leases.append(reader)

    def writable(self) -> np.ndarray[Any, Any]:
        """``value``, made safe to change: copy-on-write if a lease is still active."""
        if self.leases:
            if not all(r.done for r in self.leases):
                self.value = self.value.copy()
            self.leases.clear()
        return self.value

    def ready_for(self, worker: int, dropped: frozenset[int] | set[int] = frozenset()) -> bool:
        """Whether ``worker`` may read this part now: in sync mode once every step it
        pushed is applied; in ssp mode while it is at most ``staleness`` steps ahead
        of the slowest worker still alive; always in async mode."""
        mine = self.worker_steps.get(worker, 0)
        if self.mode == "sync":
            return self.sync_step >= mine
        if self.mode == "ssp":
            live = [self.worker_steps.get(w, 0) for w in range(self.workers) if w not in dropped]
            return not live or mine - min(live) <= self.staleness
        return True

    def meta(self, nframes: int = 0) -> TensorMeta:
        return TensorMeta(
            self.key, self.part, self.dtype, self.shape, self.offset, self.count, nframes
        )

    def describe(self) -> list[Any]:
        return [self.key, self.dtype, list(self.shape), self.optimizer.to_wire(), self.mode,
                list(self.compression)]


def _layout(t: TensorMeta) -> tuple[Any, ...]:
    return (t.dtype, t.shape, t.offset, t.count)


def parse_compression(raw: Any) -> tuple[Any, ...]:
    """A key's gradient compression on the wire: ``("none",)``, ``("float16",)``,
    ``("bfloat16",)`` (the client casts; the server widens back) or
    ``("topk", ratio)`` (the client sends the ``ratio`` largest-magnitude entries of
    its error-feedback residual as values and positions)."""
    if raw is None:
        return ("none",)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not raw or raw[0] not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {list(COMPRESSIONS)}, not {raw!r}")
    if raw[0] == "topk":
        ratio = raw[1] if len(raw) == 2 else None
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise InvalidArgument("compression ('topk', ratio) needs 0 < ratio <= 1")
        return ("topk", float(ratio))
    if len(raw) != 1:
        raise InvalidArgument(f"compression {raw[0]!r} takes no arguments")
    return (str(raw[0]),)


def pieces(frames: Sequence[Any], dtype: np.dtype[Any], slot: Slot,
           widen: bool = True) -> Pieces:
    """A part's gradient (``frames`` of ``dtype``) as one array per frame: read-only
    views of the frames (nothing copied; they keep the message alive). With
    ``widen`` a float16/bfloat16 gradient becomes copies in the slot's dtype
    (``widened``); without, it stays as it came (a sync step's mean reads it
    directly: ``kernels.aggregate`` widens bfloat16 as it adds)."""
    views = [np.frombuffer(f, dtype=dtype) for f in frames]
    want = slot.value.dtype
    if dtype == want or not widen:
        return views
    return [widened(v, want) for v in views]


def widened(a: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """``a`` in ``dtype``: itself, or a copy (bfloat16 and float16 into float32 by the
    ``from_bfloat16``/``from_float16`` kernels, 3-4x faster than ml_dtypes' and
    numpy's casts)."""
    if a.dtype == dtype:
        return a
    if dtype == np.float32 and a.dtype in (_BF16, np.float16):
        cast = kernels.from_bfloat16 if a.dtype == _BF16 else kernels.from_float16
        return cast(a, np.empty(a.shape, dtype))
    return a.astype(dtype)


def joined(grad: Pieces, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """``grad`` as one array (a view when it is one piece)."""
    if len(grad) == 1:
        return grad[0]
    return np.concatenate(grad) if grad else np.empty(0, dtype)


def aligned(grads: dict[int, Pieces], dtype: np.dtype[Any]) -> list[Pieces]:
    """One sync step's gradients, piece by piece: for each stretch of elements, every
    worker's piece of it in worker order. Workers sending frames of the same sizes
    (every client of a cluster does) give one stretch per frame; otherwise the
    gradients are joined into one stretch."""
    lists = [grads[w] for w in sorted(grads)]
    sizes = [p.size for p in lists[0]]
    if all([p.size for p in g] == sizes for g in lists[1:]):
        return [list(ps) for ps in zip(*lists, strict=True)]
    return [[joined(g, dtype) for g in lists]]


def mean_into(grads: dict[int, Pieces], out: np.ndarray[Any, Any]) -> None:
    """Write the mean of one sync step's gradients into ``out``, summed in worker
    order (so its bits do not depend on the order they arrived in), stretch by
    stretch (the bits do not depend on the stretches either: elementwise)."""
    pos = 0
    for ps in aligned(grads, out.dtype):
        end = pos + ps[0].size
        kernels.aggregate(ps, out[pos:end], mean=True)
        pos = end


def parse_mode(mode: Any, default: str) -> str:
    mode = default if mode is None else mode
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r} is not one of {list(MODES)}")
    if mode not in AVAILABLE_MODES:
        raise InvalidArgument(
            f"mode {mode!r} is not available in this build yet (available: {list(AVAILABLE_MODES)})"
        )
    return str(mode)


class ShardStateMachine:
    """All key parts of one shard. ``applied_index`` counts applied mutations."""

    def __init__(
        self,
        shard_id: int,
        shard_map: ShardMap,
        default_mode: str = "async",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        device: str = "cpu",
    ) -> None:
        self.memory = kernels.Memory(device)  # BackendUnavailable for cuda without a GPU
        # Chosen once (PSERVER_KERNELS is read at start, not per update).
        self.backend = "cuda" if device == "cuda" else kernels.default_backend()
        self.shard_id = shard_id
        self.shard_map = shard_map
        self.chunk_bytes = chunk_bytes
        self.tables: dict[str, Table] = {}
        self.sessions = Sessions()  # exactly-once: (client id, seq) -> reply
        self.dropped: set[int] = set()  # workers out of the step quorum (no heartbeat)
        self.default_mode = default_mode
        self.slots: dict[tuple[str, int], Slot] = {}
        self.applied_index = 0
        self._scratch: dict[np.dtype[Any], np.ndarray[Any, Any]] = {}  # see _means
        # Digest marks (commands.DIGEST): this replica's digest where it applied each of
        # the last few marks, kept until the leader's check; not part of the state.
        self.digest_marks: dict[tuple[int, int], str] = {}
        self.digest_checks = 0  # checks compared here (marks this replica also applied)
        self.digest_mismatches = 0
        self.last_mismatch: tuple[str, str] = ("", "")  # (ours, the leader's)

    # -- validation ---------------------------------------------------------

    def _check_owner(self, key: str, part: int) -> None:
        owner = self.shard_map.shard_for(key, part)
        if owner != self.shard_id:
            raise WrongShard(
                f"{key!r} part {part} belongs to shard {owner}, not {self.shard_id}",
                owner=owner,
                epoch=self.shard_map.epoch,
            )

    def _slot(self, key: str, part: int) -> Slot:
        slot = self.slots.get((key, part))
        if slot is None:
            self._check_owner(key, part)
            raise KeyNotFound(f"key {key!r} is not initialized", key=key)
        return slot

    @staticmethod
    def _check_same(slot: Slot, t: TensorMeta, what: str) -> None:
        if t.dtype != slot.dtype or t.shape != slot.shape:
            raise ShapeMismatch(
                f"{what} {t.key!r}: got {t.dtype}{list(t.shape)}, "
                f"the key holds {slot.dtype}{list(slot.shape)}",
                key=t.key,
            )
        if (t.offset, t.count) != (slot.offset, slot.count):
            raise ShapeMismatch(
                f"{what} {t.key!r} part {t.part}: elements [{t.offset}, {t.offset + t.count}) "
                f"do not match the stored part [{slot.offset}, {slot.offset + slot.count})",
                key=t.key,
            )

    def check_init(
        self, tensors: Sequence[TensorMeta], opts: dict[str, Any]
    ) -> tuple[OptimizerSpec, str]:
        """Validate an init; returns the parsed optimizer and mode."""
        spec = OptimizerSpec.parse(opts.get("optimizer"))
        mode = parse_mode(opts.get("mode"), self.default_mode)

        seen: dict[tuple[str, int], TensorMeta] = {}
        for t in tensors:
            if t.nframes == 0:
                raise InvalidArgument(f"init of {t.key!r} carries no data")
            if t.dtype == "bfloat16":
                raise InvalidArgument(f"init of {t.key!r}: bfloat16 is a wire format for "
                                      "gradients; store the key as float32")
            self._check_owner(t.key, t.part)
            size = int(np.prod(t.shape, dtype=np.int64))
            if part_range(size, t.np_dtype.itemsize, self.chunk_bytes, t.part) != (
                t.offset,
                t.count,
            ):
                raise InvalidArgument(
                    f"init of {t.key!r}: part {t.part} [{t.offset}, {t.offset + t.count}) is not "
                    f"how a {t.dtype}{list(t.shape)} tensor is cut into "
                    f"{self.chunk_bytes}-byte chunks"
                )
            slot = self.slots.get((t.key, t.part))
            if slot is not None:
                self._check_same(slot, t, "init of existing key")
            elif (t.key, t.part) in seen and _layout(seen[(t.key, t.part)]) != _layout(t):
                raise ShapeMismatch(
                    f"init names {t.key!r} part {t.part} twice, differently", key=t.key
                )
            seen[(t.key, t.part)] = t
        return spec, mode

    def check_push(self, tensors: Sequence[TensorMeta], opts: dict[str, Any] | None = None,
                   ) -> None:
        """Validate a push. Gradients of float keys may come as float16 or bfloat16;
        with ``opts["encoding"] == "topk"`` each part comes as two tensors, its k
        values (the key's dtype) then their k distinct int64 positions in the part."""
        worker = (opts or {}).get("worker", 0)
        if type(worker) is not int or worker < 0:
            raise InvalidArgument(f"worker must be an integer >= 0, not {worker!r}")
        if opts and opts.get("encoding") == "topk":
            self._check_topk(tensors)
            return
        for t in tensors:
            if t.nframes == 0:
                raise InvalidArgument(f"push of {t.key!r} carries no data")
            slot = self._slot(t.key, t.part)
            if slot.mode != "async" and worker >= slot.workers:
                raise InvalidArgument(f"push to {t.key!r}: worker {worker} is not one of the "
                                      f"key's {slot.workers} workers")
            seen = t
            if t.dtype != slot.dtype and t.dtype in _HALF and slot.dtype in ("float32",
                                                                             "float64"):
                seen = TensorMeta(t.key, t.part, slot.dtype, t.shape, t.offset, t.count,
                                  t.nframes)
            self._check_same(slot, seen, "push to")
            if slot.optimizer.name != "sum" and slot.dtype not in ("float32", "float64"):
                raise InvalidArgument(
                    f"push to {t.key!r}: optimizer {slot.optimizer.name!r} updates float32 or "
                    f"float64 values, the key holds {slot.dtype} (init it with "
                    f"{{'name': 'sum'}} to accumulate other dtypes)")

    def check_refs(self, refs: Sequence[KeyRef]) -> list[Slot]:
        return [self._slot(r.key, r.part) for r in refs]

    def _check_topk(self, tensors: Sequence[TensorMeta]) -> None:
        if len(tensors) % 2:
            raise InvalidArgument("a topk push carries (values, positions) pairs of tensors")
        for vals, pos in zip(tensors[::2], tensors[1::2], strict=True):
            slot = self._slot(vals.key, vals.part)
            k = vals.count
            if slot.dtype not in ("float32", "float64"):
                raise InvalidArgument(f"topk push to {vals.key!r}: the key holds {slot.dtype}; "
                                      "compression applies to float32 and float64 keys")
            if (pos.key, pos.part) != (vals.key, vals.part) or pos.dtype != "int64" \
                    or vals.dtype != slot.dtype or vals.shape != (k,) or pos.shape != (k,) \
                    or pos.count != k or vals.offset or pos.offset or k > slot.count \
                    or not vals.nframes or not pos.nframes:
                raise ShapeMismatch(
                    f"topk push to {vals.key!r} part {vals.part}: expected k {slot.dtype} "
                    f"values and k int64 positions with k <= {slot.count}", key=vals.key)

    # -- application ----------------------------------------------------------

    def apply_init(
        self,
        tensors: Sequence[TensorMeta],
        data: Sequence[Sequence[Any]],
        spec: OptimizerSpec,
        mode: str,
        compression: tuple[Any, ...] = ("none",),
        workers: int = 1,
        staleness: int = 0,
    ) -> list[bool]:
        """Create absent parts from their data; returns, per part, whether it was created."""
        created = []
        for t, frames in zip(tensors, data, strict=True):
            if (t.key, t.part) in self.slots:
                created.append(False)
                continue
            host = np.empty(t.count, dtype=t.np_dtype)
            join_frames(frames, t.np_dtype, out=host)
            self.slots[(t.key, t.part)] = slot = Slot(
                t.key, t.part, t.dtype, t.shape, t.offset, t.count, self.memory.adopt(host),
                spec, mode, compression,
            )
            slot.state = self.memory.adopt_all(spec.new_state(t.count, t.np_dtype))
            slot.workers, slot.staleness = workers, staleness
            created.append(True)
        self.applied_index += 1
        return created

    def apply_push(self, tensors: Sequence[TensorMeta], data: Sequence[Sequence[Any]],
                   opts: dict[str, Any] | None = None) -> None:
        """Apply each part's optimizer to its gradient, frame by frame (no reassembly)."""
        if opts and opts.get("encoding") == "topk":
            self._apply_topk(tensors, data)
            return
        worker = int((opts or {}).get("worker", 0))
        for t, frames in zip(tensors, data, strict=True):
            slot = self.slots[(t.key, t.part)]
            step = slot.worker_steps.get(worker, 0)
            slot.worker_steps[worker] = step + 1
            if slot.mode == "sync":
                self._buffer(slot, step, worker, frames, t)
                continue
            self._update(slot, frames, t.np_dtype)
        self.applied_index += 1

    def apply_whole_pushes(self, slots: Sequence[Slot], frames: Sequence[Any],
                           worker: int) -> None:
        """``apply_push`` of async parts, each pushed whole in one frame of its dtype
        (the checks were done by matching ``Slot.whole_push``)."""
        for slot, frame in zip(slots, frames, strict=True):
            slot.worker_steps[worker] = slot.worker_steps.get(worker, 0) + 1
            self._update(slot, (frame,), slot.value.dtype)
        self.applied_index += 1

    def _update(self, slot: Slot, frames: Sequence[Any], dtype: np.dtype[Any]) -> None:
        """One optimizer step of an async part with its gradient in ``frames``, frame
        by frame (no reassembly)."""
        slot.step += 1
        self._step(slot, pieces(frames, dtype, slot))

    def _step(self, slot: Slot, grad: Iterable[np.ndarray[Any, Any]],
              assign: bool = False) -> None:
        """Apply the optimizer (``assign``: copy) with the gradient given as consecutive
        pieces, each to its stretch of the value and optimizer state; the update is
        elementwise, so the bits do not depend on where the pieces end."""
        value = slot.writable()
        pos = 0
        for piece in grad:
            g = self.memory.gradient(piece)
            end = pos + piece.size
            if assign:
                value[pos:end] = g
            else:
                whole = pos == 0 and end == value.size  # one piece: no state slices
                state = slot.state if whole else {k: v[pos:end] for k, v in slot.state.items()}
                slot.optimizer.apply(value[pos:end], g, state, slot.step, self.backend)
            pos = end

    # -- reads ----------------------------------------------------------------

    def _buffer(self, slot: Slot, step: int, worker: int, frames: Sequence[Any],
                t: TensorMeta) -> None:
        """sync: keep this worker's gradient for ``step``; once all workers pushed the
        next step to apply, apply the mean of their gradients (summed in worker order,
        so the bits do not depend on arrival order)."""
        slot.pending.setdefault(step, {})[worker] = pieces(frames, t.np_dtype, slot,
                                                            widen=False)
        self._complete_steps(slot)

    def _complete_steps(self, slot: Slot) -> None:
        """Apply every buffered step that all live workers have pushed: the mean of
        the gradients present, summed in worker order. With ``sum`` the key then holds
        that mean (a pull returns the mean gradient of the last step)."""
        live = set(range(slot.workers)) - self.dropped
        while live and live <= slot.pending.get(slot.sync_step, {}).keys():
            grads = slot.pending.pop(slot.sync_step)
            self._apply_mean(slot, self._means(grads, slot.value.dtype))

    def _means(self, grads: dict[int, Pieces], dtype: np.dtype[Any]) -> Iterator[
            np.ndarray[Any, Any]]:
        """The mean of one step's gradients (as ``mean_into`` computes it), stretch by
        stretch, each in a scratch buffer reused for the next: a step then touches
        the gradients, value and state once, the mean stays in cache, and no 16 MiB
        array is allocated (and page-faulted in) per step."""
        for ps in aligned(grads, dtype):
            n = ps[0].size
            buf = self._scratch.get(dtype)
            if buf is None or buf.size < n:
                buf = self._scratch[dtype] = np.empty(n, dtype)
            kernels.aggregate(ps, buf[:n], mean=True)
            yield buf[:n]

    def _apply_mean(self, slot: Slot, mean: Iterable[np.ndarray[Any, Any]]) -> None:
        """Apply one completed sync step whose mean gradient is ``mean`` (pieces)."""
        slot.step += 1
        self._step(slot, mean, assign=slot.optimizer.name == "sum")
        slot.sync_step += 1

    def check_sync_step(self, key: str, part: int, step: int, workers: Sequence[int]) -> Slot:
        """Validate a step aggregated by the leader (``apply_sync_step``): the part is a
        sync part with nothing buffered here, the step is its next one, and each
        contributing worker's next step is it."""
        slot = self._slot(key, part)
        if slot.mode != "sync" or slot.pending or slot.sync_step != step:
            raise InvalidArgument(f"{key!r} part {part}: step {step} is not the next sync step "
                                  f"({slot.sync_step}) of a part without buffered pushes")
        for w in workers:
            if slot.worker_steps.get(w, 0) != step:
                raise InvalidArgument(f"{key!r} part {part}: worker {w} is not at step {step}")
        return slot

    def apply_sync_step(self, steps: Sequence[tuple[Slot, Sequence[int], Sequence[Any]]]) -> None:
        """Apply sync steps the leader aggregated: for each part, its slot (checked by
        ``check_sync_step``), the contributing workers and the mean gradient's frames
        (the mean of their gradients summed in worker order, as ``_complete_steps``
        computes it)."""
        for slot, workers, frames in steps:
            for w in workers:
                slot.worker_steps[w] = slot.sync_step + 1
            dtype = slot.value.dtype
            self._apply_mean(slot, [np.frombuffer(f, dtype=dtype) for f in frames])
        self.applied_index += 1

    def drop_worker(self, worker: int) -> None:
        """Leave ``worker`` out of the step quorum: steps waiting only for it complete."""
        self.dropped.add(worker)
        for slot in self.slots.values():
            if slot.mode == "sync":
                self._complete_steps(slot)

    def rejoin_worker(self, worker: int) -> None:
        """Take ``worker`` back; it resumes at the current step of every key."""
        self.dropped.discard(worker)
        for slot in self.slots.values():
            if slot.mode == "sync":
                slot.worker_steps[worker] = max(slot.worker_steps.get(worker, 0),
                                                slot.sync_step)
            elif slot.mode == "ssp":
                others = [n for w, n in slot.worker_steps.items() if w != worker]
                slot.worker_steps[worker] = max(slot.worker_steps.get(worker, 0),
                                                min(others, default=0))

    def _apply_topk(self, tensors: Sequence[TensorMeta], data: Sequence[Sequence[Any]]) -> None:
        """Rebuild each part's dense gradient (zeros but at the sent positions) and
        apply the optimizer to it: the same update as a dense push of that gradient."""
        decoded = []
        for vals, pos, vframes, pframes in zip(tensors[::2], tensors[1::2], data[::2],
                                               data[1::2], strict=True):
            slot = self.slots[(vals.key, vals.part)]
            positions = join_frames(pframes, pos.np_dtype)
            if positions.size and (positions.min() < 0 or positions.max() >= slot.count
                                   or np.unique(positions).size != positions.size):
                raise InvalidArgument(f"topk push to {vals.key!r}: positions must be distinct "
                                      "and inside the part")  # found before anything changed
            decoded.append((slot, positions, join_frames(vframes, vals.np_dtype)))
        for slot, positions, values in decoded:
            dense = np.zeros(slot.count, slot.value.dtype)
            dense[positions] = values
            slot.step += 1
            slot.optimizer.apply(slot.writable(), self.memory.gradient(dense), slot.state,
                                 slot.step, self.backend)
        self.applied_index += 1

    # -- sparse tables -------------------------------------------------------------

    def check_create_table(self, opts: dict[str, Any]) -> TableSpec:
        spec = TableSpec.parse(opts)
        table = self.tables.get(spec.name)
        if table is not None and (table.spec.dim, table.spec.dtype) != (spec.dim, spec.dtype):
            raise ShapeMismatch(
                f"table {spec.name!r} exists as {table.spec.dtype}[*, {table.spec.dim}], "
                f"not {spec.dtype}[*, {spec.dim}]", key=spec.name)
        return spec

    def apply_create_table(self, spec: TableSpec) -> bool:
        """Create the table unless it exists (then its first definition stays)."""
        self.applied_index += 1
        if spec.name in self.tables:
            return False
        self.tables[spec.name] = Table(spec)
        return True

    def table(self, name: Any) -> Table:
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise KeyNotFound(f"table {name!r} does not exist", key=str(name))
        return table

    def check_rows(self, name: Any, ids: np.ndarray[Any, Any]) -> Table:
        """The table, once every id is checked to belong to this shard."""
        table = self.table(name)
        if ids.size:
            mine = self.shard_map.row_shard_index(self.shard_id)
            owners = kernels.shard_of_ids(ids, self.shard_map.row_seed, self.shard_map.num_shards)
            if not (owners == mine).all():
                raise WrongShard(f"rows of table {name!r} sent to shard {self.shard_id} belong "
                                 "to other shards", epoch=self.shard_map.epoch)
        return table

    def apply_push_rows(self, table: Table, ids: np.ndarray[Any, Any],
                        grads: np.ndarray[Any, Any] | Sequence[np.ndarray[Any, Any]]) -> None:
        """Push rows: ``grads`` one (n, dim) array or blocks of consecutive rows."""
        table.push_blocks(ids, [grads] if isinstance(grads, np.ndarray) else grads)
        self.applied_index += 1

    def digest(self) -> str:
        """A hash of the state (every key part's values, optimizer state and steps;
        every table's rows by id; the dropped workers): equal on replicas that
        applied the same commands."""
        h = xxhash.xxh64()
        read = self.memory.read
        for key in sorted(self.slots):
            s = self.slots[key]
            h.update(f"{s.key}\0{s.part}\0{s.step}\0{s.sync_step}".encode())
            h.update(np.ascontiguousarray(read(s.value)).tobytes())
            for name in sorted(s.state):
                h.update(np.ascontiguousarray(read(s.state[name])).tobytes())
        for name in sorted(self.tables):
            t = self.tables[name]
            ids, slots = t.index.items()
            order = ids.argsort()
            h.update(ids[order].tobytes())
            h.update(t.values[slots[order]].tobytes())
        h.update(repr(sorted(self.dropped)).encode())
        return h.hexdigest()

    def mark_digest(self, token: tuple[int, int]) -> str:
        """Remember the digest of the state at the DIGEST command ``token`` (the last
        DIGEST_MARKS of them) and return it."""
        self.digest_marks[token] = mine = self.digest()
        while len(self.digest_marks) > DIGEST_MARKS:
            del self.digest_marks[next(iter(self.digest_marks))]
        return mine

    def check_digest(self, token: tuple[int, int], theirs: str) -> bool | None:
        """Compare the leader's digest at mark ``token`` with ours: None when this
        replica did not apply that mark (it restored a later snapshot)."""
        mine = self.digest_marks.pop(token, None)
        if mine is None:
            return None
        self.digest_checks += 1
        if mine != theirs:
            self.digest_mismatches += 1
            self.last_mismatch = (mine, theirs)
            return False
        return True

    def stats(self) -> dict[str, Any]:
        keys = {k for k, _ in self.slots}
        return {
            "keys": len(keys),
            "home_keys": sum(1 for _, part in self.slots if part == 0),
            "parts": len(self.slots),
            "tables": len(self.tables),
            "rows": sum(len(t) for t in self.tables.values()),
            "bytes": int(sum(s.value.nbytes for s in self.slots.values()))
            + sum(t.nbytes for t in self.tables.values()),
            "applied_index": self.applied_index,
        }
