"""The numpy ``Client``: dense keys over a sharded cluster.

Owns what a worker sees: the cluster map fetched from the bootstrap address,
the cut of each key into parts (chunks of ``chunk_bytes``) and of each part into
frames of ``frame_bytes``, the placement of parts on shards, and the futures of
``init``/``push``/``pull``/``push_pull``. Every operation sends its messages to
all shards at once through the I/O thread and has a deadline.

Thread safety: a ``Client`` may be shared by any number of threads. Sockets
live on the client's own I/O thread; the public methods only enqueue requests
and wait on futures, and the key-metadata cache is guarded by a lock.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pserver.kernels import (
    gather_rows,
    partition_by_shard,
    scatter_rows,
    to_bfloat16,
    to_float16,
)
from pserver.protocol.allocator import ENV_KEEP_FREED, keep_freed_buffers
from pserver.protocol.errors import (
    InvalidArgument,
    PServerError,
    RequestTooLarge,
    ShapeMismatch,
)
from pserver.protocol.frames import (
    frame_count,
    frame_spans,
    part_ranges,
    require_contiguous,
    row_blocks,
    split_frames,
    split_rows,
    wire_dtype,
)
from pserver.protocol.schema import (
    DTYPES,
    MAX_WORKERS,
    Header,
    KeyRef,
    Kind,
    Limits,
    TensorMeta,
    dtype_name,
)
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.shm import Arena, aligned
from pserver.protocol.transport import Incoming, call, host_id, new_context

from .io import Completion, IOEngine, LazyFrame
from .starter import AsyncStarter

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
T = TypeVar("T")
ENV_IPC = "PSERVER_IPC"
ENV_SHM = "PSERVER_SHM"
HEARTBEAT_S = 1.0
LAYOUTS_KEPT = 4096  # cached call layouts (one per distinct list of keys pushed)
_HALF_DTYPES = (DTYPES["float16"], DTYPES["bfloat16"])

# Replies can be larger than any request the server accepts: decode them generously.
_REPLY_LIMITS = Limits(
    max_request_bytes=1 << 40, max_frames=1 << 20, max_keys=1 << 20, max_header_bytes=64 << 20
)


def _narrowed(data: np.ndarray[Any, Any], half: str, frame_bytes: int) -> list[LazyFrame]:
    """Frames of ``data`` (float32) cast to ``half`` (bfloat16 or float16), cut as
    ``split_frames`` cuts such an array, each made when the engine sends it
    (``to_bfloat16``/``to_float16``)."""
    spans = frame_spans(2 * data.size, 2, frame_bytes)
    cast = to_bfloat16 if half == "bfloat16" else to_float16

    def frame(a: int, b: int) -> LazyFrame:
        src = data[a // 2 : b // 2]
        return LazyFrame(b - a, lambda out: cast(src, out.view(np.uint16)))

    return [frame(a, b) for a, b in spans]


@dataclass(frozen=True)
class KeyMeta:
    """What the client knows of a key: its dtype, shape and gradient compression (and,
    from ``Client.keys``, the name of its server optimizer)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    compression: tuple[Any, ...] = ("none",)
    optimizer: str = ""

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return DTYPES[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Piece:
    """One key part on its way to or from a shard."""

    meta: KeyMeta
    part: int
    offset: int
    count: int
    shard: int
    data: Array | None = None  # flat slice to send (push/init)


@dataclass(frozen=True)
class _Layout:
    """How a call on a fixed list of uncompressed keys is cut into messages,
    computed once per list: per key its (shape, dtype), and per message its shard,
    its tensor descriptors and, per data frame, (key index, first byte, end byte)
    of that key's flat bytes. Repeated calls only check the arrays and slice."""

    keys: tuple[tuple[tuple[int, ...], np.dtype[Any]], ...]
    messages: tuple[tuple[int, tuple[TensorMeta, ...], tuple[tuple[int, int, int], ...]], ...]


class _Op(Completion[Any]):
    """Joins the replies of one operation's messages into one result. Its callbacks
    run on the thread driving I/O, one at a time (under the engine's lock)."""

    __slots__ = ("_finish", "_left")

    def __init__(self, messages: int, finish: Callable[[], Any]) -> None:
        super().__init__()
        self._left = messages
        self._finish = finish
        if messages == 0:
            self._complete()

    def _complete(self) -> None:
        try:
            result = self._finish()
        except Exception as exc:
            self.set_exception(exc)
        else:
            self.set_result(result)

    def done_one(self) -> None:
        self._left -= 1
        if self._left == 0 and not self._done:
            self._complete()

    def fail(self, exc: PServerError) -> None:
        self.set_exception(exc)


def _compression(raw: Any) -> tuple[Any, ...]:
    """Normalise ``init(compression=...)``: None, "float16", "bfloat16",
    ("topk", ratio) or {"name": "topk", "ratio": r}. The server validates again."""
    if raw is None or raw == "none":
        return ("none",)
    if isinstance(raw, dict):
        raw = (raw.get("name"), raw["ratio"]) if "ratio" in raw else (raw.get("name"),)
    if isinstance(raw, str):
        raw = (raw,)
    if not isinstance(raw, tuple | list) or not raw or raw[0] not in (
            "float16", "bfloat16", "topk"):
        raise InvalidArgument(
            f"compression must be None, 'float16', 'bfloat16' or ('topk', ratio), not {raw!r}")
    return tuple(raw)


def _wire_value(value: Any, where: str) -> Any:
    """``value`` as msgpack sends it: numpy scalars become Python numbers, tuples
    lists; anything else that the wire cannot carry is ``InvalidArgument`` here,
    not an error the server cannot tie to the request."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 64:
            raise InvalidArgument(f"{where}: {value} does not fit in 64 bits")
        return value
    if isinstance(value, list | tuple):
        return [_wire_value(v, where) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidArgument(f"{where}: setting names must be strings, not "
                                  f"{[k for k in value if not isinstance(k, str)]!r}")
        return {k: _wire_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise InvalidArgument(f"{where}: {type(value).__name__} {value!r} is not a number, "
                          "string, list or dict")


def _optimizer(raw: Any) -> dict[str, Any]:
    """``optimizer=``: a dict such as ``{"name": "adam", "lr": 1e-3}``, or a name."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"optimizer must be a dict such as {{'name': 'sgd', 'lr': 0.1}} "
                              f"or a name, not {raw!r}")
    return dict(_wire_value(raw, "optimizer"))


def _count(value: Any, name: str, low: int) -> int:
    """An integer setting (numpy integers too, not bools) of at least ``low``."""
    if isinstance(value, bool | np.bool_):
        raise InvalidArgument(f"{name} must be an integer, not {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, not {value!r}") from None
    if not low <= n < 1 << 63:
        raise InvalidArgument(f"{name} must be in [{low}, 2**63), not {n}")
    return n


def _dtype_name(dtype: Any) -> str:
    if dtype is None:  # np.dtype(None) would be float64
        raise InvalidArgument("dtype must be a name such as 'float32', not None")
    try:
        return str(np.dtype(dtype).name)
    except TypeError:
        raise InvalidArgument(f"dtype must be a name such as 'float32', not {dtype!r}") from None


def _bootstrap(ctx: Any, address: str, kind: Kind, timeout: float) -> dict[str, Any]:
    header, _ = call(
        ctx, address, Header(kind, int.from_bytes(os.urandom(6), "little")), _REPLY_LIMITS, timeout
    )
    return header.opts


def cluster_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """The cluster's status as served by the bootstrap address (see ``Client.status``)."""
    ctx = new_context()
    try:
        return _bootstrap(ctx, address, Kind.STATUS, timeout)
    finally:
        ctx.term()


class Client:
    """A connection to a pserver cluster. Use ``pserver.connect``."""

    def __init__(
        self,
        address: str,
        *,
        worker_id: int = 0,
        num_workers: int = 1,
        timeout: float = 30.0,
        ipc: bool | None = None,
        shm: bool | None = None,
    ) -> None:
        given: object = timeout  # callers pass anything: check what it is
        if isinstance(given, bool) or not isinstance(given, numbers.Real) \
                or not math.isfinite(given) or given <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        try:
            worker_id, num_workers = operator.index(worker_id), operator.index(num_workers)
        except TypeError:
            raise ValueError(f"worker_id and num_workers must be integers, not {worker_id!r} "
                             f"and {num_workers!r}") from None
        if not 1 <= num_workers <= MAX_WORKERS or not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= worker_id < num_workers <= {MAX_WORKERS}, got "
                             f"{worker_id} of {num_workers}")
        self.address = address
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.timeout = timeout
        self.client_id = os.urandom(16)
        if os.environ.get(ENV_KEEP_FREED, "1") != "0":
            keep_freed_buffers()  # received messages and row gathers reuse heap memory
        self._ctx = new_context()
        try:
            cmap = _bootstrap(self._ctx, address, Kind.MAP, timeout)
        except BaseException:
            self._ctx.term()
            raise
        self.cluster_map = cmap
        self.shard_map = ShardMap.from_wire(cmap["shard_map"])
        self.chunk_bytes = int(cmap["chunk_bytes"])
        self.frame_bytes = int(cmap["frame_bytes"])
        self.limits = Limits.from_wire(cmap["limits"])
        use_ipc = (os.environ.get(ENV_IPC, "1") != "0") if ipc is None else ipc
        same_host = cmap.get("host_id") == host_id()
        # Per shard, every replica's address (ipc on the same host); the I/O engine
        # finds the leader and follows it. ``hints`` maps the tcp address a NotLeader
        # reply names to the replica's place in that list.
        self.endpoints: dict[int, list[str]] = {}
        hints: dict[int, dict[str, int]] = {}
        for shard in cmap["shards"]:
            addrs = []
            for i, replica in enumerate(shard["replicas"]):
                path = (replica.get("ipc") or "").removeprefix("ipc://")
                ipc_ok = use_ipc and same_host and path and os.path.exists(path)
                addrs.append(replica["ipc"] if ipc_ok else replica["tcp"])
                hints.setdefault(shard["id"], {})[replica["tcp"]] = i
            self.endpoints[shard["id"]] = addrs
        self._meta: dict[str, KeyMeta] = {}
        self._plans: dict[KeyMeta, tuple[tuple[int, int, int, int], ...]] = {}
        self._layouts: dict[tuple[str, ...], _Layout | None] = {}
        self._tables: dict[str, tuple[int, np.dtype[Any]]] = {}
        self._residuals: dict[tuple[str, int], Array] = {}  # top-k error feedback per part
        self._barrier_gen = 0
        self._residual_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._starter = AsyncStarter()
        # Shared memory with the shards whose replicas all listen on ipc (this host).
        use_shm = (os.environ.get(ENV_SHM, "1") != "0") if shm is None else shm
        shm_shards = frozenset(s for s, addrs in self.endpoints.items()
                               if all(a.startswith("ipc://") for a in addrs))
        arena = Arena() if use_shm and shm_shards else None
        self._io = IOEngine(self._ctx, self.endpoints, _REPLY_LIMITS, hints, arena=arena,
                            shm_shards=shm_shards, reply_bytes=self._reply_bytes)
        if num_workers > 1:  # shards drop a worker silent for longer than --worker-timeout
            self._io.set_heartbeat(HEARTBEAT_S, lambda: [
                (s, self._header(Kind.HEARTBEAT, opts={"worker": self.worker_id}))
                for s in self.shard_map.shard_ids])

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Stop the I/O thread and close every socket; pending requests fail."""
        if self._closed:
            return
        self._closed = True
        self._io.close()
        self._starter.close()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r}, shards={self.shard_map.num_shards})"

    # -- planning ---------------------------------------------------------------

    def _check_key(self, key: Any) -> str:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"keys must be non-empty strings, got {key!r}")
        n = len(key.encode("utf-8"))
        if n > self.limits.max_key_bytes:
            raise RequestTooLarge(
                f"key of {n} bytes exceeds the cluster's {self.limits.max_key_bytes}-byte cap"
            )
        return key

    def _plan(self, meta: KeyMeta) -> tuple[tuple[int, int, int, int], ...]:
        """(part, offset, count, shard) of every part; computed once per key layout."""
        plan = self._plans.get(meta)
        if plan is None:
            ranges = part_ranges(meta.size, meta.np_dtype.itemsize, self.chunk_bytes)
            plan = tuple(
                (part, offset, count, self.shard_map.shard_for(meta.key, part))
                for part, (offset, count) in enumerate(ranges)
            )
            self._plans[meta] = plan
        return plan

    def _reply_bytes(self, header: Header) -> int:
        """Room for the values a PULL, PUSH_PULL or PULL_ROWS gets back (0: unknown),
        for the I/O engine's shared memory."""
        if header.kind == Kind.PULL_ROWS:
            table = self._tables.get(header.opts.get("table"))  # type: ignore[arg-type]
            if table is None or not header.tensors:
                return 0
            return aligned(header.tensors[0].count * table[0] * table[1].itemsize)
        if header.kind == Kind.PULL:
            parts = [(r.key, r.part) for r in header.refs]
        else:
            parts = list(dict.fromkeys((t.key, t.part) for t in header.tensors))
        total = 0
        for key, part in parts:
            meta = self._meta.get(key)
            plan = self._plan(meta) if meta is not None else ()
            if part >= len(plan):
                return 0
            total += aligned(plan[part][2] * meta.np_dtype.itemsize)  # type: ignore[union-attr]
        return total

    def _pieces(self, meta: KeyMeta, flat: Array | None = None) -> list[_Piece]:
        if flat is None:
            return [_Piece(meta, *p) for p in self._plan(meta)]
        return [
            _Piece(meta, part, offset, count, shard, flat[offset : offset + count])
            for part, offset, count, shard in self._plan(meta)
        ]

    def _batches(self, pieces: Iterable[_Piece]) -> list[tuple[int, list[_Piece]]]:
        """Group pieces per shard into messages of at most one chunk of data
        (so large tensors pipeline) and at most the key, frame and header caps (a
        descriptor takes its key's bytes and at most 9 per shape dimension plus 48:
        the header cap is kept at half, the rest left to the request's options)."""
        by_shard: dict[int, list[_Piece]] = defaultdict(list)
        for p in pieces:
            by_shard[p.shard].append(p)
        out: list[tuple[int, list[_Piece]]] = []
        key_cap = min(self.limits.max_keys, 1024)
        max_bytes = min(self.chunk_bytes, self.limits.max_request_bytes)
        max_head = self.limits.max_header_bytes // 2
        for shard, items in by_shard.items():
            batch: list[_Piece] = []
            nbytes = nframes = nhead = 0
            for p in items:
                b = p.count * p.meta.np_dtype.itemsize
                f = frame_count(b, p.meta.np_dtype.itemsize, self.frame_bytes)
                h = len(p.meta.key.encode()) + 9 * len(p.meta.shape) + 48
                if batch and (
                    nbytes + b > max_bytes
                    or len(batch) >= key_cap
                    or nframes + f > self.limits.max_frames
                    or nhead + h > max_head
                ):
                    out.append((shard, batch))
                    batch, nbytes, nframes, nhead = [], 0, 0, 0
                batch.append(p)
                nbytes += b
                nframes += f
                nhead += h
            if batch:
                out.append((shard, batch))
        return out

    def _gradient_messages(self, kind: Kind, pieces: list[_Piece]) -> list[
            tuple[int, Header, list[Any]]]:
        """PUSH or PUSH_PULL messages for gradient pieces, each key encoded as its
        compression says; top-k keys travel in messages of their own."""
        topk = [p for p in pieces if p.meta.compression[0] == "topk"]
        dense = [p for p in pieces if p.meta.compression[0] != "topk"] if topk else pieces
        messages: list[tuple[int, Header, list[Any]]] = []
        for shard, batch in self._batches(dense):
            tensors, frames = self._encode(batch, compress=True)
            messages.append((shard, self._header(kind, tensors), frames))
        for shard, batch in self._batches(topk):
            tensors, frames = self._encode_topk(batch)
            messages.append((shard, self._header(kind, tensors, opts={"encoding": "topk"}), frames))
        return messages

    def _layout(self, names: tuple[str, ...]) -> _Layout | None:
        """The cached ``_Layout`` of a call on ``names``; None when a key is compressed
        on the wire (those take the general path)."""
        try:
            return self._layouts[names]
        except KeyError:
            pass
        metas = self._ensure_meta(names)
        layout = None
        if all(metas[k].compression == ("none",) for k in names):
            index = {k: i for i, k in enumerate(names)}
            messages = []
            for shard, batch in self._batches(
                    p for k in names for p in self._pieces(metas[k])):
                tensors: list[TensorMeta] = []
                spans: list[tuple[int, int, int]] = []
                for p in batch:
                    itemsize = p.meta.np_dtype.itemsize
                    start = p.offset * itemsize
                    cuts = frame_spans(p.count * itemsize, itemsize, self.frame_bytes)
                    spans.extend((index[p.meta.key], start + a, start + b) for a, b in cuts)
                    tensors.append(TensorMeta(p.meta.key, p.part, p.meta.dtype, p.meta.shape,
                                              p.offset, p.count, len(cuts)))
                messages.append((shard, tuple(tensors), tuple(spans)))
            layout = _Layout(tuple((metas[k].shape, metas[k].np_dtype) for k in names),
                             tuple(messages))
        with self._meta_lock:
            if len(self._layouts) >= LAYOUTS_KEPT:  # calls on ever new key lists
                self._layouts.clear()
            self._layouts[names] = layout
        return layout

    def _dense_messages(self, kind: Kind, grads: Mapping[str, Array]) -> list[
            tuple[int, Header, list[Any]]] | None:
        """The messages of a PUSH or PUSH_PULL of uncompressed keys whose arrays are
        C-contiguous and of the keys' exact shape and dtype, cut by the cached
        layout; None for anything else (the general path checks and converts)."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"gradients must be a mapping of key -> array, not "
                            f"{type(grads).__name__}")
        layout = self._layout(tuple(grads))
        if layout is None:
            return None
        data = []
        for (shape, dtype), g in zip(layout.keys, grads.values(), strict=True):
            if type(g) is not np.ndarray or g.shape != shape or g.dtype != dtype \
                    or not g.flags.c_contiguous:
                return None
            data.append(memoryview(g.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        return [(shard, self._header(kind, tensors), [data[i][a:b] for i, a, b in spans])
                for shard, tensors, spans in layout.messages]

    def _encode_topk(self, batch: Sequence[_Piece]) -> tuple[tuple[TensorMeta, ...], list[Any]]:
        """Per part: add the gradient to the part's error-feedback residual, send its
        k largest-magnitude entries (values, then int64 positions, ascending) and
        keep the rest for later pushes."""
        metas: list[TensorMeta] = []
        frames: list[Any] = []
        for p in batch:
            assert p.data is not None
            ratio = float(p.meta.compression[1])
            with self._residual_lock:
                r = self._residuals.get((p.meta.key, p.part))
                if r is None:
                    r = self._residuals[(p.meta.key, p.part)] = np.zeros(p.count, p.meta.np_dtype)
                r += p.data
                k = min(p.count, max(1, int(np.ceil(ratio * p.count)))) if p.count else 0
                pos = np.sort(np.argpartition(np.abs(r), p.count - k)[p.count - k:]) if k else (
                    np.empty(0, np.int64))
                pos = pos.astype(np.int64)
                vals = r[pos]
                r[pos] = 0
            vf, pf = split_frames(vals, self.frame_bytes), split_frames(pos, self.frame_bytes)
            metas.append(TensorMeta(p.meta.key, p.part, p.meta.dtype, (k,), 0, k, len(vf)))
            metas.append(TensorMeta(p.meta.key, p.part, "int64", (k,), 0, k, len(pf)))
            frames.extend(vf)
            frames.extend(pf)
        return tuple(metas), frames

    def _encode(self, batch: Sequence[_Piece], compress: bool = False) -> tuple[
            tuple[TensorMeta, ...], list[Any]]:
        """Tensor descriptors and zero-copy frames of the pieces' data; with ``compress``
        a float16/bfloat16 key's gradient is cast first (one half-size copy). A float32
        gradient becomes ``LazyFrame``s: the engine casts it straight into shared
        memory, or into buffers of its own for the socket."""
        metas: list[TensorMeta] = []
        frames: list[Any] = []
        for p in batch:
            assert p.data is not None
            data = p.data
            half = p.meta.compression[0] if compress else "none"
            fr: Sequence[Any]
            if half in ("float16", "bfloat16") and data.dtype == np.float32:
                dtype, fr = half, _narrowed(data, half, self.frame_bytes)
            else:
                if half in ("float16", "bfloat16") and data.dtype != DTYPES[half]:
                    data = data.astype(DTYPES[half])
                dtype = dtype_name(data.dtype) or p.meta.dtype
                fr = split_frames(data, self.frame_bytes)
            metas.append(
                TensorMeta(p.meta.key, p.part, dtype, p.meta.shape, p.offset, p.count, len(fr))
            )
            frames.extend(fr)
        return tuple(metas), frames

    def _header(
        self,
        kind: Kind,
        tensors: tuple[TensorMeta, ...] = (),
        refs: tuple[KeyRef, ...] = (),
        opts: dict[str, Any] | None = None,
    ) -> Header:
        if self.worker_id and kind in (Kind.PUSH, Kind.PUSH_PULL, Kind.PULL):
            opts = {**(opts or {}), "worker": self.worker_id}  # sync/ssp steps are per worker
        return Header(
            kind,
            next(self._ids),
            client_id=self.client_id,
            tensors=tensors,
            refs=refs,
            opts=opts or {},
        )

    def _run(
        self,
        messages: Iterable[tuple[int, Header, list[Any]]],
        on_reply: Callable[[int, Header, Incoming], None],
        finish: Callable[[], Any],
        count: int | None = None,
        direct: bool = False,
    ) -> _Op:
        """Send every message at once; ``finish`` builds the result after the last reply.
        ``messages`` may be a generator of exactly ``count`` messages: each is sent as
        soon as it is made, so the shards start on it while the next one is built.
        ``direct``: the caller waits for the result on this thread, so a single message
        may go through ``IOEngine.exchange``."""
        if self._closed:
            raise PServerError("the client is closed")
        op = _Op(len(messages) if count is None else count, finish)  # type: ignore[arg-type]
        if direct and count is None and len(messages) == 1:  # type: ignore[arg-type]
            shard, header, frames = next(iter(messages))

            def only(h: Header, inc: Incoming) -> None:
                on_reply(0, h, inc)
                op.done_one()

            if self._io.exchange(shard, header, frames, self.timeout, only, op.fail):
                return op
        for i, (shard, header, frames) in enumerate(messages):

            def reply(h: Header, inc: Incoming, i: int = i) -> None:
                on_reply(i, h, inc)
                op.done_one()

            self._io.submit(shard, header, frames, self.timeout, reply, op.fail)
        return op

    def _wait(self, start: Callable[[], Completion[T] | Future[T]]) -> T:
        """Start an operation and drive I/O on the calling thread until it is done:
        no thread hand-off, and the background I/O thread is not woken. Earlier
        ``*_async`` calls still queued are sent first."""
        self._starter.flush(self.timeout)
        io = self._io
        io.enter_wait()
        try:
            return io.wait(start())
        finally:
            io.exit_wait()

    def _known(self, keys: Iterable[Any]) -> bool:
        """Whether every key's metadata is cached (a call on them needs no META first)."""
        try:
            return all(k in self._meta for k in keys)
        except TypeError:  # an unhashable key: the call itself will say what is wrong
            return False

    # -- key metadata -------------------------------------------------------------

    def _ensure_meta(self, keys: Iterable[str]) -> dict[str, KeyMeta]:
        known = self._meta
        try:  # the common case: every key seen before (hence valid)
            return {k: known[k] for k in keys}
        except (KeyError, TypeError):
            pass
        keys = [self._check_key(k) for k in keys]
        with self._meta_lock:
            missing = sorted({k for k in keys if k not in self._meta})
        if missing:
            refs_by_shard: dict[int, list[KeyRef]] = defaultdict(list)
            for k in missing:
                refs_by_shard[self.shard_map.home(k)].append(KeyRef(k, 0))
            messages: list[tuple[int, Header, list[Any]]] = []
            cap = min(self.limits.max_keys, 1024)
            for shard, refs in refs_by_shard.items():
                for i in range(0, len(refs), cap):
                    messages.append(
                        (shard, self._header(Kind.META, refs=tuple(refs[i : i + cap])), [])
                    )
            found: list[KeyMeta] = []

            def on_reply(_: int, h: Header, __: Incoming) -> None:
                for key, dtype, shape, _opt, _mode, *rest in h.opts.get("meta", []):
                    comp = tuple(rest[0]) if rest else ("none",)
                    found.append(KeyMeta(key, dtype, tuple(shape), comp))

            self._wait(lambda: self._run(messages, on_reply, lambda: None))
            with self._meta_lock:
                for m in found:
                    self._meta[m.key] = m
        with self._meta_lock:
            return {k: self._meta[k] for k in keys}

    # -- public API -----------------------------------------------------------------

    def init_async(
        self,
        arrays: Mapping[str, Array],
        *,
        optimizer: dict[str, Any] | None = None,
        mode: str | None = None,
        staleness: int | None = None,
        compression: Any = None,
    ) -> Future[dict[str, bool]]:
        """``init`` returning a Future of {key: created}. The arrays must stay unchanged
        until the Future is done (their memory is sent without a copy)."""
        settings = {"optimizer": optimizer, "mode": mode, "staleness": staleness,
                    "compression": compression}
        return self._starter.start(lambda: True, lambda: self._init(arrays, settings))

    def _init(self, arrays: Mapping[str, Array],
              settings: Mapping[str, Any]) -> Future[dict[str, bool]]:
        """Start an init; ``settings``: init's keyword arguments."""
        optimizer, mode, staleness = (settings[k] for k in ("optimizer", "mode", "staleness"))
        comp = _compression(settings["compression"])
        if not isinstance(arrays, Mapping):
            raise TypeError(f"init takes a mapping of key -> array, not "
                            f"{type(arrays).__name__}")
        metas: dict[str, KeyMeta] = {}
        flats: dict[str, Array] = {}
        for key, arr in arrays.items():
            self._check_key(key)
            flat = require_contiguous(key, arr)
            metas[key] = KeyMeta(key, wire_dtype(key, arr), tuple(int(d) for d in arr.shape),
                                 comp)
            flats[key] = flat
        opts: dict[str, Any] = {}
        if optimizer is not None:
            opts["optimizer"] = _optimizer(optimizer)
        if mode is not None:
            if mode not in ("async", "sync", "ssp"):
                raise InvalidArgument(f"mode must be 'async', 'sync' or 'ssp', not {mode!r}")
            opts["mode"] = mode
        if staleness is not None:
            opts["staleness"] = _count(staleness, "staleness", 0)
        if mode in ("sync", "ssp") or self.num_workers > 1:
            opts["workers"] = self.num_workers
        if comp != ("none",):
            opts["compression"] = list(comp)
        pieces = [p for k, m in metas.items() for p in self._pieces(m, flats[k])]
        created: dict[str, bool] = dict.fromkeys(metas, False)

        def send(phase: list[_Piece], finish: Callable[[], Any]) -> Future[Any]:
            batches = self._batches(phase)
            messages: list[tuple[int, Header, list[Any]]] = []
            for shard, batch in batches:
                tensors, frames = self._encode(batch)
                messages.append(
                    (shard, self._header(Kind.INIT, tensors, opts=opts), frames)
                )

            def on_reply(i: int, h: Header, _: Incoming) -> None:
                for p, c in zip(batches[i][1], h.opts.get("created", []), strict=False):
                    created[p.meta.key] |= bool(c)

            return self._run(messages, on_reply, finish).as_future()

        def done() -> dict[str, bool]:
            # A key that already existed keeps its own compression (init is then a
            # no-op): only keys this call created are cached with its settings; the
            # others are looked up (META) on first use unless already known.
            with self._meta_lock:
                self._meta.update((k, m) for k, m in metas.items() if created[k])
            return created

        # Part 0 decides: its shard refuses a key that exists with another shape or
        # dtype, and only then are the other parts of chunked keys sent, so a refused
        # init leaves no stray parts on other shards.
        rest = [p for p in pieces if p.part != 0]
        if not rest:
            return send(pieces, done)
        result: Future[dict[str, bool]] = Future()

        def then(first: Future[Any]) -> None:
            exc = first.exception()
            if exc is not None:
                result.set_exception(exc)
                return
            try:
                second = send(rest, done)
            except Exception as err:  # e.g. the client closed meanwhile: never leave it pending
                result.set_exception(err)
                return
            second.add_done_callback(
                lambda f: result.set_exception(e)
                if (e := f.exception()) is not None
                else result.set_result(f.result())
            )

        send([p for p in pieces if p.part == 0], lambda: None).add_done_callback(then)
        return result

    def init(
        self,
        arrays: Mapping[str, Array],
        *,
        optimizer: dict[str, Any] | None = None,
        mode: str | None = None,
        staleness: int | None = None,
        compression: Any = None,
    ) -> dict[str, bool]:
        """Create the keys that are absent, with these initial values.

        Initializing an existing key with the same shape and dtype is a no-op (its
        value is not changed); another shape or dtype raises ``ShapeMismatch``.
        ``optimizer`` is a dict such as ``{"name": "sgd", "lr": 0.1}``, or a name
        (default sgd with lr 0.01). Returns {key: True if this call created it}.
        """
        settings = {"optimizer": optimizer, "mode": mode, "staleness": staleness,
                    "compression": compression}
        return self._wait(lambda: self._init(arrays, settings))

    def _grad_pieces(self, grads: Mapping[str, Array]) -> list[_Piece]:
        metas = self._ensure_meta(grads.keys())
        pieces = []
        for key, g in grads.items():
            m = metas[key]
            flat = require_contiguous(key, g)
            half_ok = m.dtype in ("float32", "float64") and g.dtype in _HALF_DTYPES
            if tuple(g.shape) != m.shape or (g.dtype != m.np_dtype and not half_ok):
                raise ShapeMismatch(
                    f"gradient for {key!r} is {g.dtype}{list(g.shape)}, "
                    f"the key holds {m.dtype}{list(m.shape)}",
                    key=key,
                )
            pieces.extend(self._pieces(m, flat))
        return pieces

    def push_async(self, grads: Mapping[str, Array]) -> Future[None]:
        """``push`` returning a Future. The gradient arrays are sent without a copy:
        the caller must not change them until the Future is done."""
        return self._starter.start(lambda: self._known(grads), lambda: self._push(grads))

    def _push(self, grads: Mapping[str, Array], direct: bool = False) -> _Op:
        messages = self._dense_messages(Kind.PUSH, grads)
        if messages is None:
            messages = self._gradient_messages(Kind.PUSH, self._grad_pieces(grads))
        return self._run(messages, lambda *_: None, lambda: None, direct=direct)

    def push(self, grads: Mapping[str, Array]) -> None:
        """Apply each key's optimizer to its gradient; returns once applied.

        With ``{"name": "sgd", "lr": 0.5}`` a push of ``g`` changes the value by
        exactly ``-0.5 * g``; with ``sum`` it adds ``g``.
        """
        self._wait(lambda: self._push(grads, direct=True))

    def _collect(self, out: dict[str, Array], make: Mapping[str, KeyMeta] | None = None,
                 ) -> Callable[[int, Header, Incoming], None]:
        """A reply handler copying returned parts into the flat views of ``out``. Keys
        in ``make`` get their result array here: a key whose whole value arrives in
        one frame becomes a view of that frame (no copy; the array keeps the received
        message alive; a copy when the frame lies in shared memory), any other a new
        array filled part by part."""
        flats = {k: v.reshape(-1) for k, v in out.items()}

        def on_reply(_: int, h: Header, inc: Incoming) -> None:
            i = 0
            for t in h.tensors:
                dest = flats.get(t.key)
                if dest is None and make is not None and t.key in make:
                    m = make[t.key]
                    if t.nframes == 1 and t.offset == 0 and t.count == m.size \
                            and t.np_dtype == m.np_dtype:
                        value = np.frombuffer(inc.frames[i], m.np_dtype).reshape(m.shape)
                        out[t.key] = value.copy() if inc.borrowed else value
                        flats[t.key] = out[t.key].reshape(-1)
                        i += 1
                        continue
                    dest = flats[t.key] = np.empty(m.size, m.np_dtype)
                    out[t.key] = dest.reshape(m.shape)
                if dest is None or t.np_dtype != dest.dtype or t.offset + t.count > dest.size:
                    raise PServerError(f"unexpected part {t.key!r}/{t.part} in reply")
                pos = t.offset
                for frame in inc.frames[i : i + t.nframes]:
                    v = np.frombuffer(frame, dtype=t.np_dtype)
                    dest[pos : pos + v.size] = v
                    pos += v.size
                i += t.nframes

        return on_reply

    def _pull(self, metas: Mapping[str, KeyMeta], out: dict[str, Array],
              make: Mapping[str, KeyMeta] | None = None, direct: bool = False) -> _Op:
        pieces = [p for m in metas.values() for p in self._pieces(m)]
        messages: list[tuple[int, Header, list[Any]]] = []
        for shard, batch in self._batches(pieces):
            refs = tuple(KeyRef(p.meta.key, p.part) for p in batch)
            messages.append((shard, self._header(Kind.PULL, refs=refs), []))
        return self._run(messages, self._collect(out, make),
                         lambda: {k: out[k] for k in metas},  # in the order asked
                         direct=direct)

    def pull_into_async(self, out: Mapping[str, Array]) -> Future[dict[str, Array]]:
        """Zero-allocation ``pull``: writes each key's value into the caller's array
        ``out[key]`` (C-contiguous, the key's shape and dtype). The caller owns the
        arrays; they hold the new values once the Future is done and must not be
        read or written until then."""
        return self._starter.start(lambda: self._known(out), lambda: self._pull_into(out))

    def _pull_into(self, out: Mapping[str, Array], direct: bool = False) -> _Op:
        metas = self._ensure_meta(out.keys())
        self._check_outputs(out, metas)
        return self._pull(metas, dict(out), direct=direct)

    def pull_into(self, out: Mapping[str, Array]) -> dict[str, Array]:
        """See ``pull_into_async``."""
        return self._wait(lambda: self._pull_into(out, direct=True))

    def pull_async(self, keys: Sequence[str]) -> Future[dict[str, Array]]:
        """``pull`` returning a Future (errors too come out of it)."""
        if isinstance(keys, str):
            raise TypeError("pull_async takes a list of keys, not a single string")
        keys = list(keys)

        def start() -> _Op:
            metas = self._ensure_meta(keys)
            return self._pull(metas, {}, metas)

        return self._starter.start(lambda: self._known(keys), start)

    def pull(self, keys: Sequence[str]) -> dict[str, Array]:
        """The current value of each key, as new arrays the caller owns."""
        if isinstance(keys, str):
            raise TypeError("pull takes a list of keys, not a single string")
        metas = self._ensure_meta(keys)
        return self._wait(lambda: self._pull(metas, {}, metas, direct=True))

    def _check_outputs(self, out: Mapping[str, Array], metas: Mapping[str, KeyMeta]) -> None:
        for key, arr in out.items():
            m = metas.get(key)
            if m is None:
                raise InvalidArgument(f"output {key!r} has no matching key in this call")
            require_contiguous(key, arr)
            if not arr.flags.writeable:
                raise InvalidArgument(f"output array for {key!r} is read-only")
            if tuple(arr.shape) != m.shape or arr.dtype != m.np_dtype:
                raise ShapeMismatch(
                    f"output for {key!r} is {arr.dtype}{list(arr.shape)}, "
                    f"the key holds {m.dtype}{list(m.shape)}",
                    key=key,
                )

    def push_pull_into_async(
        self, grads: Mapping[str, Array], out: Mapping[str, Array]
    ) -> Future[dict[str, Array]]:
        """Zero-allocation ``push_pull``: the new values are written into the caller's
        arrays ``out[key]`` (one per pushed key; C-contiguous, writeable, the key's
        shape and dtype). The caller owns ``out`` and must not touch it, nor change
        ``grads``, until the Future is done."""
        return self._starter.start(lambda: self._known(grads) and self._known(out),
                                   lambda: self._push_pull_into(grads, out))

    def _push_pull_into(self, grads: Mapping[str, Array], out: Mapping[str, Array],
                        direct: bool = False) -> _Op:
        if set(out) != set(grads):
            raise InvalidArgument("push_pull_into needs exactly one output per pushed key")
        messages = self._dense_messages(Kind.PUSH_PULL, grads)
        if messages is None:
            messages = self._gradient_messages(Kind.PUSH_PULL, self._grad_pieces(grads))
        self._check_outputs(out, self._ensure_meta(out.keys()))
        result = dict(out)
        return self._run(messages, self._collect(result), lambda: result, direct=direct)

    def push_pull_into(
        self, grads: Mapping[str, Array], out: Mapping[str, Array]
    ) -> dict[str, Array]:
        """See ``push_pull_into_async``; returns ``out``."""
        return self._wait(lambda: self._push_pull_into(grads, out, direct=True))

    def push_pull_async(self, grads: Mapping[str, Array]) -> Future[dict[str, Array]]:
        """``push_pull`` returning a Future; the gradients must stay unchanged until
        it is done."""
        return self._starter.start(lambda: self._known(grads), lambda: self._push_pull(grads))

    def _push_pull(self, grads: Mapping[str, Array], direct: bool = False) -> _Op:
        messages = self._dense_messages(Kind.PUSH_PULL, grads)
        if messages is None:
            messages = self._gradient_messages(Kind.PUSH_PULL, self._grad_pieces(grads))
        out: dict[str, Array] = {}
        return self._run(messages, self._collect(out, self._ensure_meta(grads.keys())),
                         lambda: {k: out[k] for k in grads}, direct=direct)

    def push_pull(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        """Push, then return each key's value right after this push was applied,
        in one round trip."""
        return self._wait(lambda: self._push_pull(grads, direct=True))

    # -- sparse tables ----------------------------------------------------------------

    def create_table(self, name: str, dim: int, *, dtype: str = "float32",
                     optimizer: dict[str, Any] | None = None,
                     init: tuple[Any, ...] | str = ("zeros",)) -> bool:
        """Create a sparse table of ``dim``-wide rows on every shard (absent rows
        are created on first push). ``optimizer`` defaults to adagrad lr 0.01;
        ``init`` is ``("zeros",)`` (or ``"zeros"``), ``("uniform", a, b)`` or ``("normal", std)``,
        deterministic per (table, row id). Creating an existing table with the same
        dim and dtype is a no-op (returns False); another dim or dtype raises
        ``ShapeMismatch``."""
        self._check_key(name)
        if isinstance(init, str):
            init = (init,)
        if not isinstance(init, list | tuple):
            raise InvalidArgument(f"init must be ('zeros',), ('uniform', a, b) or "
                                  f"('normal', std), not {init!r}")
        opts: dict[str, Any] = {"table": name, "dim": _count(dim, "dim", 1),
                                "dtype": dtype if isinstance(dtype, str) else _dtype_name(dtype),
                                "init": _wire_value(init, "init")}
        if optimizer is not None:
            opts["optimizer"] = _optimizer(optimizer)
        messages: list[tuple[int, Header, list[Any]]] = [
            (s, self._header(Kind.CREATE_TABLE, opts=opts), [])
            for s in self.shard_map.shard_ids
        ]
        created: list[bool] = []

        def on_reply(_: int, h: Header, __: Incoming) -> None:
            created.append(bool(h.opts.get("created")))

        self._wait(lambda: self._run(messages, on_reply, lambda: None))
        with self._meta_lock:
            self._tables.pop(name, None)
        return any(created)

    def _table(self, name: str) -> tuple[int, np.dtype[Any]]:
        """(dim, dtype) of a table, asked once of its first shard and cached."""
        known = self._tables.get(name)
        if known is not None:
            return known
        self._check_key(name)
        meta: dict[str, Any] = {}

        def on_reply(_: int, h: Header, __: Incoming) -> None:
            meta.update(h.opts)

        header = self._header(Kind.TABLE_META, opts={"table": name})
        self._wait(lambda: self._run([(self.shard_map.shard_ids[0], header, [])], on_reply,
                                     lambda: None))
        found = (int(meta["dim"]), np.dtype(meta["dtype"]))
        with self._meta_lock:
            self._tables[name] = found
        return found

    @staticmethod
    def _row_ids(ids: Any) -> Array:
        a = np.asarray(ids)
        if a.dtype == np.int64:
            a = a.view(np.uint64)
        if a.ndim != 1 or a.dtype != np.uint64:
            raise InvalidArgument(f"row ids must be a 1-D uint64 (or int64) array, not "
                                  f"{a.dtype}{list(a.shape)}")
        return np.ascontiguousarray(a)

    def _row_batches(self, ids: Array, dim: int, itemsize: int) -> list[tuple[int, Array]]:
        """(shard, positions) groups: ids by owning shard, cut so one message carries
        at most one chunk of row data and the cluster's key cap."""
        order, offsets = partition_by_shard(ids, self.shard_map.row_seed,
                                            self.shard_map.num_shards)
        budget = min(self.chunk_bytes, self.limits.max_request_bytes)
        per = max(1, budget // (dim * itemsize + 8))  # a row's data and its uint64 id
        out = []
        for i, shard in enumerate(self.shard_map.shard_ids):
            pos = order[offsets[i]:offsets[i + 1]]
            for j in range(0, pos.size, per):
                out.append((shard, pos[j:j + per]))
        return out

    def pull_rows(self, name: str, ids: Any) -> Array:
        """Rows of table ``name`` for ``ids`` as a new (len(ids), dim) array, in the
        order of ``ids``; ids never pushed read as their initial value."""
        ids = self._row_ids(ids)
        dim, dtype = self._table(name)
        out = np.empty((ids.size, dim), dtype)
        batches = self._row_batches(ids, dim, dtype.itemsize)
        messages = []
        for shard, pos in batches:
            id_frames = split_frames(ids[pos], self.frame_bytes)
            meta = TensorMeta(name, 0, "uint64", (pos.size,), 0, pos.size, len(id_frames))
            messages.append((shard, self._header(Kind.PULL_ROWS, (meta,), opts={"table": name}),
                             id_frames))

        def on_reply(i: int, h: Header, inc: Incoming) -> None:
            pos = batches[i][1]
            (t,) = h.tensors
            if t.shape != (pos.size, dim) or t.np_dtype != dtype:
                raise PServerError(f"unexpected rows {t.dtype}{list(t.shape)} in reply")
            at = 0  # frames of whole rows are scattered straight into place
            for block in row_blocks(inc.frames, dtype, dim, pos.size):
                scatter_rows(out, pos[at:at + block.shape[0]], block)
                at += block.shape[0]

        return self._wait(lambda: self._run(messages, on_reply, lambda: out))

    def push_rows(self, name: str, ids: Any, grads: Array) -> None:
        """Apply the table's optimizer to the rows of ``ids`` with ``grads``
        (len(ids), dim); repeated ids are summed first. Returns once applied."""
        ids = self._row_ids(ids)
        dim, dtype = self._table(name)
        if not isinstance(grads, np.ndarray) or grads.shape != (ids.size, dim) \
                or grads.dtype != dtype:
            raise ShapeMismatch(f"row gradients must be {dtype}[{ids.size}, {dim}], not "
                                f"{getattr(grads, 'dtype', type(grads).__name__)}"
                                f"{list(getattr(grads, 'shape', ()))}", key=name)
        grads = np.ascontiguousarray(grads)
        batches = self._row_batches(ids, dim, dtype.itemsize)

        def messages() -> Iterator[tuple[int, Header, list[Any]]]:
            for shard, pos in batches:  # made one by one: a shard starts on its rows
                id_frames = split_frames(ids[pos], self.frame_bytes)  # while the next
                # batch is gathered (one memcpy per row: ~2x np.take, ~3x grads[pos])
                grad_frames = split_rows(gather_rows(grads, pos), self.frame_bytes)
                metas = (TensorMeta(name, 0, "uint64", (pos.size,), 0, pos.size,
                                    len(id_frames)),
                         TensorMeta(name, 0, dtype.name, (pos.size, dim), 0, pos.size * dim,
                                    len(grad_frames)))
                yield (shard, self._header(Kind.PUSH_ROWS, metas, opts={"table": name}),
                       id_frames + grad_frames)

        self._wait(lambda: self._run(messages(), lambda *_: None, lambda: None, len(batches)))

    def keys(self) -> dict[str, KeyMeta]:
        """Every dense key in the cluster, with its dtype, shape and compression."""
        found: dict[str, KeyMeta] = {}

        def on_reply(_: int, h: Header, __: Incoming) -> None:
            for key, dtype, shape, opt, _mode, *rest in h.opts.get("keys", []):
                name = str(opt.get("name", "")) if isinstance(opt, dict) else ""
                found[key] = KeyMeta(key, dtype, tuple(shape), tuple(rest[0]) if rest else (
                    "none",), name)

        messages: list[tuple[int, Header, list[Any]]] = [
            (s, self._header(Kind.KEYS), []) for s in self.shard_map.shard_ids]
        self._wait(lambda: self._run(messages, on_reply, lambda: None))
        with self._meta_lock:
            self._meta.update(found)
        return dict(sorted(found.items()))

    def barrier(self) -> None:
        """Wait until all ``num_workers`` workers (``connect``'s arguments) called
        ``barrier`` as many times as this one; ``Unavailable`` if they do not within
        the client's timeout. With one worker it returns at once."""
        self._barrier_gen += 1
        if self.num_workers == 1:
            return
        opts = {"gen": self._barrier_gen, "worker": self.worker_id, "workers": self.num_workers}
        header = self._header(Kind.BARRIER, opts=opts)
        self._wait(lambda: self._run([(self.shard_map.shard_ids[0], header, [])],
                                     lambda *_: None, lambda: None))

    def status(self) -> dict[str, Any]:
        """The cluster status: per shard its replicas (id, address, pid, role, term,
        commit_index, applied_index) and keys and bytes held."""
        return _bootstrap(self._ctx, self.address, Kind.STATUS, self.timeout)


def connect(
    address: str | None = None,
    *,
    worker_id: int | None = None,
    num_workers: int | None = None,
    timeout: float = 30.0,
    ipc: bool | None = None,
    shm: bool | None = None,
) -> Client:
    """Connect to the cluster whose bootstrap address is ``address``. Without one:
    ``$PSERVER_ADDRESS``, else the first ``cluster.ps`` entry of ``$TF_CONFIG``.
    Without ``worker_id``/``num_workers``: the task in ``$TF_CONFIG`` (a chief is
    worker 0), else torchrun's ``$RANK``/``$WORLD_SIZE``, else 0 of 1.
    ``ipc=False`` (or ``PSERVER_IPC=0``) keeps same-host clients on tcp; over ipc,
    requests of 3 MiB and more (data plus reply) go by shared memory unless
    ``shm=False`` (or ``PSERVER_SHM=0``). Raises
    ``Unavailable`` when the bootstrap does not answer within ``timeout`` seconds."""
    env_address, env_worker, env_workers = launcher_settings(os.environ)
    address = address or env_address
    if not address:
        raise ValueError("no address given, and neither PSERVER_ADDRESS nor TF_CONFIG's "
                         "cluster.ps names one")
    return Client(address, worker_id=env_worker if worker_id is None else worker_id,
                  num_workers=env_workers if num_workers is None else num_workers,
                  timeout=timeout, ipc=ipc, shm=shm)


def launcher_settings(env: Mapping[str, str]) -> tuple[str | None, int, int]:
    """(address, worker id, worker count) from the environment launchers set:
    ``PSERVER_ADDRESS``; ``TF_CONFIG`` (``{"cluster": {"ps": [...], "chief": [...],
    "worker": [...]}, "task": {"type": ..., "index": ...}}``); torchrun's ``RANK`` and
    ``WORLD_SIZE``. Missing pieces default to no address and worker 0 of 1."""
    import json

    address = env.get("PSERVER_ADDRESS") or None
    worker, workers = 0, 1
    raw = env.get("TF_CONFIG")
    tf: dict[str, Any] = {}
    if raw:
        try:
            tf = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"TF_CONFIG is not JSON: {exc}") from None
    cluster, task = tf.get("cluster", {}), tf.get("task", {})
    if address is None and cluster.get("ps"):
        ps = str(cluster["ps"][0])
        address = ps if "://" in ps else f"tcp://{ps}"
    if cluster.get("worker") or cluster.get("chief"):
        chiefs = len(cluster.get("chief", []))
        workers = chiefs + len(cluster.get("worker", []))
        kind, index = task.get("type"), int(task.get("index", 0))
        worker = index if kind == "chief" else chiefs + index
    elif "RANK" in env and "WORLD_SIZE" in env:
        worker, workers = int(env["RANK"]), int(env["WORLD_SIZE"])
    return address, worker, workers
