"""Issue 2, "Bad input (each a test)": hostile and broken requests against real shards.

Each bad input must give a typed error (an error reply carrying the request id
where the request had a readable one) or be dropped; after each, every shard
keeps serving another client and its data is unchanged (``intact``).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

import pserver
from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.errors import ErrorCode
from pserver.protocol.schema import MAX_WORKERS, Header, KeyRef, Kind, ShmRef, TensorMeta
from pserver.protocol.shm import MIN_SEGMENT_BYTES, Arena

from .support import (
    REPLY_LIMITS,
    assert_bits_equal,
    key_on_shard,
    replica_statuses,
    shard_pids,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


@dataclass
class Victim:
    """The module's cluster, a well-behaved client and the data it must keep."""

    address: str
    client: Any
    canaries: dict[str, np.ndarray]  # key -> expected value (float32, sgd lr 0.5)
    on_shard: dict[int, str]  # shard -> a canary key whose part 0 lives there
    pids: list[int]

    def tcp(self, shard: int) -> str:
        return str(self.client.cluster_map["shards"][shard]["replicas"][0]["tcp"])

    def shard_of(self, key: str) -> int:
        return int(self.client.shard_map.shard_for(key, 0))

    def applied(self) -> list[int]:
        return [s["replicas"][0]["applied_index"] for s in self.client.status()["shards"]]


@pytest.fixture(scope="module")
def victim(cluster4: Any) -> Any:
    client = pserver.connect(cluster4.address, timeout=10.0)
    rng = np.random.default_rng(7)
    on_shard = {s: key_on_shard(client.shard_map, s, "canary") for s in range(4)}
    canaries = {k: rng.standard_normal(64).astype(np.float32) for k in on_shard.values()}
    # a chunked canary too: 6 MiB, so two parts on two shards
    canaries["canary-big"] = rng.standard_normal(6 * MiB // 4).astype(np.float32)
    client.init(canaries, optimizer={"name": "sgd", "lr": 0.5})
    pids = shard_pids(client.status())
    v = Victim(cluster4.address, client, canaries, on_shard, pids)
    intact(v)
    yield v
    client.close()


def intact(v: Victim) -> None:
    """Every shard serves another client, no shard process was replaced, and every
    canary holds exactly its expected bytes."""
    st = v.client.status()
    assert shard_pids(st) == v.pids, "a shard process died and was restarted"
    assert all(s["replicas"][0]["role"] == "leader" for s in st["shards"]), st
    got = v.client.pull(list(v.canaries))
    for k, want in v.canaries.items():
        assert_bits_equal(got[k], want, f"canary {k}")


def hdr(kind: Kind, rid: int, tensors: tuple[TensorMeta, ...] = (),
        refs: tuple[KeyRef, ...] = (), **kw: Any) -> bytes:
    return encode_header(Header(kind, rid, tensors=tensors, refs=refs, **kw))


def f32_meta(key: str, n: int, nframes: int, shape: tuple[int, ...] | None = None,
             count: int | None = None) -> TensorMeta:
    return TensorMeta(key, 0, "float32", shape if shape is not None else (n,), 0,
                      n if count is None else count, nframes)


def expect_error(reply: tuple[Any, list[bytes]], code: ErrorCode, rid: int) -> None:
    header, frames = reply
    assert header.kind == Kind.REPLY
    assert (ErrorCode(header.error), header.request_id) == (code, rid), header.message
    assert header.message, "an error reply says what was wrong"
    assert frames == []


# -- garbage ---------------------------------------------------------------------


def _garbage_streams() -> list[bytes]:
    rng = random.Random(20)
    streams = [rng.randbytes(n) for n in (1, 9, 10, 64, 1000, 65536, MiB)]
    # a valid ZMTP 3.0 greeting followed by garbage where the handshake should be
    greeting = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
                + bytes(32))
    streams.append(greeting + rng.randbytes(4096))
    # a greeting announcing a frame of 2**63 bytes
    streams.append(greeting + b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
                   + b"\x02" + (1 << 63).to_bytes(8, "big") + rng.randbytes(100))
    return streams


def _spray(address: str, payload: bytes) -> None:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            # Read until the server drops us (or 2 s pass): it has then seen the bytes.
            s.settimeout(2.0)
            while s.recv(65536):
                pass
        except OSError:  # reset, not connected, timed out: the server dropped us
            pass


def test_random_bytes_on_the_client_tcp_ports(victim: Victim) -> None:
    for payload in _garbage_streams():
        for shard in range(4):
            _spray(victim.tcp(shard), payload)
        _spray(victim.address, payload)  # the bootstrap port too
    intact(victim)
    with pserver.connect(victim.address, timeout=10.0) as fresh:  # bootstrap still serves
        assert_bits_equal(fresh.pull(["canary-big"])["canary-big"], victim.canaries["canary-big"])


def test_random_bytes_as_zeromq_messages_get_malformed_replies(victim: Victim,
                                                               raw_peer: Any) -> None:
    rng = random.Random(21)
    peer = raw_peer(victim.tcp(0))
    messages = [[b""], [b"\xc1"], [msgpack.packb([1, 2, 3])], [msgpack.packb({"v": 1})]]
    for _ in range(100):
        parts = [rng.randbytes(rng.randint(1, 512))]
        parts += [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(0, 3))]
        messages.append(parts)
    for parts in messages:
        expect_error(peer.request(parts[0], parts[1:]), ErrorCode.MALFORMED, 0)
    intact(victim)


def test_bootstrap_answers_garbage_with_an_error(victim: Victim, raw_peer: Any) -> None:
    peer = raw_peer(victim.address)
    expect_error(peer.request(b"\x93\x01\x02"), ErrorCode.MALFORMED, 0)
    header, _ = peer.request(hdr(Kind.PUSH, 5))  # a kind only shards serve
    assert header.request_id == 5
    assert header.error != 0
    reply, _ = peer.request(hdr(Kind.MAP, 6))
    assert (reply.error, reply.request_id) == (0, 6)
    assert reply.opts["shards"]
    intact(victim)


# -- headers that do not match their frames ----------------------------------------


def test_header_that_lies_about_frame_count(victim: Victim, raw_peer: Any) -> None:
    key = victim.on_shard[1]
    peer = raw_peer(victim.tcp(1))
    data = np.ones(64, np.float32).tobytes()
    cases = [
        (2, [data]),                       # says 2 frames, sends 1
        (1, [data, data]),                 # says 1 frame, sends 2
        (0, [data]),                       # says no data, sends some
        (1, []),                           # says 1 frame, sends none
        (2, [data[:128], data[128:], data]),  # 3 frames for 2
    ]
    for rid, (nframes, frames) in enumerate(cases, start=100):
        reply = peer.request(hdr(Kind.PUSH, rid, (f32_meta(key, 64, nframes),)), frames)
        expect_error(reply, ErrorCode.MALFORMED, rid)
    intact(victim)


def test_frames_that_do_not_match_the_shape(victim: Victim, raw_peer: Any) -> None:
    key = victim.on_shard[2]
    peer = raw_peer(victim.tcp(2))
    ones = np.ones(64, np.float32).tobytes()
    cases = [
        [ones[:-4]],                 # one element short
        [ones[:-1]],                 # not a whole number of float32
        [ones + ones[:4]],           # one element too many
        [b""],                       # empty
        [ones[:128], ones[128:-4]],  # two frames, together short
    ]
    for rid, frames in enumerate(cases, start=200):
        reply = peer.request(hdr(Kind.PUSH, rid, (f32_meta(key, 64, len(frames)),)), frames)
        expect_error(reply, ErrorCode.MALFORMED, rid)
        reply = peer.request(hdr(Kind.PUSH_PULL, rid + 50, (f32_meta(key, 64, len(frames)),)),
                             frames)
        expect_error(reply, ErrorCode.MALFORMED, rid + 50)
    intact(victim)


def test_init_with_a_short_frame_creates_nothing(victim: Victim, raw_peer: Any) -> None:
    key = key_on_shard(victim.client.shard_map, 3, "short-init")
    peer = raw_peer(victim.tcp(3))
    reply = peer.request(hdr(Kind.INIT, 300, (f32_meta(key, 1000, 1),)),
                         [np.zeros(999, np.float32).tobytes()])
    expect_error(reply, ErrorCode.MALFORMED, 300)
    # a header claiming 2**40 elements with a tiny frame: refused, nothing allocated
    huge = TensorMeta(key, 0, "float32", (1 << 20, 1 << 20), 0, 1 << 40, 1)
    header, _ = peer.request(hdr(Kind.INIT, 301, (huge,)), [b"\0" * 16])
    assert header.request_id == 301
    assert ErrorCode(header.error) in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE), header.message
    with pytest.raises(pserver.KeyNotFound):
        victim.client.pull([key])
    intact(victim)


# -- arrays the client must refuse before sending -------------------------------------


def test_non_contiguous_and_wrong_dtype_arrays_are_refused_before_sending(
        victim: Victim) -> None:
    c = victim.client
    key = victim.on_shard[0]
    applied = victim.applied()
    strided = np.zeros((64, 2), np.float32)[:, 0]
    assert strided.shape == (64,)
    assert not strided.flags.c_contiguous
    with pytest.raises(pserver.InvalidArgument):
        c.push({key: strided})
    with pytest.raises(pserver.InvalidArgument):
        c.push_pull({key: strided})
    with pytest.raises(pserver.InvalidArgument):
        c.pull_into({key: np.zeros((64, 2), np.float32)[:, 1]})
    with pytest.raises(pserver.InvalidArgument):
        c.init({"refused/fortran": np.zeros((4, 3), np.float32, order="F")})
    with pytest.raises(pserver.InvalidArgument):
        c.push({key: [0.0] * 64})  # not an array at all
    for dtype in (np.float64, np.int32, np.int8):  # float16 into float32 is accepted
        with pytest.raises(pserver.ShapeMismatch):
            c.push({key: np.zeros(64, dtype)})
    with pytest.raises(pserver.ShapeMismatch):
        c.pull_into({key: np.zeros(64, np.float64)})
    for dtype in (np.complex64, np.int8, np.bool_, np.uint32, np.dtype(">f4"), object):
        with pytest.raises(pserver.InvalidArgument):
            c.init({"refused/dtype": np.zeros(3, dtype)})
    # a refusal that happens halfway through a request's keys must send nothing either
    with pytest.raises(pserver.InvalidArgument):
        c.push({key: np.ones(64, np.float32), victim.on_shard[1]: strided})
    assert victim.applied() == applied, "a refused call reached a shard"
    with pytest.raises(pserver.KeyNotFound):
        c.pull(["refused/fortran"])
    with pytest.raises(pserver.KeyNotFound):
        c.pull(["refused/dtype"])
    intact(victim)


def test_read_only_output_array_is_refused_like_other_bad_outputs(victim: Victim) -> None:
    """pull_into checks its output arrays before sending (contiguity, shape, dtype);
    a read-only one is the same kind of caller error and gets the same typed error."""
    key = victim.on_shard[0]
    out = np.empty(64, np.float32)
    out.flags.writeable = False
    with pytest.raises(pserver.InvalidArgument):
        victim.client.pull_into({key: out})
    intact(victim)


# -- caps -------------------------------------------------------------------------


@pytest.mark.parametrize("nkeys", [4097, 10_000])
def test_too_many_keys_in_one_raw_request(victim: Victim, raw_peer: Any, nkeys: int) -> None:
    key = victim.on_shard[0]
    peer = raw_peer(victim.tcp(0))
    refs = tuple(KeyRef(key, 0) for _ in range(nkeys))
    expect_error(peer.request(hdr(Kind.PULL, 400 + nkeys, refs=refs)), ErrorCode.TOO_LARGE,
                 400 + nkeys)
    intact(victim)


def test_many_unknown_keys_through_the_client(victim: Victim) -> None:
    with pytest.raises(pserver.KeyNotFound):
        victim.client.pull([f"absent/{i}" for i in range(10_000)])
    intact(victim)


def test_key_of_10_kb(victim: Victim, raw_peer: Any) -> None:
    long_key = "k" * 10_000
    c = victim.client
    applied = victim.applied()
    with pytest.raises(pserver.RequestTooLarge):
        c.init({long_key: np.zeros(3, np.float32)})
    with pytest.raises(pserver.RequestTooLarge):
        c.push({long_key: np.zeros(3, np.float32)})
    with pytest.raises(pserver.RequestTooLarge):
        c.pull([long_key])
    assert victim.applied() == applied, "a refused call reached a shard"
    shard = victim.shard_of(long_key)
    peer = raw_peer(victim.tcp(shard))
    expect_error(peer.request(hdr(Kind.PULL, 500, refs=(KeyRef(long_key, 0),))),
                 ErrorCode.TOO_LARGE, 500)
    expect_error(peer.request(hdr(Kind.INIT, 501, (f32_meta(long_key, 3, 1),)),
                              [np.zeros(3, np.float32).tobytes()]),
                 ErrorCode.TOO_LARGE, 501)
    intact(victim)


def test_request_above_the_size_cap(cluster_factory: Any, raw_peer: Any) -> None:
    cluster = cluster_factory("--shards", "2", "--max-request-bytes", str(MiB),
                              "--chunk-bytes", str(MiB))
    with pserver.connect(cluster.address, timeout=10.0) as c:
        assert c.limits.max_request_bytes == MiB
        keep = np.arange(MiB // 16, dtype=np.float32)  # 256 KiB, fits
        c.init({"keep": keep})
        key = key_on_shard(c.shard_map, 0, "too-big")
        peer = raw_peer(c.cluster_map["shards"][0]["replicas"][0]["tcp"])
        n = 2 * MiB // 4
        half = np.zeros(n // 2, np.float32).tobytes()
        expect_error(peer.request(hdr(Kind.INIT, 600, (f32_meta(key, n, 2),)), [half, half]),
                     ErrorCode.TOO_LARGE, 600)
        expect_error(peer.request(hdr(Kind.INIT, 601, (f32_meta(key, n, 1),)), [half + half]),
                     ErrorCode.TOO_LARGE, 601)
        # The client cuts the same 2 MiB tensor into chunks that fit the cap.
        with pytest.raises(pserver.KeyNotFound):
            c.pull([key])
        value = np.arange(n, dtype=np.float32)
        c.init({key: value})
        assert_bits_equal(c.pull([key])[key], value)
        assert_bits_equal(c.pull(["keep"])["keep"], keep)
        reply, _ = peer.request(hdr(Kind.PING, 602))
        assert (reply.error, reply.request_id) == (0, 602)


def test_client_splits_requests_to_stay_under_the_size_cap(cluster_factory: Any) -> None:
    """Keys that each fit under the cap must not be refused for travelling together."""
    cluster = cluster_factory("--shards", "2", "--max-request-bytes", str(MiB),
                              "--chunk-bytes", str(MiB))
    with pserver.connect(cluster.address, timeout=10.0) as c:
        keys = [key_on_shard(c.shard_map, 0, f"fits{i}") for i in range(3)]
        values = {k: np.full(600 * 1024 // 4, i, np.float32) for i, k in enumerate(keys)}
        c.init(values, optimizer={"name": "sum"})
        c.push(values)
        got = c.pull(keys)
    for k, v in values.items():
        assert_bits_equal(got[k], v + v, k)


# -- peers that vanish mid-message ----------------------------------------------------

_HALF_SENDER = textwrap.dedent("""
    import os, sys, zmq
    from pserver.protocol.codec import decode_header, encode_header
    from pserver.protocol.schema import Header, Kind, TensorMeta
    address, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(address)
    s.send(encode_header(Header(Kind.PING, 1)))
    assert s.poll(10000), "no PING reply"
    s.recv_multipart()
    grad = b"\\x00\\x00\\x80\\x3f" * 64  # float32 ones
    meta = TensorMeta(key, 0, "float32", (64,), 0, 64, 2)
    s.send(encode_header(Header(Kind.PUSH, 2, tensors=(meta,))), zmq.SNDMORE)
    if mode == "one-of-two":
        s.send(grad[:128], zmq.SNDMORE)
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["header-only", "one-of-two"])
def test_client_that_sends_half_a_multipart_and_vanishes(victim: Victim, mode: str) -> None:
    key = victim.on_shard[3]
    proc = subprocess.run([sys.executable, "-c", _HALF_SENDER, victim.tcp(3), key, mode],
                          timeout=30, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    intact(victim)


def _zmtp_frame(body: bytes, flags: int) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 0x02]) + len(body).to_bytes(8, "big") + body


class RawZmtp:
    """A hand-written ZMTP 3.0 DEALER on a plain TCP socket, to control exactly
    which bytes reach the server before the connection drops."""

    GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)

    def __init__(self, address: str) -> None:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10.0)
        ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        self.sock.sendall(self.GREETING + _zmtp_frame(ready, 0x04))
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read_frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = (int.from_bytes(self._read(8), "big") if flags & 0x02 else self._read(1)[0])
        return flags, self._read(size)

    def handshake(self) -> None:
        assert self._read(64)[:1] == b"\xff"
        flags, body = self._read_frame()
        assert flags & 0x04, flags
        assert body.startswith(b"\x05READY"), body

    def send(self, parts: list[bytes]) -> None:
        self.sock.sendall(b"".join(_zmtp_frame(p, 0x01 if i < len(parts) - 1 else 0)
                                   for i, p in enumerate(parts)))

    def recv(self) -> list[bytes]:
        parts = []
        while True:
            flags, body = self._read_frame()
            parts.append(body)
            if not flags & 0x01:
                return parts

    def close(self) -> None:
        self.sock.close()


def test_hand_written_zmtp_peer_is_served(victim: Victim) -> None:
    """Checks RawZmtp itself, so the truncation tests below cannot pass vacuously."""
    peer = RawZmtp(victim.tcp(0))
    try:
        peer.handshake()
        peer.send([hdr(Kind.PING, 700)])
        reply = decode_header(peer.recv()[0], REPLY_LIMITS)
        assert (reply.error, reply.request_id) == (0, 700)
    finally:
        peer.close()


@pytest.mark.parametrize("cut", ["after-header-frame", "inside-data-frame", "inside-header"])
def test_connection_dropped_mid_message(victim: Victim, cut: str) -> None:
    key = victim.on_shard[0]
    grad = np.ones(64, np.float32).tobytes()
    header = hdr(Kind.PUSH, 800, (f32_meta(key, 64, 1),))
    wire = _zmtp_frame(header, 0x01) + _zmtp_frame(grad, 0)
    if cut == "after-header-frame":
        wire = _zmtp_frame(header, 0x01)
    elif cut == "inside-data-frame":
        wire = wire[:-100]
    else:
        wire = wire[: len(header) // 2]
    peer = RawZmtp(victim.tcp(0))
    try:
        peer.handshake()
        peer.sock.sendall(wire)
    finally:
        peer.close()
    intact(victim)


# -- well-formed requests the shard must refuse -----------------------------------------


def test_unsupported_version_and_unknown_kind_get_error_replies(victim: Victim,
                                                               raw_peer: Any) -> None:
    for address in (victim.tcp(1), victim.address):
        peer = raw_peer(address)
        for rid, version in ((900, 0), (901, 2), (902, 99)):
            reply = peer.request(msgpack.packb({"v": version, "k": int(Kind.PING), "id": rid}))
            expect_error(reply, ErrorCode.UNSUPPORTED_VERSION, rid)
        for rid, kind in ((910, 77), (911, 0), (912, 99999)):
            reply = peer.request(msgpack.packb({"v": 1, "k": kind, "id": rid}))
            expect_error(reply, ErrorCode.UNKNOWN_KIND, rid)
    # kinds the protocol knows but a shard does not serve
    peer = raw_peer(victim.tcp(1))
    for rid, kind in ((920, Kind.MAP), (921, Kind.REPLY), (922, Kind.PEER_DOWN),
                      (923, Kind.RAFT)):
        header, _ = peer.request(hdr(kind, rid))
        assert header.request_id == rid, header
        assert header.error != 0, header
    intact(victim)


def test_pull_of_an_unknown_key(victim: Victim, raw_peer: Any) -> None:
    with pytest.raises(pserver.KeyNotFound):
        victim.client.pull(["no-such-key"])
    shard = victim.shard_of("no-such-key")
    peer = raw_peer(victim.tcp(shard))
    expect_error(peer.request(hdr(Kind.PULL, 1000, refs=(KeyRef("no-such-key", 0),))),
                 ErrorCode.KEY_NOT_FOUND, 1000)
    # a known key asked of a shard that does not own it
    canary = victim.on_shard[2]
    peer = raw_peer(victim.tcp(3))
    expect_error(peer.request(hdr(Kind.PULL, 1001, refs=(KeyRef(canary, 0),))),
                 ErrorCode.WRONG_SHARD, 1001)
    intact(victim)


def test_init_of_an_existing_key_with_another_shape(victim: Victim, raw_peer: Any) -> None:
    c = victim.client
    for key in (victim.on_shard[1], "canary-big"):
        for other in (np.zeros(63, np.float32), np.zeros((8, 8), np.float32),
                      np.zeros(64, np.float64), np.zeros(6 * MiB // 4, np.int32)):
            with pytest.raises(pserver.ShapeMismatch):
                c.init({key: other})
    key = victim.on_shard[1]
    peer = raw_peer(victim.tcp(1))
    expect_error(peer.request(hdr(Kind.INIT, 1100, (f32_meta(key, 32, 1),)),
                              [np.zeros(32, np.float32).tobytes()]),
                 ErrorCode.SHAPE_MISMATCH, 1100)
    intact(victim)


def test_pushes_still_apply_after_all_that(victim: Victim) -> None:
    """The canaries were only read so far; an ordinary push still updates them."""
    key = victim.on_shard[2]
    g = np.full(64, 2.0, np.float32)
    victim.client.push({key: g})
    victim.canaries[key] = victim.canaries[key] - np.float32(0.5) * g
    intact(victim)



def test_bad_shared_memory_references(victim: Victim, raw_peer: Any) -> None:
    """PROTOCOL.md §4.6: a reference to memory the shard cannot open is
    SHM_UNAVAILABLE; spans or a reply region outside the segment, a name that is
    not a segment's, data frames besides spans, or spans that do not hold the
    shape are MALFORMED. Nothing is applied; a good reference then works."""
    key = victim.on_shard[0]
    peer = raw_peer(victim.tcp(0))
    arena = Arena()
    try:
        block = arena.alloc(4096)
        assert block is not None
        g = np.full(64, 2.0, np.float32)
        block.array(block.offset, 256)[:] = g.view(np.uint8)
        size = MIN_SEGMENT_BYTES
        span = ((block.offset, 256),)
        meta = (f32_meta(key, 64, 1),)
        missing = "pserver-1-0123456789abcdef"
        cases: list[tuple[ShmRef | dict[str, Any], list[bytes], ErrorCode]] = [
            (ShmRef(missing, span), [], ErrorCode.SHM_UNAVAILABLE),
            (ShmRef(block.name, ((size - 128, 256),)), [], ErrorCode.MALFORMED),
            (ShmRef(block.name, span, (size - 64, 4096)), [], ErrorCode.MALFORMED),
            (ShmRef(block.name, ((block.offset, 128),)), [], ErrorCode.MALFORMED),  # short
            (ShmRef(block.name, span), [g.tobytes()], ErrorCode.MALFORMED),  # and a frame
            ({"name": "../../etc/passwd"}, [], ErrorCode.MALFORMED),
        ]
        for rid, (ref, frames, code) in enumerate(cases, start=1300):
            if isinstance(ref, ShmRef):
                raw = hdr(Kind.PUSH_PULL, rid, meta, shm=ref)
            else:
                raw = msgpack.packb({"v": 1, "k": int(Kind.PUSH_PULL), "id": rid,
                                     "t": [m.to_wire() for m in meta],
                                     "x": [ref["name"], [list(span[0])], None]})
            expect_error(peer.request(raw, frames), code, rid)
        intact(victim)
        reply, frames = peer.request(hdr(Kind.PUSH_PULL, 1399, meta, shm=ShmRef(
            block.name, span, (block.offset + 256, 256))))
        assert (reply.error, frames) == (0, [])
        assert reply.shm is not None and reply.shm.name == block.name
        ((off, n),) = reply.shm.spans
        victim.canaries[key] = victim.canaries[key] - np.float32(0.5) * g
        assert_bits_equal(block.array(off, n).view(np.float32), victim.canaries[key], key)
        intact(victim)
    finally:
        arena.close()


def test_a_resent_push_is_applied_once(victim: Victim, raw_peer: Any) -> None:
    """Exactly-once: the same (client id, seq) sent twice changes the value once and
    both copies get a success reply; an INIT resent returns its first reply."""
    key = victim.on_shard[3]
    peer = raw_peer(victim.tcp(3))
    g = np.full(64, 2.0, np.float32)
    cid = b"resender-0123456"
    header = hdr(Kind.PUSH, 1200, (f32_meta(key, 64, 1),), client_id=cid, seq=1)
    for _ in range(2):
        reply, _ = peer.request(header, [g.tobytes()])
        assert (reply.error, reply.request_id) == (0, 1200)
    victim.canaries[key] = victim.canaries[key] - np.float32(0.5) * g
    intact(victim)


def test_a_barrier_carries_no_data_and_few_generations_wait_at_once(
        victim: Victim, raw_peer: Any) -> None:
    """A shard holds a barrier request until its generation completes: one with data
    frames is refused (it would hold them), and past MAX_PENDING_BARRIERS waiting
    generations a new one is refused, so a client looping over fresh generations
    cannot grow a shard's memory. Completing them empties the table."""
    from pserver.server import MAX_PENDING_BARRIERS

    peer = raw_peer(victim.tcp(0))
    base = 10**6

    def barrier(rid: int, gen: int, worker: int, **kw: Any) -> bytes:
        return hdr(Kind.BARRIER, rid, opts={"gen": gen, "worker": worker, "workers": 2},
                   **kw)

    expect_error(peer.request(barrier(1, base, 0, tensors=(f32_meta("junk", 4, 1),)),
                              [bytes(16)]), ErrorCode.INVALID_ARGUMENT, 1)
    for gen in range(base, base + MAX_PENDING_BARRIERS):
        peer.send([barrier(gen, gen, 0)])
    expect_error(peer.request(barrier(2, base + MAX_PENDING_BARRIERS, 0)),
                 ErrorCode.INVALID_ARGUMENT, 2)
    waiting = [s["barrier_waiting"] for s in replica_statuses(victim.client)]
    assert waiting[0] == MAX_PENDING_BARRIERS, waiting
    for gen in range(base, base + MAX_PENDING_BARRIERS):  # worker 1 completes each
        peer.send([barrier(gen, gen, 1)])
    answered = sorted(peer.recv()[0].request_id for _ in range(2 * MAX_PENDING_BARRIERS))
    assert answered == sorted(2 * list(range(base, base + MAX_PENDING_BARRIERS)))
    assert replica_statuses(victim.client)[0]["barrier_waiting"] == 0
    intact(victim)


@pytest.mark.parametrize(("kind", "opts"), [
    (Kind.HEARTBEAT, {"worker": -5}), (Kind.HEARTBEAT, {"worker": [1]}),
    (Kind.HEARTBEAT, {"worker": MAX_WORKERS}), (Kind.PULL, {"worker": 2**63}),
    (Kind.PULL, {"worker": "0"}), (Kind.INIT, {"workers": MAX_WORKERS + 1, "mode": "sync"}),
])
def test_worker_ids_and_counts_out_of_range_are_refused(
        victim: Victim, raw_peer: Any, kind: Kind, opts: dict[str, Any]) -> None:
    """A shard keeps a liveness entry per worker id it hears from: ids outside
    [0, MAX_WORKERS) (and keys of more workers) are refused, not remembered."""
    key, fresh = victim.on_shard[1], key_on_shard(victim.client.shard_map, 1, "many-workers")
    peer = raw_peer(victim.tcp(1))
    before = replica_statuses(victim.client)[1].get("workers", {})
    if kind == Kind.PULL:
        h = hdr(kind, 77, refs=(KeyRef(key, 0),), opts=opts)
        frames: list[bytes] = []
    elif kind == Kind.INIT:
        h, frames = hdr(kind, 77, (f32_meta(fresh, 4, 1),), opts=opts), [bytes(16)]
    else:
        h, frames = hdr(kind, 77, opts=opts), []
    expect_error(peer.request(h, frames), ErrorCode.INVALID_ARGUMENT, 77)
    assert replica_statuses(victim.client)[1].get("workers", {}) == before
    with pytest.raises(pserver.KeyNotFound):
        victim.client.pull([fresh])
    intact(victim)


def test_many_long_keys_are_split_to_stay_under_the_header_cap(cluster_factory: Any) -> None:
    """1,100 keys with 1,024-byte names on one shard: their descriptors are over the
    1 MiB header cap together, so the client sends them in several messages (once
    the shard answered TOO_LARGE without the request id, and the client waited out
    its timeout)."""
    cluster = cluster_factory("--shards", "1")
    with pserver.connect(cluster.address, timeout=10.0) as c:
        keys = [f"{i:06d}".ljust(1024, "k") for i in range(1100)]
        values = {k: np.full(2, i, np.float32) for i, k in enumerate(keys)}
        assert all(c.init(values, optimizer={"name": "sum"}).values())
        c.push(values)
        got = c.pull(keys)
        assert sorted(c.keys()) == sorted(keys)
    for k, v in values.items():
        assert_bits_equal(got[k], v + v, k[:6])
