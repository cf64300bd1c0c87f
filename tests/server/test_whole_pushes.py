"""ShardServer's path for whole pushes (``_whole_pushes``): the same replies and the
same state as the general path, and everything else left to the general path.

Each test runs a shard in this process on a real ROUTER and talks to it through a
real DEALER; ``handle`` is called on each message the shard receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.errors import ErrorCode
from pserver.protocol.schema import Header, Kind, Limits, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.server import ShardServer

CID = b"whole-pushes-test"


class Rig:
    """A shard and a DEALER connected to it; ``whole`` counts the messages the
    whole-push path took."""

    def __init__(self, fast: bool) -> None:
        self.server = ShardServer(0, ShardMap.uniform(1), ["tcp://127.0.0.1:0"],
                                  frame_bytes=1 << 20)
        self.whole = 0
        general = self.server._whole_pushes

        def counted(incoming: Any) -> bool:
            took = fast and general(incoming)
            self.whole += took
            return took

        self.server._whole_pushes = counted  # type: ignore[method-assign]
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.server.endpoints[0])
        self.seq = 0

    def send(self, kind: Kind, tensors: tuple[TensorMeta, ...], frames: list[Any],
             opts: dict[str, Any] | None = None, seq: int | None = None,
             raw_header: bytes | None = None) -> tuple[Header, list[bytes]]:
        """One request through the shard; its reply's header and frames."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        header = raw_header or encode_header(
            Header(kind, 1000 + seq, client_id=CID, seq=seq, tensors=tensors, opts=opts or {}))
        self.sock.send_multipart([header, *frames])
        incoming = self.server.endpoint.recv_within(5000)
        assert incoming is not None, "the shard received nothing"
        self.server.handle(incoming)
        assert self.sock.poll(5000), "no reply"
        raw, *data = self.sock.recv_multipart()
        return decode_header(raw, Limits()), data

    def init(self, key: str, value: np.ndarray[Any, Any], **opts: Any) -> None:
        meta = TensorMeta(key, 0, str(value.dtype), value.shape, 0, value.size, 1)
        reply, _ = self.send(Kind.INIT, (meta,), [value.tobytes()], opts)
        assert reply.error == 0, reply.message

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        self.server.endpoint.close()
        self.server.ctx.term()


@pytest.fixture
def rigs() -> Iterator[tuple[Rig, Rig]]:
    fast, general = Rig(True), Rig(False)
    yield fast, general
    fast.close()
    general.close()


def _meta(key: str, a: np.ndarray[Any, Any]) -> TensorMeta:
    return TensorMeta(key, 0, str(a.dtype), a.shape, 0, a.size, 1)


def test_whole_pushes_give_the_replies_and_state_of_the_general_path(
        rigs: tuple[Rig, Rig]) -> None:
    """sgd, adam and sum keys (one of them over the 64 KiB zero-copy threshold), pushed
    alone and together, with and without a worker id: the same reply bytes, the same
    values, the same session table; the whole-push path took every push."""
    rng = np.random.default_rng(5)
    keys = {"w": np.zeros((8, 8), np.float32), "big": np.zeros(40_000, np.float32),
            "h": np.ones(17, np.float64)}
    opts = {"w": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "big": {"name": "adam"},
            "h": {"name": "sum"}}
    for rig in rigs:
        for k, v in keys.items():
            rig.init(k, v, optimizer=opts[k])
    replies: list[list[Any]] = [[], []]
    for step in range(6):
        names = ["w"] if step % 3 == 0 else ["big", "h"] if step % 3 == 1 else list(keys)
        grads = {k: rng.standard_normal(keys[k].shape).astype(keys[k].dtype) for k in names}
        kind = Kind.PUSH_PULL if step % 2 else Kind.PUSH
        for i, rig in enumerate(rigs):
            reply, data = rig.send(kind, tuple(_meta(k, g) for k, g in grads.items()),
                                   [g.tobytes() for g in grads.values()],
                                   {"worker": 1} if step > 2 else None)
            replies[i].append((reply, data))
    assert replies[0] == replies[1]
    assert all(r.error == 0 for r, _ in replies[0])
    fast, general = rigs
    assert fast.whole == 6 and general.whole == 0
    for key in keys:
        a, b = fast.server.state.slots[(key, 0)], general.server.state.slots[(key, 0)]
        assert a.value.tobytes() == b.value.tobytes() and a.step == b.step == a.step
        assert {k: v.tobytes() for k, v in a.state.items()} == {
            k: v.tobytes() for k, v in b.state.items()}
        assert a.worker_steps == b.worker_steps
    assert fast.server.state.applied_index == general.server.state.applied_index
    assert fast.server.state.sessions.to_wire() == general.server.state.sessions.to_wire()
    assert set(fast.server._last_seen) == {1}


def test_a_repeated_push_is_answered_without_being_applied_again(
        rigs: tuple[Rig, Rig]) -> None:
    fast, _ = rigs
    fast.init("w", np.zeros(4, np.float32), optimizer={"name": "sum"})
    g = np.ones(4, np.float32)
    first, data = fast.send(Kind.PUSH_PULL, (_meta("w", g),), [g.tobytes()], seq=7)
    again, data_again = fast.send(Kind.PUSH_PULL, (_meta("w", g),), [g.tobytes()], seq=7)
    assert first.error == again.error == 0
    assert data == data_again and np.frombuffer(data_again[0], np.float32).tolist() == [1.0] * 4
    assert fast.whole == 1  # the repeat went through the session table
    assert fast.server.state.slots[("w", 0)].value.tolist() == [1.0] * 4


@pytest.mark.parametrize("case", ["sync key", "float16 gradient", "wrong shape",
                                  "part twice", "other option", "unknown key", "short frame",
                                  "frames missing", "over the request cap"])
def test_anything_else_takes_the_general_path(rigs: tuple[Rig, Rig], case: str) -> None:
    """Pushes the whole-push path must not take: each gets the general path's reply
    (an error where the request is wrong), and the state is the general path's."""
    for rig in rigs:
        for key in "wxyzv":
            rig.init(key, np.zeros(4, np.float32), optimizer={"name": "sum"})
        rig.init("s", np.zeros(4, np.float32), optimizer={"name": "sum"}, mode="sync",
                 workers=1)
    g = np.ones(4, np.float32)
    w = _meta("w", g)
    cases: dict[str, tuple[tuple[TensorMeta, ...], list[bytes], dict[str, Any] | None]] = {
        "sync key": ((_meta("s", g),), [g.tobytes()], None),
        "float16 gradient": ((_meta("w", g.astype(np.float16)),),
                             [g.astype(np.float16).tobytes()], None),
        "wrong shape": ((TensorMeta("w", 0, "float32", (2, 2), 0, 4, 1),), [g.tobytes()], None),
        "part twice": ((w, w), [g.tobytes(), g.tobytes()], None),
        "other option": ((w,), [g.tobytes()], {"worker": 0, "encoding": "none"}),
        "unknown key": ((_meta("nope", g),), [g.tobytes()], None),
        "short frame": ((w,), [g.tobytes()[:8]], None),
        "frames missing": ((w,), [], None),
        "over the request cap": ((w, _meta("x", g), _meta("y", g), _meta("z", g), _meta("v", g)),
                                 [g.tobytes()] * 5, None),
    }
    tensors, frames, opts = cases[case]
    if case == "over the request cap":  # 5 x 16 bytes
        for rig in rigs:
            rig.server.limits = Limits(max_request_bytes=64)
    got = [rig.send(Kind.PUSH_PULL, tensors, frames, opts) for rig in rigs]
    assert got[0] == got[1]
    assert rigs[0].whole == 0
    for key in ("w", "s"):
        assert rigs[0].server.state.slots[(key, 0)].value.tobytes() == \
            rigs[1].server.state.slots[(key, 0)].value.tobytes()


def test_a_malformed_header_gets_the_general_paths_error(rigs: tuple[Rig, Rig]) -> None:
    fast, _ = rigs
    raw = msgpack.packb({"v": 1, "k": int(Kind.PUSH), "id": 5, "t": "not a list"})
    reply, _ = fast.send(Kind.PUSH, (), [], raw_header=raw)
    assert reply.error == ErrorCode.MALFORMED and reply.request_id == 5
    assert fast.whole == 0


@pytest.mark.parametrize(("field", "value"), [(1, False), (4, 0.0), (5, 4.0), (6, True),
                                         (3, [4.0])])
def test_bools_and_floats_for_integer_fields_are_refused_as_on_the_general_path(
        rigs: tuple[Rig, Rig], field: int, value: Any) -> None:
    """A descriptor equal to the key's in value but with a bool or float where the
    protocol wants an int (False == 0, 4.0 == 4 in Python) is malformed on both paths
    and changes nothing."""
    g = np.ones(4, np.float32)
    got = []
    for rig in rigs:
        rig.init("w", np.zeros(4, np.float32), optimizer={"name": "sum"})
        desc: list[Any] = ["w", 0, "float32", [4], 0, 4, 1]
        desc[field] = value
        raw = msgpack.packb({"v": 1, "k": int(Kind.PUSH), "id": 9, "cid": CID, "seq": 3,
                             "t": [desc]}, use_bin_type=True)
        got.append(rig.send(Kind.PUSH, (), [g.tobytes()], raw_header=raw))
        assert rig.server.state.slots[("w", 0)].value.tolist() == [0.0] * 4
    assert got[0] == got[1]
    assert got[0][0].error == ErrorCode.MALFORMED
    assert rigs[0].whole == 0
