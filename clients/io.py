"""The client's I/O thread: owns every socket of one ``Client``.

ZeroMQ sockets must not be shared between threads, so one background thread
owns a DEALER per shard. User threads hand it requests through a lock-free
deque and a wake-up pipe; it sends them at once (requests to every shard are in
flight together), matches replies by request id, enforces each request's
deadline (``Unavailable`` naming the shard) and completes futures. Reply
callbacks run on this thread. Imports the transport, never zmq directly.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pserver.protocol.codec import check_frames, decode_header
from pserver.protocol.errors import PServerError, Unavailable, error_from_code
from pserver.protocol.schema import Header, Limits
from pserver.protocol.transport import Endpoint, Incoming, Poller

log = logging.getLogger(__name__)

ReplyCallback = Callable[[Header, Incoming], None]
ErrorCallback = Callable[[PServerError], None]


@dataclass
class _Request:
    shard: int
    header: Header
    frames: Sequence[Any]
    deadline: float
    timeout: float
    on_reply: ReplyCallback
    on_error: ErrorCallback


class IOThread(threading.Thread):
    """Sends requests to shards and routes their replies; see the module docstring."""

    def __init__(self, ctx: Any, endpoints: dict[int, str], reply_limits: Limits) -> None:
        super().__init__(name="pserver-client-io", daemon=True)
        self._ctx = ctx
        self._addresses = dict(endpoints)
        self._limits = reply_limits
        self._queue: collections.deque[_Request] = collections.deque()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._pending: dict[int, _Request] = {}
        self._closing = threading.Event()
        self._started = threading.Event()
        self._failure: BaseException | None = None

    # -- called from user threads ---------------------------------------------

    def submit(
        self,
        shard: int,
        header: Header,
        frames: Sequence[Any],
        timeout: float,
        on_reply: ReplyCallback,
        on_error: ErrorCallback,
    ) -> None:
        if self._closing.is_set() or not self.is_alive():
            raise Unavailable("the client is closed", shard=shard)
        self._queue.append(
            _Request(shard, header, frames, time.monotonic() + timeout, timeout, on_reply, on_error)
        )
        self._wake()

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._wake()
        if self.is_alive():
            self.join(timeout)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wfd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed

    # -- the thread -----------------------------------------------------------

    def run(self) -> None:
        sockets = {s: Endpoint.dealer_connected(self._ctx, a) for s, a in self._addresses.items()}
        by_sock = {ep.sock: (s, ep) for s, ep in sockets.items()}
        poller = Poller()
        poller.register(self._rfd)
        for ep in sockets.values():
            poller.register(ep)
        self._started.set()
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                wait = min((r.deadline for r in self._pending.values()), default=now + 1.0)
                ready = poller.poll(max(0.0, min(wait - now, 1.0)) * 1000)
                if self._rfd in ready:
                    try:
                        while os.read(self._rfd, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self._send_queued(sockets)
                for sock in ready:
                    if sock in by_sock:
                        self._receive(*by_sock[sock])
                self._expire()
        except BaseException as exc:  # keep callers from waiting forever on a dead thread
            log.exception("client I/O thread failed")
            self._failure = exc
        finally:
            self._fail_all(Unavailable("the client is closed"))
            for ep in sockets.values():
                ep.close()

    def _send_queued(self, sockets: dict[int, Endpoint]) -> None:
        while self._queue:
            req = self._queue.popleft()
            ep = sockets.get(req.shard)
            if ep is None:
                req.on_error(Unavailable(f"no endpoint for shard {req.shard}", shard=req.shard))
                continue
            if ep.send(req.header, req.frames):
                self._pending[req.header.request_id] = req
            else:
                req.on_error(Unavailable(f"shard {req.shard}: send queue full", shard=req.shard))

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
        late = [rid for rid, r in self._pending.items() if r.deadline <= now]
        for rid in late:
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
