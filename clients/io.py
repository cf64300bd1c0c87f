"""The client's I/O engine: owns every socket of one ``Client``.

ZeroMQ sockets must not be used by two threads at once, so one lock owns a
DEALER per shard, and whichever thread holds it "drives": sends queued
requests, polls, matches replies to requests by id, runs their callbacks and
fails requests whose deadline passed (``Unavailable`` naming the shard).

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
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, TypeVar

from pserver.protocol.codec import check_frames, decode_header
from pserver.protocol.errors import PServerError, Unavailable, error_from_code
from pserver.protocol.schema import MUTATING_KINDS, Header, Limits
from pserver.protocol.transport import Endpoint, Incoming, Poller

log = logging.getLogger(__name__)

ReplyCallback = Callable[[Header, Incoming], None]
ErrorCallback = Callable[[PServerError], None]
T = TypeVar("T")

MAX_POLL_S = 0.05


@dataclass
class _Request:
    shard: int
    header: Header
    frames: Sequence[Any]
    deadline: float
    timeout: float
    on_reply: ReplyCallback
    on_error: ErrorCallback


class IOEngine:
    """Sends requests to shards and routes their replies; see the module docstring."""

    def __init__(self, ctx: Any, endpoints: dict[int, str], reply_limits: Limits) -> None:
        self._limits = reply_limits
        self._lock = threading.Lock()  # owns the sockets, the poller and _pending
        self._sockets = {s: Endpoint.dealer_connected(ctx, a) for s, a in endpoints.items()}
        self._by_sock = {ep.sock: (s, ep) for s, ep in self._sockets.items()}
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._poller = Poller()
        self._poller.register(self._rfd)
        for ep in self._sockets.values():
            self._poller.register(ep)
        self._queue: collections.deque[_Request] = collections.deque()
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
        """Queue one request; it is sent by the next thread that drives."""
        if self._stopping.is_set():
            raise Unavailable("the client is closed", shard=shard)
        self._queue.append(
            _Request(shard, header, frames, time.monotonic() + timeout, timeout, on_reply, on_error)
        )
        if self._polling:
            self._wake()
        if self._waiters == 0:
            with self._cond:
                self._cond.notify()

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
        if idle and (self._queue or self._pending):
            with self._cond:  # async requests are left: hand them to the background
                self._cond.notify()

    def wait(self, future: Future[T]) -> T:
        """Drive I/O on this thread until ``future`` is done; return its result.
        Call between ``enter_wait`` and ``exit_wait``."""
        while not future.done():
            if self._lock.acquire(blocking=False):
                try:
                    self._drive_once(MAX_POLL_S)
                finally:
                    self._lock.release()
            else:  # another thread drives and will complete our future too
                wait_futures([future], timeout=0.001)
        return future.result()

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
            for ep in self._sockets.values():
                ep.close()
            for fd in (self._rfd, self._wfd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- the driver (holds self._lock) ------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"\0")  # a full pipe means a wake-up is already pending

    def _drive_once(self, max_wait: float) -> None:
        self._send_queued()
        now = time.monotonic()
        wait = min((r.deadline for r in self._pending.values()), default=now + max_wait)
        timeout = max(0.0, min(wait - now, max_wait))
        self._polling = True
        try:
            ready = self._poller.poll(timeout * 1000) if not self._queue else set()
        finally:
            self._polling = False
        if self._rfd in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._rfd, 4096):
                    pass
        self._send_queued()
        for sock in ready:
            if sock in self._by_sock:
                self._receive(*self._by_sock[sock])
        self._expire()

    def _send_queued(self) -> None:
        while self._queue:
            req = self._queue.popleft()
            ep = self._sockets.get(req.shard)
            if ep is None:
                req.on_error(Unavailable(f"no endpoint for shard {req.shard}", shard=req.shard))
            else:
                if req.header.kind in MUTATING_KINDS and req.header.seq == 0:
                    # Sequence numbers count up per shard in send order, so a shard sees
                    # each client's mutations in increasing order (exactly-once needs it);
                    # a retry will resend the same header, hence the same number.
                    self._seqs[req.shard] = self._seqs.get(req.shard, 0) + 1
                    req.header = dataclasses.replace(req.header, seq=self._seqs[req.shard])
                if ep.send(req.header, req.frames):
                    self._pending[req.header.request_id] = req
                else:
                    req.on_error(Unavailable(f"shard {req.shard}: send queue full",
                                             shard=req.shard))

    def _receive(self, shard: int, ep: Endpoint) -> None:
        while (incoming := ep.recv()) is not None:
            try:
                header = decode_header(incoming.header, self._limits)
            except PServerError as exc:
                log.warning("shard %d sent an unreadable reply: %s", shard, exc)
                rid = exc.details.get("request_id")
                req = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if req is not None:
                    req.on_error(exc)
                continue
            req = self._pending.pop(header.request_id, None)
            if req is None:
                log.debug(
                    "late or unknown reply %d from shard %d dropped", header.request_id, shard
                )
                continue
            try:
                if header.error:
                    details = dict(header.opts)
                    details.setdefault("shard", shard)
                    req.on_error(error_from_code(header.error, header.message, details))
                    continue
                check_frames(header, [f.nbytes for f in incoming.frames], self._limits)
                req.on_reply(header, incoming)
            except PServerError as exc:
                req.on_error(exc)
            except Exception as exc:
                log.exception("reply handler failed")
                req.on_error(PServerError(f"reply handling failed: {exc!r}"))

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, r in self._pending.items() if r.deadline <= now]:
            req = self._pending.pop(rid)
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
        for req in self._pending.values():
            req.on_error(exc)
        self._pending.clear()

    # -- the background thread ---------------------------------------------------------

    def _background(self) -> None:
        """Drive while requests are pending and no caller is driving for itself."""
        try:
            while not self._stopping.is_set():
                self._beat()
                with self._cond:
                    if self._waiters > 0 or not (self._queue or self._pending):
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
