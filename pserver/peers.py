"""Raft messages between the replicas of one shard, on the pserver wire.

Owns the encoding of a ``raft.Message`` as a pserver message of kind RAFT (the
scalar fields in the header's opts, entry data as raw frames of at most
``ENTRY_FRAME_BYTES`` and snapshot chunks as frames of ``frame_bytes``, never
through msgpack; an entry received in one frame is kept as a view of it) and the peer
connections: one DEALER per other replica, connected to that replica's ROUTER,
sending without ever blocking (a message to a peer whose queue is full is
dropped; Raft resends what matters).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pserver.protocol.errors import ProtocolError
from pserver.protocol.frames import split_frames
from pserver.protocol.schema import Header, Kind
from pserver.protocol.transport import Endpoint

from .raft.types import Entry, EntryData, Message, MsgType, Payload, Snapshot

log = logging.getLogger(__name__)

PEER_HWM_MESSAGES = 256
# An entry's data travels as frames of at most this size: one frame for any entry a
# replica proposes in practice (a sync step of a 64 MiB model over 4 shards is 16 MiB),
# which the follower keeps as it arrived instead of joining 1 MiB pieces (a copy of
# every entry). Below the replicas' 64 MiB frame cap (``Limits.max_frame_bytes``).
ENTRY_FRAME_BYTES = 32 << 20


def _chunks(data: bytes | memoryview, frame_bytes: int) -> list[Any]:
    if not data:
        return []
    import numpy as np

    return split_frames(np.frombuffer(data, dtype=np.uint8), frame_bytes)


def encode(m: Message, frame_bytes: int = 1 << 20,
           token: str = "") -> tuple[Header, list[Any]]:
    """The header and frames that carry ``m``, signed with the cluster's ``token``
    (``tok``) when there is one."""
    frames: list[Any] = []
    entries = []
    for e in m.entries:
        # A Payload goes as its parts (the clients' frames: under the frame cap, which
        # the shard checked when they arrived), so the follower keeps the same parts.
        parts = list(e.data.parts) if isinstance(e.data, Payload) else _chunks(
            e.data, max(frame_bytes, ENTRY_FRAME_BYTES))
        entries.append([e.term, e.index, len(parts)])
        frames.extend(parts)
    opts: dict[str, Any] = {
        "t": int(m.type), "f": m.frm, "to": m.to, "term": m.term, "lt": m.log_term,
        "i": m.index, "c": m.commit, "rj": m.reject, "rh": m.reject_hint,
    }
    if entries:
        opts["e"] = entries
    if m.context:
        opts["ctx"] = m.context
    if token:
        opts["tok"] = token
    if m.stamp:
        opts["hs"] = m.stamp
    if m.type in (MsgType.SNAP, MsgType.SNAP_RESP):
        opts.update(so=m.snap_offset, st=m.snap_total, sc=m.snap_crc)
    if m.snapshot is not None:
        parts = _chunks(m.snapshot.data, frame_bytes)
        opts["s"] = [m.snapshot.index, m.snapshot.term, len(parts)]
        frames.extend(parts)
    return Header(Kind.RAFT, 0, opts=opts), frames


def _int(opts: Mapping[str, Any], name: str) -> int:
    return _checked(opts.get(name, 0), name)


def _checked(v: Any, name: str) -> int:
    if type(v) is not int or v < -1:
        raise ProtocolError(f"raft field {name!r} must be an integer, not {v!r}")
    return v


def signed(header: Header, token: str) -> bool:
    """Whether a RAFT header carries the cluster's ``token``."""
    tok = header.opts.get("tok")
    return isinstance(tok, str) and hmac.compare_digest(tok, token)


def decode(header: Header, frames: Sequence[memoryview]) -> Message:
    """The Raft message in a RAFT header and its frames (raises ProtocolError)."""
    o = header.opts
    try:
        kind = MsgType(_int(o, "t"))
    except ValueError as exc:
        raise ProtocolError(f"unknown raft message type {o.get('t')!r}") from exc
    pos = 0

    def take(n: Any) -> Sequence[memoryview]:
        """The next ``n`` frames, as views of the received message (no copy)."""
        nonlocal pos
        if type(n) is not int or n < 0 or pos + n > len(frames):
            raise ProtocolError("raft message frames do not match its header")
        pos += n
        return frames[pos - n:pos]

    entries = []
    for item in o.get("e", ()):
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError("malformed raft entry descriptor")
        got = take(item[2])  # one frame: a read-only view; more: a Payload of them
        data: EntryData = (b"" if not got else memoryview(got[0]).toreadonly()
                           if len(got) == 1 else Payload(got))
        entries.append(Entry(_checked(item[0], "entry term"), _checked(item[1], "entry index"),
                             data))
    snapshot = None
    if "s" in o:
        s = o["s"]
        if not isinstance(s, list) or len(s) != 3:
            raise ProtocolError("malformed raft snapshot descriptor")
        chunk = take(s[2])  # one frame: a read-only view of it; more: joined
        snapshot = Snapshot(_checked(s[0], "snapshot index"), _checked(s[1], "snapshot term"),
                            memoryview(chunk[0]).toreadonly()
                            if len(chunk) == 1 else b"".join(chunk))
    if pos != len(frames):
        raise ProtocolError("raft message carries frames its header does not describe")
    ctx = o.get("ctx", b"")
    if not isinstance(ctx, bytes):
        raise ProtocolError("raft context must be bytes")
    return Message(kind, _int(o, "f"), _int(o, "to"), _int(o, "term"), _int(o, "lt"),
                   _int(o, "i"), tuple(entries), _int(o, "c"), bool(o.get("rj", False)),
                   _int(o, "rh"), snapshot, _int(o, "so"), _int(o, "st"), _int(o, "sc"), ctx,
                   _int(o, "hs"))


class Peers:
    """One non-blocking DEALER per other replica of the shard."""

    def __init__(self, ctx: Any, addresses: Mapping[int, str], frame_bytes: int,
                 token: str = "") -> None:
        self.frame_bytes = frame_bytes
        self.token = token
        self._eps = {i: Endpoint.dealer_connected(ctx, a, hwm=PEER_HWM_MESSAGES)
                     for i, a in addresses.items()}
        self.dropped = 0

    def send(self, m: Message) -> None:
        ep = self._eps.get(m.to)
        if ep is None:
            log.error("raft message to unknown replica %d dropped", m.to)
            return
        header, frames = encode(m, self.frame_bytes, self.token)
        if not ep.send(header, frames):
            self.dropped += 1

    def close(self) -> None:
        for ep in self._eps.values():
            ep.close()
