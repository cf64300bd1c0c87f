"""The ZeroMQ transport: the only module that imports zmq.

Owns socket creation and options (ROUTER for servers, DEALER for clients),
multipart send and receive of ``header + data frames``, and polling. Frames of
64 KiB and more are sent without copying (the caller keeps the buffer alive
and unchanged until the reply arrives) and received as zmq frames whose
``buffer`` is a memoryview of libzmq's memory. Every socket has linger 0, so
closing never blocks on an unreachable peer.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from .codec import encode_header
from .schema import Header, Limits

log = logging.getLogger(__name__)

COPY_THRESHOLD = 64 * 1024
SERVER_HWM = 2048
POLLIN = zmq.POLLIN
# The data path calls the compiled socket methods with plain int flags: pyzmq's
# Python layer (send_multipart, recv_multipart, enum flags and options) costs
# about 4 us a message on each side, a third of a raw round trip's CPU.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_set = zmq.backend.Socket.set
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)
_EVENTS, _POLLIN, _RCVTIMEO = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVTIMEO)


@dataclass
class Incoming:
    """One received message: the ROUTER identity (b"" on a DEALER), the raw
    header bytes and the data frames (memoryviews valid while ``parts`` lives).
    ``borrowed``: the frames lie in shared memory that is reused once the message
    is handled, so whatever outlives that must copy them."""

    identity: bytes
    header: memoryview
    frames: list[memoryview]
    parts: list[zmq.Frame]
    borrowed: bool = False


def host_id() -> str:
    """Identifies this machine and boot, so a client can tell that it shares the
    server's host (and may use its ipc:// endpoints)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def new_context() -> zmq.Context[Any]:
    return zmq.Context()


def _common(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.copy_threshold = COPY_THRESHOLD


class Endpoint:
    """A ROUTER (``bind``) or DEALER (``connect``) socket speaking pserver messages."""

    def __init__(self, sock: zmq.Socket[Any], router: bool, endpoints: Sequence[str] = ()) -> None:
        self.sock = sock
        self.router = router
        self.endpoints = list(endpoints)
        self._rcvtimeo = -1  # the socket's RCVTIMEO (ms; -1: none set yet)
        self.dropped_midway = 0  # messages lost as the peer vanished while they were sent

    @classmethod
    def router_bound(
        cls, ctx: zmq.Context[Any], endpoints: Sequence[str], limits: Limits
    ) -> Endpoint:
        """A ROUTER bound to every endpoint (``tcp://host:0`` picks a free port).
        A frame above the largest allowed size makes libzmq drop that peer. An
        address already in use raises ``OSError`` with ``errno.EADDRINUSE``; any other
        address that cannot be bound (an unknown host, one not on this machine) an
        ``OSError`` with libzmq's errno."""
        sock = ctx.socket(zmq.ROUTER)
        _common(sock)
        # Bound what one slow or stuck client can make the server buffer: about
        # SERVER_HWM frames each way (a full queue drops that client's replies).
        sock.setsockopt(zmq.SNDHWM, SERVER_HWM)
        sock.setsockopt(zmq.RCVHWM, SERVER_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        resolved: list[str] = []
        try:
            for ep in endpoints:
                sock.bind(ep)
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                resolved.append(last.decode() if isinstance(last, bytes) else str(last))
        except zmq.ZMQError as exc:
            sock.close(0)
            if exc.errno == zmq.EADDRINUSE:  # an OSError, as a socket's bind raises it
                raise OSError(errno.EADDRINUSE, f"cannot bind {ep}: address in use") from exc
            raise OSError(exc.errno, f"cannot bind {ep}: {exc.strerror}") from exc
        return cls(sock, router=True, endpoints=resolved)

    @classmethod
    def dealer_connected(cls, ctx: zmq.Context[Any], endpoint: str,
                         hwm: int | None = None) -> Endpoint:
        """A DEALER connected to ``endpoint``. With ``hwm`` (a peer link): queues
        capped at ``hwm`` messages, and nothing is queued while the peer is not
        connected (a send then fails instead of piling up for a dead process)."""
        sock = ctx.socket(zmq.DEALER)
        _common(sock)
        if hwm is not None:
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        try:
            sock.connect(endpoint)
        except (zmq.ZMQError, TypeError, ValueError) as exc:  # left open, ctx.term() hangs
            sock.close(0)
            from .errors import InvalidArgument

            raise InvalidArgument(f"cannot connect to {endpoint!r}: {exc} (expected "
                                  "tcp://HOST:PORT or ipc://PATH)") from None
        return cls(sock, router=False, endpoints=[endpoint])

    def send(
        self, header: Header, frames: Sequence[Any] = (), identity: bytes = b"", block: bool = False
    ) -> bool:
        """Send one message; False when the peer's queue is full (never blocks
        unless ``block``). A ROUTER silently drops messages to vanished peers."""
        return self.send_raw(encode_header(header), frames, identity, block)

    def send_raw(self, header: bytes, frames: Sequence[Any] = (), identity: bytes = b"",
                 block: bool = False) -> bool:
        """``send`` with the header already encoded."""
        sock, flags = self.sock, 0 if block else _NOBLOCK
        more = flags | _SNDMORE
        try:  # a multipart message is queued whole or (Again on its first part) not at all
            if self.router:
                _send(sock, identity, more, False)
            _send(sock, header, more if frames else flags, False)
        except zmq.Again:
            return False
        last = len(frames) - 1
        for i, f in enumerate(frames):
            try:
                _send(sock, f, more if i < last else flags, False)
            except zmq.Again:  # the peer went away mid-message: libzmq rolled it back
                self.dropped_midway += 1
                for j in range(i + 1, len(frames)):  # the rest is discarded by libzmq;
                    try:  # it must still be offered, or the next message's parts are
                        _send(sock, frames[j], more if j < last else flags, False)
                    except zmq.Again:
                        pass
                return False
        return True

    def send_tracked(
        self, header: Header | bytes, frames: Sequence[Any], identity: bytes = b""
    ) -> list[Any] | None:
        """Send without copying frames of COPY_THRESHOLD bytes or more. Returns, per
        frame, a tracker (``tracker.done`` once libzmq released the memory) or None for
        a small frame copied at once; None instead of the list when the peer's queue
        is full and nothing was sent. The caller must not change a tracked buffer
        until its tracker is done. ``header`` may come encoded."""
        parts: list[Any] = []
        trackers: list[Any] = []
        for f in frames:
            if memoryview(f).nbytes >= COPY_THRESHOLD:
                frame = zmq.Frame(f, copy=False, track=True)
                trackers.append(frame.tracker)
                parts.append(frame)
            else:
                trackers.append(None)
                parts.append(f)  # copied by libzmq at once (below the copy threshold)
        raw = header if isinstance(header, bytes) else encode_header(header)
        return trackers if self.send_raw(raw, parts, identity) else None

    def recv_within(self, timeout_ms: int) -> Incoming | None:
        """The next message, waiting at most ``timeout_ms`` for one (None if none
        came). A blocking receive: a server loop waiting this way wakes for a request
        a little sooner and for less CPU than one that polls and then receives."""
        if timeout_ms <= 0:
            return self.recv()
        if timeout_ms != self._rcvtimeo:
            _set(self.sock, _RCVTIMEO, timeout_ms)
            self._rcvtimeo = timeout_ms
        return self._recv(0)

    def recv(self) -> Incoming | None:
        """The next message, or None when nothing is waiting (never blocks)."""
        if not _get(self.sock, _EVENTS) & _POLLIN:  # type: ignore[operator]
            return None
        return self._recv(_NOBLOCK)

    def _recv(self, flags: int) -> Incoming | None:
        sock = self.sock
        try:
            first = _recv(sock, flags, False)
        except zmq.Again:
            return None
        parts = [first]
        while parts[-1].more:  # the rest of a multipart message is there already
            parts.append(_recv(sock, 0, False))
        identity = b""
        if self.router:
            identity = parts[0].bytes
            parts = parts[1:]
        if not parts:  # an empty header: the codec rejects it as malformed
            return Incoming(identity, memoryview(b""), [], [])
        return Incoming(identity, parts[0].buffer, [p.buffer for p in parts[1:]], parts)

    def watch_disconnects(self) -> Monitor:
        """A monitor that reports when an established connection of this socket drops
        (the peer process died or closed it): poll ``Monitor.sock``."""
        return Monitor(self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))

    def close(self, linger_ms: int = 0) -> None:
        """Close; with ``linger_ms``, messages still queued get that long to leave."""
        self.sock.close(linger_ms)


class Monitor:
    """Disconnect events of one socket (see ``Endpoint.watch_disconnects``)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock

    def disconnected(self) -> bool:
        """Drain the waiting events; True when one was a disconnect."""
        from zmq.utils.monitor import recv_monitor_message

        hit = False
        while self.sock.poll(0):
            event = recv_monitor_message(self.sock, zmq.NOBLOCK)
            hit = hit or bool(event["event"] & zmq.EVENT_DISCONNECTED)
        return hit

    def close(self) -> None:
        self.sock.close(0)


class Poller:
    """Waits on several endpoints and raw file descriptors at once."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()

    def register(self, target: Endpoint | Monitor | int) -> None:
        self._poller.register(target if isinstance(target, int) else target.sock, zmq.POLLIN)

    def unregister(self, target: Endpoint | int) -> None:
        self._poller.unregister(target.sock if isinstance(target, Endpoint) else target)

    def poll(self, timeout_ms: float | None) -> set[Any]:
        """The sockets (zmq.Socket) and fds that are readable."""
        return {s for s, _ in self._poller.poll(None if timeout_ms is None else int(timeout_ms))}


def call(
    ctx: zmq.Context[Any],
    address: str,
    header: Header,
    limits: Limits,
    timeout: float,
    frames: Sequence[Any] = (),
) -> tuple[Header, list[memoryview]]:
    """One request/reply on a fresh DEALER, waiting at most ``timeout`` seconds.

    Raises ``Unavailable`` when no reply with the request's id arrives in time,
    and the reply's error as its exception type. For control traffic (cluster
    map, status, ping), not the data path.
    """
    import time

    from .codec import decode_header
    from .errors import Unavailable, error_from_code

    ep = Endpoint.dealer_connected(ctx, address)
    try:
        ep.send(header, frames, block=False)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not ep.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise Unavailable(f"no reply from {address} within {timeout:g} s")
            incoming = ep.recv()
            if incoming is None:
                continue
            reply = decode_header(incoming.header, limits)
            if reply.request_id != header.request_id:
                continue
            if reply.error:
                raise error_from_code(reply.error, reply.message, reply.opts)
            return reply, incoming.frames
    finally:
        ep.close()
