"""The ZeroMQ endpoint on real sockets: multipart send and receive, the timed wait."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import pytest

from pserver.protocol.codec import decode_header
from pserver.protocol.schema import Header, Kind, Limits, TensorMeta
from pserver.protocol.transport import Endpoint, new_context


@pytest.fixture
def pair() -> Iterator[tuple[Endpoint, Endpoint]]:
    ctx = new_context()
    router = Endpoint.router_bound(ctx, ["tcp://127.0.0.1:0"], Limits())
    dealer = Endpoint.dealer_connected(ctx, router.endpoints[0])
    yield router, dealer
    dealer.close()
    router.close()
    ctx.term()


def _recv(ep: Endpoint, timeout_ms: int = 5000) -> Any:
    got = ep.recv_within(timeout_ms)
    assert got is not None, "nothing arrived"
    return got


def test_header_and_frames_arrive_whole_and_the_reply_finds_its_peer(
        pair: tuple[Endpoint, Endpoint]) -> None:
    router, dealer = pair
    small, large = np.arange(10, dtype=np.float32), np.arange(1 << 17, dtype=np.float64)
    meta = (TensorMeta("a", 0, "float32", (10,), 0, 10, 1),
            TensorMeta("b", 0, "float64", (1 << 17,), 0, 1 << 17, 1))
    assert dealer.send(Header(Kind.PUSH, 7, tensors=meta), [small.data, large.data])
    got = _recv(router)
    header = decode_header(got.header, Limits())
    assert (header.kind, header.request_id, header.tensors) == (Kind.PUSH, 7, meta)
    assert [f.nbytes for f in got.frames] == [small.nbytes, large.nbytes]
    np.testing.assert_array_equal(np.frombuffer(got.frames[1], np.float64), large)
    assert router.send(Header(Kind.REPLY, 7), [got.frames[0]], identity=got.identity)
    reply = _recv(dealer)
    assert decode_header(reply.header, Limits()).request_id == 7
    np.testing.assert_array_equal(np.frombuffer(reply.frames[0], np.float32), small)


def test_recv_within_gives_none_after_its_timeout_and_recv_does_not_wait(
        pair: tuple[Endpoint, Endpoint]) -> None:
    router, _ = pair
    t0 = time.monotonic()
    assert router.recv_within(50) is None
    waited = time.monotonic() - t0
    assert 0.04 <= waited < 5.0
    assert router.recv() is None
    assert router.recv_within(0) is None


def test_messages_queued_before_the_wait_are_all_received_in_order(
        pair: tuple[Endpoint, Endpoint]) -> None:
    router, dealer = pair
    for i in range(1, 201):
        assert dealer.send(Header(Kind.PING, i))
    ids = []
    while len(ids) < 200:
        ids.append(decode_header(_recv(router).header, Limits()).request_id)
    assert ids == list(range(1, 201))


_ECHO_PEER = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    parts = sock.recv_multipart()
    sock.send_multipart([parts[0], parts[1], str(len(parts) - 2).encode()])
"""


def _echo_peer(address: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_PEER, address],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        return proc, proc.stdout.readline().strip()


def _ping_until_echoed(dealer: Endpoint, first_id: int) -> tuple[int, Any]:
    """Send PINGs until one is accepted and echoed; the first accepted id and the echo."""
    deadline, rid = time.monotonic() + 10, first_id
    while time.monotonic() < deadline:
        if dealer.send(Header(Kind.PING, rid)):
            return rid, _recv(dealer)
        rid += 1
        time.sleep(0.01)
    raise AssertionError("the peer never took a message")


def test_a_peer_killed_in_the_middle_of_a_message_loses_that_message_only() -> None:
    """A leader's send to a follower SIGKILLed mid-message never raises, and the next
    message, once the peer is back, arrives whole and first. What libzmq does with the
    rest of the lost message depends on how far it got with the dead connection when
    the next frame comes: it refuses the frame (EAGAIN; the send reports the message
    as not sent, counted in ``dropped_midway``), or takes the frames and drops them
    with the connection (the send reports it sent: a loss the layer above detects, as
    any message lost with a connection)."""
    ctx = new_context()
    peer, address = _echo_peer("tcp://127.0.0.1:0")
    dealer = Endpoint.dealer_connected(ctx, address, hwm=64)
    monitor = dealer.watch_disconnects()
    try:
        _ping_until_echoed(dealer, 1)

        class DiesAtFrameThree(Sequence[bytes]):
            """Six frames; the peer is killed (and gone) before the third is sent."""

            def __len__(self) -> int:
                return 6

            @overload
            def __getitem__(self, i: int) -> bytes: ...
            @overload
            def __getitem__(self, i: slice) -> Sequence[bytes]: ...
            def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
                if i == 2 and peer.poll() is None:
                    peer.kill()
                    peer.wait(10)
                    deadline = time.monotonic() + 10
                    while not monitor.disconnected():
                        assert time.monotonic() < deadline, "no disconnect seen"
                        monitor.sock.poll(100)
                if isinstance(i, slice) or not 0 <= i < 6:
                    raise IndexError(i)
                return b"x" * (64 << 10)

        sent = dealer.send(Header(Kind.PUSH, 100), DiesAtFrameThree())
        assert dealer.dropped_midway == (0 if sent else 1)
        peer, _ = _echo_peer(address)
        rid, echo = _ping_until_echoed(dealer, 200)
        # the first message accepted after the loss is the one that arrives (no
        # leftover frame of the lost message, and it was not swallowed in its place)
        assert decode_header(echo.header, Limits()).request_id == rid
        assert bytes(echo.frames[0]) == b"0"
    finally:
        peer.kill()
        peer.wait(10)
        monitor.close()
        dealer.close()
        ctx.term()
