"""The ZeroMQ endpoint on real sockets: multipart send and receive, the timed wait."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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
