"""The shard server: one replica process serving one shard.

Owns the driver loop that wires the transport, the request validation and the
``ShardStateMachine``: receive a message, validate header and frames against
the limits, check the command against the state, apply it, reply. The loop
never blocks on a client: replies are sent without blocking (a client whose
queue is full loses that reply and times out on its own deadline), and a
malformed message gets an error reply while other clients keep being served.
A mutation seen before (same client id and sequence number) is answered from
the session table instead of being applied again. With a data dir, the shard
saves its whole state on a clean stop and loads it at start (``snapshot.py``).
A replicated shard (``replica.py``) reuses this class and puts the Raft log
between the check and the apply of ``apply.mutate``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pserver.protocol.codec import (
    check_frames,
    decode_header,
    encode_header,
    encode_plain_reply,
    plain_fields,
    reply_header,
)
from pserver.protocol.errors import (
    InternalError,
    InvalidArgument,
    ProtocolError,
    PServerError,
)
from pserver.protocol.frames import split_frames, split_rows
from pserver.protocol.schema import (
    MAX_WORKERS,
    MUTATING_KINDS,
    Header,
    KeyRef,
    Kind,
    Limits,
    ShmRef,
    TensorMeta,
)
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.shm import Mappings, aligned, as_bytes
from pserver.protocol.transport import Endpoint, Incoming, new_context

from . import snapshot
from .apply import mutate, rows_request, split_by_tensor
from .optim import warm_up
from .shard import ShardStateMachine, Slot

log = logging.getLogger(__name__)

DRAIN_BATCH = 64
SNAPSHOT_FILE = "state.snap"
PARK_LIMIT_S = 600.0  # a read parked longer than any sane deadline is dropped
# Workers enter barriers in order, so a few generations are pending at a time: more
# than this come from a client gone wrong (each holds its requests' messages).
MAX_PENDING_BARRIERS = 64


def _exact_ints(t: list[Any]) -> bool:
    """The integer fields of a descriptor that equals ``Slot.whole_push`` are ints, not
    the bools or floats that compare equal to them (which ``decode_header`` refuses)."""
    return (type(t[1]) is int and type(t[4]) is int and type(t[5]) is int
            and type(t[6]) is int and all(type(d) is int for d in t[3]))


class ShardServer:
    """Serves one shard on a ROUTER bound to ``endpoints`` (tcp and optionally ipc)."""

    def __init__(
        self,
        shard_id: int,
        shard_map: ShardMap,
        endpoints: Sequence[str],
        *,
        limits: Limits | None = None,
        frame_bytes: int = 1 << 20,
        default_mode: str = "async",
        chunk_bytes: int = 4 << 20,
        parent_pid: int | None = None,
        device: str = "cpu",
        data_dir: str | Path | None = None,
        workers: int = 1,
        staleness: int = 0,
        worker_timeout: float = 30.0,
    ) -> None:
        self.default_workers, self.default_staleness = workers, staleness
        self.worker_timeout = worker_timeout
        self._last_seen: dict[int, float] = {}  # worker -> last heartbeat or request
        self.shard_id = shard_id
        self.limits = limits or Limits()
        self.frame_bytes = frame_bytes
        self.parent_pid = parent_pid
        self.state = ShardStateMachine(shard_id, shard_map, default_mode, chunk_bytes, device)
        if device == "cpu":
            warm_up()  # load the kernels now: the first push took ~1.5 s otherwise
        self.snapshot_path = Path(data_dir) / SNAPSHOT_FILE if data_dir is not None else None
        self._restore()
        self.ctx = new_context()
        self.endpoint = Endpoint.router_bound(self.ctx, endpoints, self.limits)
        self.close_linger_ms = 0  # how long replies queued at close may take to leave
        self.started = time.time()
        self._stop = False
        self.requests = 0
        self.errors = 0
        # gen -> (workers, each waiting worker's request, when the first one came)
        self._barriers: dict[int, tuple[int, dict[int, tuple[Incoming, Header]], float]] = {}
        self._parked: list[tuple[float, int, Incoming, Header, list[Slot]]] = []
        self._shm: Mappings | None = None  # clients' shared memory, opened on first use

    @property
    def endpoints(self) -> list[str]:
        return self.endpoint.endpoints

    def stop(self) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def serve_forever(self) -> None:
        next_parent_check = time.monotonic() + 1.0
        try:
            while not self._stop:
                incoming = self.endpoint.recv_within(200)
                handled = 0
                while incoming is not None:
                    self.handle(incoming)
                    handled += 1
                    if handled == DRAIN_BATCH:  # see to the workers now and then
                        break
                    incoming = self.endpoint.recv()
                self._check_workers()
                if time.monotonic() >= next_parent_check:
                    next_parent_check = time.monotonic() + 1.0
                    self.drop_dead_shm()
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        log.warning(
                            "shard %d: supervisor %d is gone; exiting",
                            self.shard_id,
                            self.parent_pid,
                        )
                        break
        finally:
            self.close()

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self.endpoint.close(self.close_linger_ms)
        self.ctx.term()
        if self.snapshot_path is not None:
            size = snapshot.save(self.state, self.snapshot_path)
            log.info("shard %d: saved %d bytes of state to %s", self.shard_id, size,
                     self.snapshot_path)

    def _restore(self) -> None:
        """Load the state a clean stop saved. The file is then set aside, so a crash
        later restarts this shard empty rather than silently rolled back (until the
        replicated log keeps every acknowledged update)."""
        path = self.snapshot_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return
        snapshot.load(path, self.state)
        os.replace(path, path.with_name(path.name + ".loaded"))
        log.info("shard %d: restored %d key parts and %d tables from %s", self.shard_id,
                 len(self.state.slots), len(self.state.tables), path)

    # -- one message ----------------------------------------------------------

    def attach_shm(self, incoming: Incoming, header: Header) -> Incoming:
        """The message with its data frames taken from the client's shared memory
        (PROTOCOL.md §4.6). They are views, valid until the client has its reply;
        anything that keeps the data longer gets a copy: a replica's log, INIT, and
        a sync PUSH, whose gradient waits for the step after its reply went."""
        ref = header.shm
        assert ref is not None
        if incoming.frames:
            raise ProtocolError("a message with its data in shared memory carries no "
                                "data frames")
        if self._shm is None:
            self._shm = Mappings()
        views = self._shm.spans(ref.name, ref.spans)
        if ref.out is not None:
            self._shm.region(ref.name, *ref.out)  # a bad region is refused before applying
        if views and self._must_copy(header):
            views = [memoryview(bytes(v)) for v in views]
        return Incoming(incoming.identity, incoming.header, views, incoming.parts)

    def drop_dead_shm(self) -> None:
        """Unmap the shared memory of clients that exited (checked once a second)."""
        if self._shm is not None and len(self._shm):
            self._shm.drop_dead()

    def _must_copy(self, header: Header) -> bool:
        """Whether this request's data outlives its reply here (then it is copied
        out of the client's shared memory)."""
        if header.kind in (Kind.PUSH_ROWS, Kind.PULL_ROWS):
            return False  # rows apply at once; ids are read at once
        if header.kind not in (Kind.PUSH, Kind.PUSH_PULL):
            return True
        for t in header.tensors:
            slot = self.state.slots.get((t.key, t.part))
            if slot is None or (slot.mode == "sync" and header.kind == Kind.PUSH):
                return True
        return False

    def _shm_values(self, incoming: Incoming, header: Header, slots: Sequence[Slot]) -> bool:
        """Reply with the slots' values in the request's shared memory (``_shm_reply``)."""
        if self.state.memory.device != "cpu":
            return False
        return self._shm_reply(incoming, header, [s.value for s in slots],
                               [s.meta(1) for s in slots])

    def _shm_reply(self, incoming: Incoming, header: Header, arrays: Sequence[Any],
                   metas: Sequence[TensorMeta]) -> bool:
        """Reply with ``arrays`` (host arrays, one per descriptor in ``metas``) written
        into the region of the client's shared memory that the request offered;
        False (nothing sent) when there is none or they do not fit there."""
        ref = header.shm
        if ref is None or ref.out is None or self._shm is None:
            return False
        off, cap = ref.out
        if sum(aligned(a.nbytes) for a in arrays) > cap:
            return False
        try:  # checked at the request already; a parked read may come long after
            region = self._shm.region(ref.name, off, cap)
        except PServerError as exc:
            log.info("shard %d: values sent as frames: %s", self.shard_id, exc)
            return False
        pos = 0
        spans: list[tuple[int, int]] = []
        for a in arrays:
            n = a.nbytes
            region[pos : pos + n] = as_bytes(a)
            spans.append((off + pos, n))
            pos += aligned(n)
        reply = reply_header(header, tensors=tuple(metas))
        reply.shm = ShmRef(ref.name, tuple(spans))
        self._reply(incoming, reply)
        return True

    def _reply(self, incoming: Incoming, header: Header, frames: Sequence[Any] = ()) -> None:
        self._reply_raw(incoming, encode_header(header), frames)

    def _reply_raw(self, incoming: Incoming, header: bytes, frames: Sequence[Any] = ()) -> None:
        if not self.endpoint.send_raw(header, frames, identity=incoming.identity):
            log.warning("shard %d: reply to a client with a full queue dropped", self.shard_id)

    def _error(self, incoming: Incoming, request: Header | None, exc: PServerError) -> None:
        self.errors += 1
        opts = {k: v for k, v in exc.details.items() if isinstance(v, str | int | float | None)}
        opts["shard"] = self.shard_id
        header = reply_header(request, error=int(exc.code), message=exc.message, opts=opts)
        if request is None and "request_id" in exc.details:
            header = Header(
                Kind.REPLY,
                int(exc.details["request_id"]),
                error=header.error,
                message=header.message,
                opts=opts,
            )
        self._reply(incoming, header)

    def handle(self, incoming: Incoming) -> None:
        self.requests += 1
        if self._whole_pushes(incoming):
            return
        header: Header | None = None
        try:
            header = decode_header(incoming.header, self.limits)
            if header.shm is not None:
                incoming = self.attach_shm(incoming, header)
            check_frames(header, [f.nbytes for f in incoming.frames], self.limits)
            self._dispatch(incoming, header)
        except PServerError as exc:
            if isinstance(exc, ProtocolError):
                log.info("shard %d: malformed message: %s", self.shard_id, exc)
            self._error(incoming, header, exc)
        except Exception as exc:
            log.exception(
                "shard %d: internal error on %s",
                self.shard_id,
                header.kind.name if header else "message",
            )
            self._error(incoming, header, InternalError(f"{type(exc).__name__}: {exc}"))

    def _whole_pushes(self, incoming: Incoming) -> bool:
        """The common case of a training step, without making Header or TensorMeta
        objects: a PUSH or PUSH_PULL of whole async parts held on the host, each in
        one frame that matches ``Slot.whole_push`` exactly (so it needs no other
        check), not seen before. Handled as ``_dispatch`` would; False (nothing
        done) for anything else, which the general path takes and checks."""
        fields = plain_fields(incoming.header, self.limits)
        if fields is None:
            return False
        kind, rid, cid, seq, opts, tensors = fields
        if kind not in _WHOLE_KINDS or not tensors or len(tensors) != len(incoming.frames) \
                or self.state.memory.device != "cpu":
            return False
        worker = opts.get("worker", 0) if opts else 0
        if (opts and opts.keys() != {"worker"}) or type(worker) is not int \
                or not 0 <= worker < MAX_WORKERS:
            return False
        slots: list[Slot] = []
        seen: set[int] = set()
        total = 0
        for t, frame in zip(tensors, incoming.frames, strict=True):
            try:
                slot = self.state.slots.get((t[0], t[1]))
            except (TypeError, IndexError, KeyError):  # not a list of a hashable key
                return False
            if slot is None or t != slot.whole_push() or not _exact_ints(t) \
                    or frame.nbytes != slot.value.nbytes \
                    or frame.nbytes > self.frame_bytes or id(slot) in seen:
                return False
            slots.append(slot)
            seen.add(id(slot))
            total += frame.nbytes
        if total > self.limits.max_request_bytes:
            return False  # the general path refuses it
        try:
            if self.state.sessions.duplicate(cid, seq) is not None:
                return False  # answered from the session table by the general path
        except PServerError:  # too old to tell: the general path refuses it
            return False
        try:
            if opts:
                self._seen_worker(worker)
            self.state.apply_whole_pushes(slots, incoming.frames, worker)
            self.state.sessions.record(cid, seq, {})
            if kind == Kind.PUSH_PULL:
                self._send_values(incoming, None, slots, encode_plain_reply(rid, tensors))
            else:
                self._reply_raw(incoming, encode_plain_reply(rid))
            if self._parked:
                self._release_parked()
        except Exception as exc:
            log.exception("shard %d: internal error on %s", self.shard_id, Kind(kind).name)
            self._error(incoming, Header(Kind(kind), rid),
                        InternalError(f"{type(exc).__name__}: {exc}"))
        return True

    def _dispatch(self, incoming: Incoming, header: Header) -> None:
        kind = header.kind
        if "worker" in header.opts:
            self._seen(header)
        if kind == Kind.PING:
            self._reply(incoming, reply_header(header, opts=self.ping_info()))
        elif kind == Kind.STATUS:
            self._reply(incoming, reply_header(header, opts=self.status()))
        elif kind in MUTATING_KINDS:
            if not self._answer_duplicate(incoming, header):
                self._mutation(incoming, header)
        elif kind == Kind.PULL:
            self._send_when_ready(incoming, header, self.state.check_refs(header.refs))
        elif kind == Kind.TABLE_META:
            table = self.state.table(header.opts.get("table"))
            self._reply(incoming, reply_header(header, opts=table.spec.to_wire()))
        elif kind == Kind.PULL_ROWS:
            name, ids, _ = rows_request(header, self._data(header, incoming), with_grads=False)
            table = self.state.check_rows(name, ids)
            rows = table.pull(ids)
            def meta(nframes: int) -> TensorMeta:
                return TensorMeta(table.spec.name, 0, table.spec.dtype, rows.shape, 0,
                                  rows.size, nframes)

            if header.shm is not None and self._shm_reply(incoming, header, [rows], [meta(1)]):
                return
            frames = split_rows(rows, self.frame_bytes)
            self._reply(incoming, reply_header(header, tensors=(meta(len(frames)),)), frames)
        elif kind == Kind.KEYS:
            self._reply(incoming, reply_header(header, opts={"keys": [
                s.describe() for s in self.state.slots.values() if s.part == 0]}))
        elif kind == Kind.HEARTBEAT:
            self._reply(incoming, reply_header(header))
        elif kind == Kind.BARRIER:
            self._barrier(incoming, header)
        elif kind == Kind.META:
            slots = self.state.check_refs(header.refs)
            self._reply(
                incoming, reply_header(header, opts={"meta": [s.describe() for s in slots]})
            )
        else:
            raise InvalidArgument(f"a shard does not serve {kind.name} requests")

    def _mutation(self, incoming: Incoming, header: Header) -> None:
        """Check and apply one mutation here, then answer it (an unreplicated shard)."""
        opts = self.mutate(header, self._data(header, incoming))
        self.answer_mutation(incoming, header, opts)

    def mutate(self, header: Header, data: list[list[memoryview]], *,
               apply: bool = True) -> dict[str, Any]:
        """Check one mutation against the state and, with ``apply``, apply it
        (``apply.mutate``); returns the reply's opts."""
        return mutate(self.state, header, data, apply=apply, workers=self.default_workers,
                      staleness=self.default_staleness)

    def answer_mutation(self, incoming: Incoming, header: Header, opts: dict[str, Any]) -> None:
        """Record an applied mutation's reply in the session table and send it: for
        PUSH_PULL the values, once the asking worker may read them."""
        self.state.sessions.record(header.client_id, header.seq, opts)
        self._send_mutation_reply(incoming, header, opts)

    def _send_mutation_reply(self, incoming: Incoming, header: Header,
                             opts: dict[str, Any]) -> None:
        if header.kind == Kind.PUSH_PULL:
            slots = [self.state.slots[(t.key, t.part)] for t in _pushed_parts(header)]
            self._send_when_ready(incoming, header, slots)
        else:
            self._reply(incoming, reply_header(header, opts=opts))
        if header.kind in (Kind.PUSH, Kind.PUSH_PULL):
            self._release_parked()

    def _seen(self, header: Header) -> None:
        self._seen_worker(worker_of(header))

    def _seen_worker(self, worker: int) -> None:
        self._last_seen[worker] = time.monotonic()
        if worker in self.state.dropped:
            log.warning("shard %d: worker %d is back; it resumes at the current step",
                        self.shard_id, worker)
            self.state.rejoin_worker(worker)

    def _check_workers(self) -> None:
        """Drop workers silent for longer than ``worker_timeout`` from the step quorum,
        so one dead worker cannot hang the others."""
        if self.worker_timeout <= 0:
            return
        now = time.monotonic()
        for worker, seen in self._last_seen.items():
            if worker not in self.state.dropped and now - seen > self.worker_timeout:
                log.warning("shard %d: worker %d sent nothing for %.1f s; dropped from the "
                            "step quorum", self.shard_id, worker, now - seen)
                self.state.drop_worker(worker)
                self._release_parked()

    def _send_when_ready(self, incoming: Incoming, header: Header, slots: list[Slot]) -> None:
        """Reply with the values now, or, for sync/ssp keys the asking worker may not
        read yet, once they become readable (pushes of other workers release them)."""
        worker = worker_of(header)
        if self._readable(worker, header, slots):
            self._send_values(incoming, header, slots)
        else:
            self._parked.append((time.monotonic() + PARK_LIMIT_S, worker, incoming, header,
                                 slots))

    def _readable(self, worker: int, header: Header, slots: Sequence[Slot]) -> bool:
        """Whether ``worker`` may read ``slots`` now (``Slot.ready_for``)."""
        return all(s.ready_for(worker, self.state.dropped) for s in slots)

    def _release_parked(self) -> None:
        """Answer the parked reads that became readable; forget those older than any
        client deadline (their client has given up)."""
        now, keep = time.monotonic(), []
        for entry in self._parked:
            expires, worker, incoming, header, slots = entry
            if self._readable(worker, header, slots):
                self._send_values(incoming, header, slots)
            elif expires > now:
                keep.append(entry)
        self._parked = keep

    def _barrier(self, incoming: Incoming, header: Header) -> None:
        """Hold each worker's BARRIER reply until all ``workers`` of generation ``gen``
        arrived, then answer them all. A worker that sends again (a retry) replaces
        its earlier request; a missing worker leaves the others to their deadlines."""
        o = header.opts
        gen, worker, workers = o.get("gen", 0), o.get("worker", -1), o.get("workers", 0)
        if not (type(gen) is int and type(worker) is int and type(workers) is int
                and gen >= 1 and 1 <= workers <= MAX_WORKERS and 0 <= worker < workers):
            raise InvalidArgument(f"a barrier needs gen >= 1, 1 <= workers <= {MAX_WORKERS} "
                                  "and 0 <= worker < workers")
        if header.tensors or incoming.frames:
            raise InvalidArgument("a barrier carries no tensors and no data frames")
        now = time.monotonic()
        if gen not in self._barriers and len(self._barriers) >= MAX_PENDING_BARRIERS:
            for old in [g for g, (_, _, t) in self._barriers.items() if now - t > PARK_LIMIT_S]:
                del self._barriers[old]  # their clients gave up long ago
            if len(self._barriers) >= MAX_PENDING_BARRIERS:
                raise InvalidArgument(f"{MAX_PENDING_BARRIERS} barriers are pending already "
                                      f"(barrier {gen} refused)")
        want, waiting, _ = self._barriers.setdefault(gen, (workers, {}, now))
        if want != workers:
            raise InvalidArgument(f"barrier {gen} was entered with {want} workers, "
                                  f"not {workers}")
        waiting[worker] = (incoming, header)
        if len(waiting) == workers:
            del self._barriers[gen]
            for inc, h in waiting.values():
                self._reply(inc, reply_header(h, opts={"gen": gen}))

    def _answer_duplicate(self, incoming: Incoming, header: Header) -> bool:
        """Answer a mutation applied before (same client id and seq) without applying
        it again: from the session table, or for PUSH_PULL with the current values."""
        cached = self.state.sessions.duplicate(header.client_id, header.seq)
        if cached is None:
            return False
        log.info("shard %d: duplicate %s seq %d answered without applying it", self.shard_id,
                 header.kind.name, header.seq)
        if header.kind == Kind.PUSH_PULL:
            refs = [KeyRef(t.key, t.part) for t in _pushed_parts(header)]
            self._send_when_ready(incoming, header, self.state.check_refs(refs))
        else:
            self._reply(incoming, reply_header(header, opts=cached))
        return True

    @staticmethod
    def _data(header: Header, incoming: Incoming) -> list[list[memoryview]]:
        return split_by_tensor(header, incoming.frames)

    def _send_values(self, incoming: Incoming, header: Header | None, slots: Sequence[Slot],
                     encoded: bytes | None = None) -> None:
        """Reply with the current values, sent without copying. Each slot leases its
        memory to the send, so a push arriving before libzmq has sent the bytes
        writes into a copy instead (copy-on-write). ``encoded``: the reply header,
        already made (then ``header`` is not used). A request that offered a region
        of its shared memory gets the values written there."""
        if header is not None and header.shm is not None \
                and self._shm_values(incoming, header, slots):
            return
        metas: list[TensorMeta] = []
        frames: list[memoryview] = []
        owners: list[Slot] = []
        on_host = self.state.memory.device == "cpu"
        for s in slots:
            host = self.state.memory.read(s.value)  # a fresh host copy when on a GPU
            parts = split_frames(host, self.frame_bytes)
            if encoded is None:
                metas.append(s.meta(len(parts)))
            frames.extend(parts)
            owners.extend([s] * len(parts) if on_host else [])
        trackers = self.endpoint.send_tracked(
            encoded if encoded is not None else reply_header(header, tensors=tuple(metas)),
            frames, identity=incoming.identity)
        if trackers is None:
            log.warning("shard %d: reply to a client with a full queue dropped", self.shard_id)
            return
        for owner, tracker in zip(owners, trackers, strict=False):  # empty off the host
            if tracker is not None:
                owner.lease(tracker)

    def ping_info(self) -> dict[str, Any]:
        """What a PING is answered with: who this is and whether it serves requests."""
        return {"shard": self.shard_id, "pid": os.getpid(), "role": "leader"}

    def status(self) -> dict[str, Any]:
        stats = self.state.stats()
        return {
            "shard": self.shard_id,
            "pid": os.getpid(),
            "role": "leader",
            "term": 0,
            "commit_index": stats["applied_index"],
            "applied_index": stats["applied_index"],
            "keys": stats["keys"],
            "home_keys": stats["home_keys"],
            "parts": stats["parts"],
            "tables": stats["tables"],
            "rows": stats["rows"],
            "bytes": stats["bytes"],
            "barrier_waiting": sum(len(w) for _, w, _ in self._barriers.values()),
            "parked_reads": len(self._parked),
            "workers": {str(w): "dropped" if w in self.state.dropped else "alive"
                        for w in sorted(self._last_seen)},
            "requests": self.requests,
            "errors": self.errors,
            "uptime_s": round(time.time() - self.started, 3),
            "endpoints": self.endpoints,
        }


_WHOLE_KINDS = (int(Kind.PUSH), int(Kind.PUSH_PULL))


def worker_of(header: Header) -> int:
    """The worker id a request names in ``o.worker`` (0 when it names none)."""
    worker = header.opts.get("worker", 0)
    if type(worker) is not int or not 0 <= worker < MAX_WORKERS:
        raise InvalidArgument(f"worker must be an integer in [0, {MAX_WORKERS}), "
                              f"not {worker!r}")
    return worker


def _pushed_parts(header: Header) -> tuple[TensorMeta, ...]:
    """One descriptor per pushed part: a top-k push sends (values, positions) pairs."""
    return header.tensors[::2] if header.opts.get("encoding") == "topk" else header.tensors
