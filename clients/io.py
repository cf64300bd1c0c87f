"""The client's I/O engine: owns every socket of one ``Client``.

ZeroMQ sockets must not be used by two threads at once, so one lock owns a
DEALER per shard, and whichever thread holds it "drives": sends queued
requests, polls, matches replies to requests by id, runs their callbacks and
fails requests whose deadline passed (``Unavailable`` naming the shard).

Replicated shards: the engine holds a DEALER to every replica and sends each
shard's requests to the replica it takes for the leader. A ``NotLeader`` reply
moves it to the hinted replica (or the next one) and the request goes again
with the same id and sequence number, so the shard applies it once. When a
request goes unanswered for ``ATTEMPT_S``, the engine pings that replica:
a leader's answer gives the request more time (a sync read may wait long for
other workers), silence or a follower's answer moves on to the next replica
and resends what that shard owes. All of this stays within each request's
deadline.

Shared memory (PROTOCOL.md §4.6): a PUSH, PUSH_PULL, PULL, PUSH_ROWS or PULL_ROWS
of at least
``SHM_MIN_BYTES`` to a shard whose replicas are all on this host is copied
into a block of the client's ``Arena`` at its first send, with room for the
reply; the header names the spans and no data frames follow. The block is
taken back when the request ends, unless a shard may still read or write it:
after its deadline passed (until a late reply), or when it went to more than
one replica (a resend after a failover). Such a block stays out of use for
``QUARANTINE_S``. A
shard that cannot open the memory answers SHM_UNAVAILABLE: that shard's
requests then carry their bytes as frames, this one included.

A thread that waits for its own result (the synchronous ``push``/``pull``...)
drives itself, so a round trip costs no thread hand-off. A background thread
drives only while requests are pending and nobody waits on them (the
``*_async`` futures). A request queued while another thread is blocked in poll
wakes it through a pipe, so it is sent at once. Imports the transport, never
zmq directly.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from pserver.protocol.codec import check_frames, decode_header, plain_fields
from pserver.protocol.errors import (
    ErrorCode,
    ProtocolError,
    PServerError,
    Unavailable,
    error_from_code,
)
from pserver.protocol.schema import MUTATING_KINDS, Header, Kind, Limits, ShmRef
from pserver.protocol.shm import Arena, Block, aligned, as_bytes
from pserver.protocol.transport import Endpoint, Incoming, Monitor, Poller

log = logging.getLogger(__name__)

ReplyCallback = Callable[[Header, Incoming], None]
ErrorCallback = Callable[[PServerError], None]
T = TypeVar("T")

MAX_POLL_S = 0.05
ATTEMPT_S = 0.3  # unanswered this long: check that the replica still leads
PROBE_S = 0.2  # a replica that does not answer a ping within this is taken for gone
GONE_S = 0.5  # and its name in NotLeader hints is disregarded for this long
RETRY_S = 0.03  # a NotLeader without a usable hint: wait this long before the next try
DIRECT_MS = 2  # ``exchange`` waits this long on the one socket, then as ``wait`` does
_REPLY = int(Kind.REPLY)
SHM_MIN_BYTES = 3 << 20  # a request (data and reply) this large goes by shared memory
SHM_KINDS = frozenset({Kind.PUSH, Kind.PUSH_PULL, Kind.PULL, Kind.PUSH_ROWS, Kind.PULL_ROWS})
_NO_REPLY_DATA = frozenset({Kind.PUSH, Kind.PUSH_ROWS})
# A block a shard may still use (its request expired, or went to several replicas) is
# kept out of use until this long has passed: longer than a shard keeps a parked read.
QUARANTINE_S = 660.0


class Completion(Generic[T]):
    """The outcome of one operation, lighter than a ``concurrent.futures.Future``
    (no Condition, no callbacks): a caller waiting on the engine (``IOEngine.wait``)
    checks ``done()`` between its own rounds of I/O, and a caller waiting while
    another thread drives blocks on a plain lock released at completion.
    ``as_future`` gives a real Future for the ``*_async`` API. The first
    ``set_result``/``set_exception`` wins; later ones are ignored."""

    __slots__ = ("_done", "_error", "_future", "_guard", "_result", "_signal")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._signal = threading.Lock()  # held until completion
        self._signal.acquire()
        self._guard = threading.Lock()
        self._future: Future[T] | None = None

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        """The result; raises the operation's exception. Call once ``done()``."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[no-any-return]

    def wait_done(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for completion; True when done."""
        if self._signal.acquire(timeout=timeout):
            self._signal.release()
            return True
        return self._done

    def set_result(self, result: T) -> None:
        self._settle(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        with self._guard:
            if self._done:
                return
            self._result, self._error, self._done = result, error, True
            future = self._future
        self._signal.release()
        if future is not None:
            self._copy_to(future)

    def _copy_to(self, future: Future[T]) -> None:
        if self._error is not None:
            future.set_exception(self._error)
        else:
            future.set_result(self._result)

    def as_future(self) -> Future[T]:
        """A ``concurrent.futures.Future`` that completes with this (the same one on
        every call)."""
        with self._guard:
            if self._future is not None:
                return self._future
            future = self._future = Future()
            settled = self._done
        if settled:  # _settle ran before the Future existed: complete it here
            self._copy_to(future)
        return future


class LazyFrame:
    """A data frame made when it is sent: ``fill(out)`` writes its ``nbytes`` bytes into
    ``out`` (a uint8 array). It is written straight into a shared-memory block, or
    once into a buffer of its own when it goes by socket (a cast gradient: no
    intermediate copy on the shared-memory path)."""

    __slots__ = ("fill", "nbytes")

    def __init__(self, nbytes: int, fill: Callable[[np.ndarray[Any, Any]], Any]) -> None:
        self.nbytes = nbytes
        self.fill = fill

    def made(self) -> np.ndarray[Any, Any]:
        out = np.empty(self.nbytes, np.uint8)
        self.fill(out)
        return out


@dataclass
class _Request:
    shard: int
    header: Header
    frames: Sequence[Any]
    deadline: float
    timeout: float
    on_reply: ReplyCallback
    on_error: ErrorCallback
    target: int = -1  # the replica it was last sent to
    attempt: float = 0.0  # when to check on that replica
    block: Block | None = None  # its data and reply in shared memory
    sent_to: set[int] = field(default_factory=set)  # the replicas it went to


class IOEngine:
    """Sends requests to shards and routes their replies; see the module docstring."""

    def __init__(self, ctx: Any, endpoints: dict[int, list[str]], reply_limits: Limits,
                 hints: dict[int, dict[str, int]] | None = None, *,
                 arena: Arena | None = None, shm_shards: frozenset[int] = frozenset(),
                 reply_bytes: Callable[[Header], int] | None = None) -> None:
        """``arena``: shared memory for the requests to ``shm_shards`` (owned by the
        engine from here on); ``reply_bytes(header)``: room to leave for the reply."""
        self._limits = reply_limits
        self._arena = arena
        self._shm_shards = set(shm_shards) if arena is not None else set()
        self._reply_bytes = reply_bytes or (lambda _h: 0)
        # request id -> (block a shard may still use, whether one late reply frees it,
        # when it is freed anyway)
        self._quarantine: dict[int, tuple[Block, bool, float]] = {}
        self._lock = threading.Lock()  # owns the sockets, the poller and _pending
        self._sockets = {s: [Endpoint.dealer_connected(ctx, a) for a in addrs]
                         for s, addrs in endpoints.items()}
        self._hints = hints or {}
        self._leader = dict.fromkeys(endpoints, 0)  # the replica taken for the leader
        self._probes: dict[int, tuple[int, int, float]] = {}  # shard -> (id, replica, until)
        self._gone: dict[tuple[int, int], float] = {}  # (shard, replica) -> silent until
        self._probe_ids = itertools.count(1 << 62)
        self._by_sock = {ep.sock: (s, i, ep) for s, eps in self._sockets.items()
                         for i, ep in enumerate(eps)}
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._poller = Poller()
        self._poller.register(self._rfd)
        for ep in self._all_sockets():
            self._poller.register(ep)
        # A replica whose connection drops (its process died) is left at once rather
        # than after ATTEMPT_S + PROBE_S.
        self._monitors: dict[Any, tuple[int, int, Monitor]] = {}
        for s, eps in self._sockets.items():
            for i, ep in enumerate(eps if len(eps) > 1 else []):
                mon = ep.watch_disconnects()
                self._monitors[mon.sock] = (s, i, mon)
                self._poller.register(mon)
        self._queue: collections.deque[_Request] = collections.deque()
        self._later: list[tuple[float, _Request]] = []  # resends waiting out RETRY_S
        self._pending: dict[int, _Request] = {}
        self._seqs: dict[int, int] = {}  # shard -> last sequence number sent
        self._polling = False
        self._waiters = 0
        self._count_lock = threading.Lock()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._heartbeat: tuple[float, Callable[[], list[tuple[int, Header]]]] | None = None
        self._next_beat = 0.0
        self._thread = threading.Thread(
            target=self._background, name="pserver-client-io", daemon=True
        )
        self._thread.start()

    # -- any thread -----------------------------------------------------------------

    def submit(
        self,
        shard: int,
        header: Header,
        frames: Sequence[Any],
        timeout: float,
        on_reply: ReplyCallback,
        on_error: ErrorCallback,
    ) -> None:
        """Queue one request and send it now when no thread is driving (else the
        driving thread sends it, woken if it is polling)."""
        if self._stopping.is_set():
            raise Unavailable("the client is closed", shard=shard)
        self._queue.append(
            _Request(shard, header, frames, time.monotonic() + timeout, timeout, on_reply, on_error)
        )
        if self._lock.acquire(blocking=False):  # nobody drives: send it now
            try:
                self._send_queued()
            finally:
                self._lock.release()
        elif self._polling:
            self._wake()
        if self._waiters == 0:
            with self._cond:
                self._cond.notify()

    def exchange(self, shard: int, header: Header, frames: Sequence[Any], timeout: float,
                 on_reply: ReplyCallback, on_error: ErrorCallback) -> bool:
        """``submit`` for a caller that will ``wait`` for this one request: when no
        other request is queued or pending, no thread drives and the shard has one
        replica, send it from this thread and wait up to ``DIRECT_MS`` in a blocking
        receive on that shard's socket, as a raw round trip does (no poller, no
        queue). A reply that takes longer, or any other message, is then handled by
        ``wait`` as usual. False, having done nothing, when the engine is busy: then
        ``submit``."""
        eps = self._sockets.get(shard)
        if eps is None or len(eps) != 1 or self._stopping.is_set() \
                or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._queue or self._pending or self._later:  # checked under the lock
                return False
            req = _Request(shard, header, frames, time.monotonic() + timeout, timeout,
                           on_reply, on_error)
            self._number(req)
            self._send(req)
            rid, ep = header.request_id, eps[0]
            while rid in self._pending and (incoming := ep.recv_within(DIRECT_MS)) is not None:
                self._route(shard, 0, incoming)
            return True
        finally:
            self._lock.release()

    def set_heartbeat(self, interval: float,
                      make: Callable[[], list[tuple[int, Header]]]) -> None:
        """Send the messages ``make()`` returns every ``interval`` seconds, from the
        background thread, replies ignored (a worker's liveness signal)."""
        self._heartbeat = (interval, make)

    def _beat(self) -> None:
        if self._heartbeat is None or time.monotonic() < self._next_beat:
            return
        interval, make = self._heartbeat
        self._next_beat = time.monotonic() + interval
        for shard, header in make():
            self.submit(shard, header, (), 2 * interval, lambda *_: None, lambda _: None)

    def enter_wait(self) -> None:
        """Mark the calling thread as one that will drive until its result arrives
        (``wait``), so the background thread stays out of its way. Pair with
        ``exit_wait``."""
        with self._count_lock:
            self._waiters += 1

    def exit_wait(self) -> None:
        with self._count_lock:
            self._waiters -= 1
            idle = self._waiters == 0
        if idle and (self._queue or self._pending or self._later):
            with self._cond:  # async requests are left: hand them to the background
                self._cond.notify()

    def wait(self, op: Completion[T] | Future[T]) -> T:
        """Drive I/O on this thread until ``op`` is done; return its result.
        Call between ``enter_wait`` and ``exit_wait``."""
        while not op.done():
            if self._lock.acquire(blocking=False):
                try:
                    self._drive_once(MAX_POLL_S)
                finally:
                    self._lock.release()
            elif isinstance(op, Completion):  # another thread drives and completes it
                op.wait_done(0.001)
            else:
                wait_futures([op], timeout=0.001)
        return op.result()

    def close(self, timeout: float = 5.0) -> None:
        """Fail pending requests, stop the background thread, close the sockets."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._lock:
            self._fail_all(Unavailable("the client is closed"))
            if self._arena is not None:
                self._arena.close()
            for _, _, mon in self._monitors.values():
                mon.close()
            for ep in self._all_sockets():
                ep.close()
            for fd in (self._rfd, self._wfd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _all_sockets(self) -> list[Endpoint]:
        return [ep for eps in self._sockets.values() for ep in eps]

    # -- the driver (holds self._lock) ------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"\0")  # a full pipe means a wake-up is already pending

    def _drive_once(self, max_wait: float) -> None:
        if self._queue or self._later:
            self._send_queued()
        now = time.monotonic()
        due = min([min(r.deadline, r.attempt) for r in self._pending.values()]
                  + [t for t, _ in self._later], default=now + max_wait)
        timeout = max(0.0, min(due - now, max_wait))
        self._polling = True
        try:
            ready = self._poller.poll(timeout * 1000) if not self._queue else set()
        finally:
            self._polling = False
        if self._rfd in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._rfd, 4096):
                    pass
        if self._queue or self._later:
            self._send_queued()
        for sock in ready:
            if sock in self._by_sock:
                self._receive(*self._by_sock[sock])
            elif sock in self._monitors:
                shard, replica, mon = self._monitors[sock]
                if mon.disconnected():
                    self._lost(shard, replica)
        if self._probes or time.monotonic() >= due:  # nothing can expire before ``due``
            self._expire()

    def _send_queued(self) -> None:
        if self._later:
            now = time.monotonic()
            due = [r for t, r in self._later if t <= now]
            self._later = [(t, r) for t, r in self._later if t > now]
            for req in due:
                self._send(req)
        while self._queue:
            req = self._queue.popleft()
            eps = self._sockets.get(req.shard)
            if not eps:
                req.on_error(Unavailable(f"no endpoint for shard {req.shard}", shard=req.shard))
                continue
            self._number(req)
            self._send(req)

    def _number(self, req: _Request) -> None:
        """Give a mutation its sequence number, once (under the lock, at first send)."""
        if req.header.kind in MUTATING_KINDS and req.header.seq == 0:
            # Sequence numbers count up per shard in send order; a retry resends
            # the same header, hence the same number, and the shard's session
            # table applies each number once (in whatever order they arrive).
            self._seqs[req.shard] = self._seqs.get(req.shard, 0) + 1
            req.header.seq = self._seqs[req.shard]

    def _send(self, req: _Request) -> None:
        """Send ``req`` to the replica taken for its shard's leader."""
        if req.block is None and req.shard in self._shm_shards \
                and req.header.kind in SHM_KINDS:
            self._to_shm(req)
        if req.block is None and any(type(f) is LazyFrame for f in req.frames):
            req.frames = [f.made() if type(f) is LazyFrame else f for f in req.frames]
        target = self._leader[req.shard]
        req.target = target
        if req.block is not None:
            req.sent_to.add(target)
        req.attempt = (time.monotonic() + ATTEMPT_S if len(self._sockets[req.shard]) > 1
                       else req.deadline)
        if self._sockets[req.shard][target].send(req.header, req.frames):
            self._pending[req.header.request_id] = req
        else:
            self._release(req)
            req.on_error(Unavailable(f"shard {req.shard}: send queue full", shard=req.shard))

    # -- shared memory ------------------------------------------------------------------

    def _to_shm(self, req: _Request) -> None:
        """Move ``req``'s data frames into a block of the arena, with room for its
        reply (left as it is when small or when the arena has no room)."""
        assert self._arena is not None
        h = req.header
        if h.kind in (Kind.PUSH, Kind.PUSH_PULL, Kind.PUSH_ROWS) \
                and "encoding" not in h.opts \
                and 16 * sum(t.count for t in h.tensors) < SHM_MIN_BYTES:
            return  # data and any reply are at most 8 bytes an element each: small
        frames = [f if type(f) is LazyFrame else as_bytes(f) for f in req.frames]
        data = sum(aligned(f.nbytes) for f in frames)
        out = self._reply_bytes(h) if h.kind not in _NO_REPLY_DATA else 0
        if data + out < SHM_MIN_BYTES:
            return
        block = self._arena.alloc(data + out)
        if block is None:
            return
        pos, spans = block.offset, []
        dest = block.segment.array
        for f in frames:
            if isinstance(f, LazyFrame):
                f.fill(dest[pos : pos + f.nbytes])
            else:
                dest[pos : pos + f.nbytes] = f
            spans.append((pos, f.nbytes))
            pos += aligned(f.nbytes)
        req.header.shm = ShmRef(block.name, tuple(spans), (pos, out) if out else None)
        req.frames = ()
        req.block = block

    def _from_shm(self, req: _Request, replica: int) -> None:
        """Put ``req``'s data back into frames (copies) and retire its block."""
        assert req.block is not None and req.header.shm is not None
        req.frames = [bytes(req.block.array(o, n)) for o, n in req.header.shm.spans]
        req.header.shm = None
        self._retire(req, replica)

    def _release(self, req: _Request) -> None:
        """Free ``req``'s block: no shard will touch it again."""
        if req.block is not None:
            self._free_block(req.block)
        req.block = None

    def _retire(self, req: _Request, replica: int | None) -> None:
        """``req`` is answered by ``replica`` (None: it expired). Its block is freed
        if that was the only replica it went to; otherwise another one may still
        read or write it, and it is quarantined (``QUARANTINE_S``; an expired
        request's block also comes back with its late reply)."""
        block = req.block
        if block is None:
            return
        if replica is not None and req.sent_to <= {replica}:
            self._release(req)
            return
        req.block = None
        self._quarantine[req.header.request_id] = (
            block, replica is None and len(req.sent_to) <= 1,
            time.monotonic() + QUARANTINE_S)

    def _end_quarantine(self, now: float, rid: int | None = None) -> None:
        """Free quarantined blocks whose time is up, and the one a late reply to
        request ``rid`` frees."""
        if rid is not None and rid in self._quarantine and self._quarantine[rid][1]:
            self._free_block(self._quarantine.pop(rid)[0])
        for r in [r for r, (_, _, until) in self._quarantine.items() if until <= now]:
            self._free_block(self._quarantine.pop(r)[0])

    def _free_block(self, block: Block) -> None:
        if self._arena is not None:
            self._arena.free(block)

    def _shm_reply(self, req: _Request, header: Header, incoming: Incoming) -> Incoming:
        """The reply's frames as views of the spans it names, which must lie in its
        request's block (valid until the block is freed: ``borrowed``)."""
        ref, block = header.shm, req.block
        assert ref is not None
        if block is None or ref.name != block.name or incoming.frames \
                or not all(block.holds(o, n) for o, n in ref.spans):
            raise ProtocolError("the reply names shared memory its request did not offer")
        frames = [memoryview(block.array(o, n)) for o, n in ref.spans]  # type: ignore[arg-type]
        return Incoming(incoming.identity, incoming.header, frames, incoming.parts,
                        borrowed=True)

    def _follow(self, shard: int, hint: Any, away_from: int) -> bool:
        """Take the hinted replica (a tcp address) for the leader, else the one after
        ``away_from``; True when the hint was used."""
        n = len(self._sockets[shard])
        now = time.monotonic()
        hinted = self._hints.get(shard, {}).get(hint) if isinstance(hint, str) else None
        if hinted is not None and hinted != away_from \
                and self._gone.get((shard, hinted), 0.0) <= now:
            self._leader[shard] = hinted
            return True
        if self._leader[shard] == away_from:
            # The next replica not found silent lately (a follower may still name a
            # leader that just died).
            nxt = [(away_from + k) % n for k in range(1, n + 1)]
            self._leader[shard] = next(
                (i for i in nxt if self._gone.get((shard, i), 0.0) <= now), nxt[0])
        return False

    def _resend_shard(self, shard: int, away_from: int) -> None:
        """Send again every pending request of ``shard`` that went to ``away_from``."""
        for req in [r for r in self._pending.values()
                    if r.shard == shard and r.target == away_from]:
            del self._pending[req.header.request_id]
            self._send(req)

    def _lost(self, shard: int, replica: int) -> None:
        """The connection to ``replica`` dropped: leave it for the next one."""
        self._gone[(shard, replica)] = time.monotonic() + GONE_S
        self._probes.pop(shard, None)
        if self._leader[shard] == replica:
            self._follow(shard, None, replica)
            self._resend_shard(shard, replica)

    def _probe_answer(self, shard: int, replica: int, header: Header) -> None:
        probe = self._probes.get(shard)
        if probe is None or probe[0] != header.request_id:
            return
        del self._probes[shard]
        if header.opts.get("role", "leader") == "leader":
            until = time.monotonic() + ATTEMPT_S  # alive and leading: give it more time
            for r in self._pending.values():
                if r.shard == shard and r.target == replica:
                    r.attempt = until
        else:
            self._follow(shard, header.opts.get("leader_hint"), replica)
            self._resend_shard(shard, replica)

    def _plain_reply(self, incoming: Incoming) -> tuple[_Request, Header] | None:
        """A pending request and its reply's header, when the reply is a plain one: no
        error or opts, and either no tensors and no frames or exactly the tensors the
        request sent (a PUSH_PULL's values), in frames that fit them. Such a header
        is what ``decode_header`` would give, made without decoding each descriptor
        again. None for any other reply (the general path decodes it)."""
        fields = plain_fields(incoming.header, self._limits)
        if fields is None:
            return None
        kind, rid, cid, seq, opts, tensors = fields
        req = self._pending.get(rid)
        if kind != _REPLY or opts or req is None:
            return None
        sent = req.header.tensors
        if not tensors:
            return (req, Header(Kind.REPLY, rid, client_id=cid, seq=seq)) \
                if not incoming.frames else None
        if len(tensors) != len(sent) or any(w != t.to_wire() for w, t in zip(tensors, sent,
                                                                             strict=True)):
            return None
        header = Header(Kind.REPLY, rid, client_id=cid, seq=seq, tensors=sent)
        try:
            check_frames(header, [f.nbytes for f in incoming.frames], self._limits)
        except PServerError:
            return None
        return req, header

    def _receive(self, shard: int, replica: int, ep: Endpoint) -> None:
        while (incoming := ep.recv()) is not None:
            self._route(shard, replica, incoming)

    def _route(self, shard: int, replica: int, incoming: Incoming) -> None:
        """Take one message from ``replica`` of ``shard``: a reply goes to its request."""
        plain = self._plain_reply(incoming)
        if plain is not None:
            del self._pending[plain[1].request_id]
            self._deliver(plain[0], plain[1], incoming, shard)
            self._retire(plain[0], replica)
            return
        try:
            header = decode_header(incoming.header, self._limits)
        except PServerError as exc:
            log.warning("shard %d sent an unreadable reply: %s", shard, exc)
            rid = exc.details.get("request_id")
            req = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if req is not None:
                req.on_error(exc)
            return
        if header.request_id >= 1 << 62:
            if not header.error:
                self._probe_answer(shard, replica, header)
            return
        req = self._pending.get(header.request_id)
        if req is not None and header.error == ErrorCode.SHM_UNAVAILABLE \
                and req.block is not None and replica == req.target:
            del self._pending[header.request_id]
            log.warning("shard %d cannot use this client's shared memory (%s): its data "
                        "goes through the socket", shard, header.message)
            self._shm_shards.discard(shard)
            self._from_shm(req, replica)
            self._send(req)
            return
        if req is not None and header.error == ErrorCode.NOT_LEADER:
            if replica == req.target and time.monotonic() < req.deadline:
                del self._pending[header.request_id]
                if self._follow(shard, header.opts.get("leader_hint"), replica):
                    self._send(req)  # same id and seq: applied at most once
                else:  # no leader known (an election is on): do not spin
                    self._later.append((time.monotonic() + RETRY_S, req))
            return  # from a replica it no longer waits on: ignore
        done = self._pending.pop(header.request_id, None)
        if done is None:
            log.debug(
                "late or unknown reply %d from shard %d dropped", header.request_id, shard
            )
            if self._quarantine:
                self._end_quarantine(time.monotonic(), header.request_id)
            return
        if header.error:
            self._retire(done, replica)
            details = dict(header.opts)
            details.setdefault("shard", shard)
            done.on_error(error_from_code(header.error, header.message, details))
            return
        if header.shm is not None:
            try:
                incoming = self._shm_reply(done, header, incoming)
            except PServerError as exc:
                self._retire(done, replica)
                done.on_error(exc)
                return
        self._deliver(done, header, incoming, shard, check=True)
        self._retire(done, replica)

    def _deliver(self, req: _Request, header: Header, incoming: Incoming, shard: int,
                 check: bool = False) -> None:
        """Hand a successful reply to its request (``check``: its frames first)."""
        try:
            if check:
                check_frames(header, [f.nbytes for f in incoming.frames], self._limits)
            req.on_reply(header, incoming)
        except PServerError as exc:
            req.on_error(exc)
        except Exception as exc:
            log.exception("reply handler failed (shard %d)", shard)
            req.on_error(PServerError(f"reply handling failed: {exc!r}"))

    def _expire(self) -> None:
        now = time.monotonic()
        if self._quarantine:
            self._end_quarantine(now)
        for shard, (_, replica, until) in list(self._probes.items()):
            if until <= now:  # the replica did not answer the ping: try the next one
                del self._probes[shard]
                self._gone[(shard, replica)] = now + GONE_S
                self._follow(shard, None, replica)
                self._resend_shard(shard, replica)
        for req in list(self._pending.values()):
            if req.attempt <= now < req.deadline and req.shard not in self._probes:
                pid = next(self._probe_ids)
                self._probes[req.shard] = (pid, req.target, now + PROBE_S)
                for r in self._pending.values():
                    if r.shard == req.shard and r.target == req.target:
                        r.attempt = now + PROBE_S + ATTEMPT_S
                self._sockets[req.shard][req.target].send(Header(Kind.PING, pid))
        for rid in [rid for rid, r in self._pending.items() if r.deadline <= now]:
            req = self._pending.pop(rid)
            self._retire(req, None)  # the shard may still read or write its block
            req.on_error(
                Unavailable(
                    f"shard {req.shard} did not answer {req.header.kind.name} within "
                    f"{req.timeout:g} s",
                    shard=req.shard,
                )
            )

    def _fail_all(self, exc: PServerError) -> None:
        while self._queue:
            self._queue.popleft().on_error(exc)
        for _, req in self._later:
            self._release(req)
            req.on_error(exc)
        self._later = []
        for req in self._pending.values():
            self._release(req)
            req.on_error(exc)
        self._pending.clear()

    # -- the background thread ---------------------------------------------------------

    def _background(self) -> None:
        """Drive while requests are pending and no caller is driving for itself."""
        try:
            while not self._stopping.is_set():
                self._beat()
                with self._cond:
                    if self._waiters > 0 or not (self._queue or self._pending or self._later):
                        self._cond.wait(0.1)
                        continue
                if self._lock.acquire(timeout=MAX_POLL_S):
                    try:
                        self._drive_once(MAX_POLL_S)
                    finally:
                        self._lock.release()
        except BaseException:  # never leave a caller waiting on a dead driver
            log.exception("client I/O thread failed")
            with self._lock:
                self._fail_all(Unavailable("the client's I/O thread failed"))
