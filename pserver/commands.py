"""Log entry payloads: the commands a shard leader replicates, in one entry each batch.

Owns the byte layout of a Raft entry's ``data`` on a replicated shard: a u32
length, a msgpack list describing the commands, then the raw bytes of every
command's frames one after the other (tensors never go through msgpack). A
command is a client mutation exactly as the client sent it (its header bytes
and data frames) with the proposer's token, so only the replica that received
the request answers it; a sync step the leader aggregated (the mean gradient of
each part and the headers of the pushes it answers, whose own data is not
logged); a change of the step quorum (a worker dropped after its heartbeats
stopped, or back again); or a state digest mark and its check. An encoded batch
is a ``raft.Payload``: the length and
description in one buffer, then the commands' frames themselves, never copied
into one buffer. Decoding returns views of the frames (of the payload's parts, or
of one contiguous buffer read back from the log), without copying the tensors.
No sockets, threads or clocks.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .raft import EntryData, Payload

_LEN = struct.Struct("<I")
REQUEST, DROP_WORKER, REJOIN_WORKER, SYNC_STEP = "req", "drop", "rejoin", "step"
# State digests exchanged through the log: every replica hashes its state where it
# applies DIGEST; the leader then logs its own hash in DIGEST_CHECK for all to compare.
DIGEST, DIGEST_CHECK = "digest", "check"


class CommandError(Exception):
    """An entry's payload is not a command batch (a bug or a corrupt log)."""


@dataclass(frozen=True)
class Command:
    """One replicated command. ``token`` (term, n) is unique to the proposing leader
    of that term; ``header`` and ``frames`` are the client's message for REQUEST."""

    op: str
    token: tuple[int, int] = (0, 0)
    header: bytes | memoryview = b""
    frames: Sequence[memoryview | bytes] = ()
    worker: int = -1
    # SYNC_STEP: per part (key, part, step, workers, number of its frames in ``frames``:
    # the mean gradient) and the pushes it answers (token, header bytes; their data
    # is the mean)
    steps: Sequence[tuple[str, int, int, tuple[int, ...], int]] = ()
    members: Sequence[tuple[tuple[int, int], bytes]] = ()
    digest: str = ""  # DIGEST_CHECK: the leader's state digest at DIGEST ``token``


def encode(commands: Sequence[Command]) -> Payload:
    """One entry's data for ``commands``: the frames are kept as they are (the entry
    holds them alive; nobody may change them afterwards)."""
    desc: list[Any] = []
    blobs: list[Any] = []
    for c in commands:
        if c.op == REQUEST:
            desc.append([c.op, list(c.token), bytes(c.header), [memoryview(f).nbytes
                                                                for f in c.frames]])
            blobs.extend(c.frames)
        elif c.op == SYNC_STEP:
            desc.append([c.op, [[k, p, s, list(w), n] for k, p, s, w, n in c.steps],
                         [[list(t), bytes(h)] for t, h in c.members],
                         [memoryview(f).nbytes for f in c.frames]])
            blobs.extend(c.frames)
        elif c.op == DIGEST:
            desc.append([c.op, list(c.token)])
        elif c.op == DIGEST_CHECK:
            desc.append([c.op, list(c.token), c.digest])
        else:
            desc.append([c.op, c.worker])
    head = msgpack.packb(desc, use_bin_type=True)
    return Payload([_LEN.pack(len(head)) + head, *blobs])


def _frames_as_parts(payload: Payload) -> list[memoryview] | None:
    """The parts after the description, when each is exactly one command frame (as
    ``encode`` made them and a follower receives them); None otherwise."""
    parts = payload.parts
    if not parts or len(parts[0]) < _LEN.size:
        return None
    (n,) = _LEN.unpack_from(parts[0])
    return list(parts[1:]) if len(parts[0]) == _LEN.size + n else None


def decode(data: EntryData) -> list[Command]:
    """The commands of one entry; frames are views into ``data`` (no copy)."""
    parts = _frames_as_parts(data) if isinstance(data, Payload) else None
    if isinstance(data, Payload) and parts is None:
        data = bytes(data)  # parts cut elsewhere than at frames: one buffer
    view = memoryview(data.parts[0] if isinstance(data, Payload) else data)
    try:
        (n,) = _LEN.unpack_from(view)
        desc = msgpack.unpackb(view[_LEN.size:_LEN.size + n], raw=False)
    except (struct.error, ValueError, msgpack.UnpackException) as exc:
        raise CommandError(f"unreadable command batch: {exc}") from exc
    pos = _LEN.size + n
    taken = 0
    out: list[Command] = []

    def take(sizes: list[int]) -> list[memoryview]:
        nonlocal pos, taken
        frames = []
        for size in sizes:
            if parts is not None:
                if taken >= len(parts) or len(parts[taken]) != size:
                    raise CommandError("a command batch's parts do not match its frames")
                frames.append(parts[taken])
                taken += 1
                continue
            frames.append(view[pos:pos + size])
            pos += size
        return frames

    try:
        for item in desc:
            if item[0] == REQUEST:
                _, token, header, sizes = item
                out.append(Command(REQUEST, (int(token[0]), int(token[1])), header, take(sizes)))
            elif item[0] == SYNC_STEP:
                _, steps, members, sizes = item
                frames = take(sizes)
                out.append(Command(
                    SYNC_STEP, frames=frames,
                    steps=[(str(k), int(p), int(s), tuple(int(x) for x in w), int(n))
                           for k, p, s, w, n in steps],
                    members=[((int(t[0]), int(t[1])), bytes(h)) for t, h in members]))
            elif item[0] in (DROP_WORKER, REJOIN_WORKER):
                out.append(Command(item[0], worker=int(item[1])))
            elif item[0] == DIGEST:
                out.append(Command(DIGEST, (int(item[1][0]), int(item[1][1]))))
            elif item[0] == DIGEST_CHECK:
                if not isinstance(item[2], str):
                    raise CommandError(f"a digest check carries {item[2]!r}")
                out.append(Command(DIGEST_CHECK, (int(item[1][0]), int(item[1][1])),
                                   digest=item[2]))
            else:
                raise CommandError(f"unknown command {item[0]!r}")
    except (TypeError, ValueError, IndexError, KeyError) as exc:  # not a list of commands
        raise CommandError(f"malformed command batch: {exc!r}") from exc
    if parts is not None and taken != len(parts):
        raise CommandError("a command batch carries frames its commands do not describe")
    if parts is None and pos != len(view):
        raise CommandError(f"command batch holds {len(view)} bytes, its commands {pos}")
    return out
