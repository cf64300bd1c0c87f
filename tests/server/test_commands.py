"""pserver.commands and pserver.peers: what replicas put in log entries and send
each other, round-tripped and rejected when malformed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pserver import commands, peers
from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.errors import ProtocolError
from pserver.protocol.schema import Kind, Limits
from pserver.raft.types import Entry, Message, MsgType, Payload, Snapshot

frames = st.lists(st.binary(max_size=300), max_size=4)


@given(st.lists(st.one_of(
    st.tuples(st.just(commands.REQUEST), st.integers(0, 2**40), st.binary(max_size=64), frames),
    st.tuples(st.sampled_from([commands.DROP_WORKER, commands.REJOIN_WORKER]),
              st.integers(0, 1000)),
), max_size=6))
def test_a_command_batch_round_trips(items: list[tuple]) -> None:  # type: ignore[type-arg]
    cmds: list[commands.Command] = []
    for item in items:
        if item[0] == commands.REQUEST:
            cmds.append(commands.Command(commands.REQUEST, (3, item[1]), item[2], item[3]))
        else:
            cmds.append(commands.Command(item[0], worker=item[1]))
    back = commands.decode(commands.encode(cmds))
    assert len(back) == len(cmds)
    for a, b in zip(cmds, back, strict=True):
        assert (a.op, a.worker) == (b.op, b.worker)
        if a.op == commands.REQUEST:
            assert a.token == b.token and bytes(a.header) == bytes(b.header)
            assert [bytes(f) for f in a.frames] == [bytes(f) for f in b.frames]


def test_digest_marks_and_checks_round_trip() -> None:
    cmds = [commands.Command(commands.DIGEST, (4, 17)),
            commands.Command(commands.DIGEST_CHECK, (4, 17), digest="0123abcd")]
    back = commands.decode(commands.encode(cmds))
    assert [(c.op, c.token, c.digest) for c in back] == [
        (commands.DIGEST, (4, 17), ""), (commands.DIGEST_CHECK, (4, 17), "0123abcd")]
    bad = commands.encode([commands.Command(commands.DIGEST_CHECK, (4, 17),
                                            digest=5)])  # type: ignore[arg-type]
    with pytest.raises(commands.CommandError):  # a check must carry a digest string
        commands.decode(bad)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x05\x00\x00\x00abc",
                                  bytes(commands.encode([])) + b"extra"])
def test_a_malformed_batch_raises_command_error(data: bytes) -> None:
    with pytest.raises(commands.CommandError):
        commands.decode(data)


def _batch() -> tuple[list[commands.Command], list[bytearray]]:
    grads = [bytearray(b"\x01" * 4096), bytearray(b"\x02" * 1000)]
    return [commands.Command(commands.REQUEST, (1, 1), b"head-1", [memoryview(grads[0])]),
            commands.Command(commands.DROP_WORKER, worker=3),
            commands.Command(commands.REQUEST, (1, 2), b"head-2", [memoryview(grads[1]), b""])
            ], grads


def test_an_entry_keeps_the_clients_frames_without_copying_them() -> None:
    """The leader's entry is the batch's description plus the frames themselves:
    decoding hands back views of the same memory, and nobody can write through them."""
    cmds, grads = _batch()
    data = commands.encode(cmds)
    assert isinstance(data, Payload) and len(data.parts) == 4
    back = commands.decode(data)
    frame = back[0].frames[0]
    assert frame.readonly and bytes(frame) == bytes(grads[0])
    grads[0][0] = 9  # the same memory, not a copy (the shard never does this)
    assert frame[0] == 9
    assert [bytes(f) for f in back[2].frames] == [bytes(grads[1]), b""]
    with pytest.raises(TypeError):
        frame[0] = 1


def test_an_entry_decodes_the_same_from_its_parts_from_one_buffer_and_from_other_cuts() -> None:
    """From the parts (leader, follower), from the WAL's one contiguous record, and
    from parts cut elsewhere than at frames: the same commands."""
    cmds, _ = _batch()
    data = commands.encode(cmds)
    whole = bytes(data)
    cut = Payload([whole[:7], whole[7:5000], whole[5000:]])
    for form in (data, whole, memoryview(whole), cut):
        back = commands.decode(form)
        assert [(c.op, c.token, bytes(c.header), [bytes(f) for f in c.frames], c.worker)
                for c in back] == [(c.op, c.token, bytes(c.header),
                                    [bytes(f) for f in c.frames], c.worker) for c in cmds]
    assert data == whole and cut == data and hash(cut) == hash(data)
    wrong = Payload([data.parts[0], data.parts[2], data.parts[1], data.parts[3]])
    with pytest.raises(commands.CommandError):
        commands.decode(wrong)  # the parts do not have the sizes the description gives
    with pytest.raises(commands.CommandError):
        commands.decode(Payload([*data.parts, b"stray"]))


def test_a_payload_entry_reaches_a_follower_as_the_same_parts() -> None:
    """Sent to a follower, an entry goes as its parts (no joining on either side) and
    decodes there into views of the frames that arrived."""
    cmds, _ = _batch()
    m = Message(MsgType.APP, 1, 2, 3, log_term=2, index=4,
                entries=(Entry(3, 5, commands.encode(cmds)),), commit=4)
    _header, fs = peers.encode(m)
    assert len(fs) == 4
    back = _wire(m)
    assert back == m
    data = back.entries[0].data
    assert isinstance(data, Payload) and [len(p) for p in data.parts] == [len(f) for f in fs]
    assert [c.op for c in commands.decode(data)] == [c.op for c in cmds]


def _wire(m: Message, frame_bytes: int = 1 << 20) -> Message:
    header, fs = peers.encode(m, frame_bytes)
    back = decode_header(memoryview(encode_header(header)), Limits())
    assert back.kind == Kind.RAFT
    return peers.decode(back, [memoryview(bytes(f)) for f in fs])


def test_raft_messages_round_trip_with_entries_whole_or_cut_into_frames(
        monkeypatch: pytest.MonkeyPatch) -> None:
    entries = (Entry(2, 5, b""), Entry(2, 6, bytes(range(256)) * 40), Entry(3, 7, b"x"))
    m = Message(MsgType.APP, 1, 2, 3, log_term=2, index=4, entries=entries, commit=4)
    _header, fs = peers.encode(m, frame_bytes=4096)
    assert len(fs) == 2  # each entry whole, below ENTRY_FRAME_BYTES: kept as received
    back = _wire(m, 4096)
    assert back == m
    data = back.entries[1].data
    assert isinstance(data, memoryview) and data.readonly  # crc32c needs read-only
    monkeypatch.setattr(peers, "ENTRY_FRAME_BYTES", 4096)  # a larger entry is cut
    _header, fs = peers.encode(m, frame_bytes=4096)
    assert all(memoryview(f).nbytes <= 4096 for f in fs) and len(fs) == 4
    assert _wire(m, 4096) == m
    snap = Message(MsgType.SNAP, 1, 3, 3, snapshot=Snapshot(9, 2, b"chunk" * 1000),
                   snap_offset=5000, snap_total=20000, snap_crc=2**32 - 1)
    assert _wire(snap, 1024) == snap
    read = Message(MsgType.HEARTBEAT_RESP, 2, 1, 3, context=b"\x00ctx", reject_hint=-1)
    assert _wire(read) == read
    beat = Message(MsgType.HEARTBEAT, 1, 2, 3, commit=7, stamp=2**40)
    assert _wire(beat) == beat


def test_a_raft_message_whose_frames_do_not_match_is_refused() -> None:
    m = Message(MsgType.APP, 1, 2, 3, entries=(Entry(3, 1, b"abc"),))
    header, _fs = peers.encode(m)
    with pytest.raises(ProtocolError):
        peers.decode(header, [])
    with pytest.raises(ProtocolError):
        peers.decode(header, [memoryview(b"abc"), memoryview(b"more")])
    bad = header.__class__(Kind.RAFT, 0, opts={**header.opts, "t": 99})
    with pytest.raises(ProtocolError):
        peers.decode(bad, [memoryview(b"abc")])


@pytest.mark.parametrize(("where", "value"), [("e", ["3", 1, 1]), ("e", [3, 1.0, 1]),
                                         ("e", [True, 1, 1]), ("s", [9, "2", 1]),
                                         ("s", [-5, 2, 1])])
def test_a_raft_entry_or_snapshot_with_a_non_integer_term_or_index_is_refused(
        where: str, value: list[Any]) -> None:
    """A ProtocolError (the replica logs one line and drops it), not a ValueError that
    would surface as an internal error with a traceback, nor 1.0 or True read as 1."""
    m = Message(MsgType.APP, 1, 2, 3, entries=(Entry(3, 1, b"abc"),))
    header, _fs = peers.encode(m)
    opts = {k: v for k, v in header.opts.items() if k not in ("e", "s")}
    bad = header.__class__(Kind.RAFT, 0, opts={**opts, where: [value] if where == "e"
                                               else value})
    with pytest.raises(ProtocolError, match="must be an integer"):
        peers.decode(bad, [memoryview(b"abc")])
