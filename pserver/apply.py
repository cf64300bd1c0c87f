"""Applying one mutation to a shard state machine: the code every replica runs.

Owns the check-then-apply of each mutating kind (INIT, PUSH, PUSH_PULL,
CREATE_TABLE, PUSH_ROWS) on a ``ShardStateMachine``, and of a replicated
command from a log entry (``apply_command``: the session table first, so a
retried mutation is answered from it, then ``mutate``; worker drops and
rejoins). Deterministic: the same commands in the same order give the same
state and the same outcomes on every replica. No sockets, threads or clocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pserver.protocol.codec import decode_header
from pserver.protocol.errors import (
    InternalError,
    InvalidArgument,
    NotLeader,
    PServerError,
    ShapeMismatch,
)
from pserver.protocol.frames import join_frames, row_blocks
from pserver.protocol.schema import MAX_WORKERS, Header, Kind, Limits

from . import commands
from .commands import Command
from .shard import ShardStateMachine, parse_compression

log = logging.getLogger(__name__)


def split_by_tensor(header: Header, frames: Any) -> list[list[Any]]:
    """The data frames of a message, one list per tensor descriptor."""
    out, i = [], 0
    for t in header.tensors:
        out.append(list(frames[i : i + t.nframes]))
        i += t.nframes
    return out


def mutate(state: ShardStateMachine, header: Header, data: list[list[memoryview]], *,
           apply: bool = True, workers: int = 1, staleness: int = 0) -> dict[str, Any]:
    """Check one mutation against ``state`` and, with ``apply``, apply it; returns the
    reply's opts. Raises the check's error with the state unchanged. ``workers`` and
    ``staleness`` are the defaults for an INIT that names none."""
    kind = header.kind
    if kind == Kind.INIT:
        spec, mode = state.check_init(header.tensors, header.opts)
        compression = parse_compression(header.opts.get("compression"))
        if compression[0] != "none" and any(
                t.dtype not in ("float32", "float64") for t in header.tensors):
            raise InvalidArgument("compression applies to float32 and float64 keys only")
        if compression[0] == "topk" and mode == "sync":
            raise InvalidArgument("top-k compression does not combine with sync mode")
        workers = header.opts.get("workers", workers)
        staleness = header.opts.get("staleness", staleness)
        if type(workers) is not int or not 1 <= workers <= MAX_WORKERS \
                or type(staleness) is not int or staleness < 0:
            raise InvalidArgument(f"workers must be in [1, {MAX_WORKERS}] and staleness >= 0 "
                                  "(integers)")
        if not apply:
            return {}
        created = state.apply_init(header.tensors, data, spec, mode, compression, workers,
                                   staleness)
        return {"created": created}
    if kind in (Kind.PUSH, Kind.PUSH_PULL):
        state.check_push(header.tensors, header.opts)
        if apply:
            state.apply_push(header.tensors, data, header.opts)
        return {}
    if kind == Kind.CREATE_TABLE:
        table_spec = state.check_create_table(header.opts)
        return {"created": state.apply_create_table(table_spec)} if apply else {}
    if kind == Kind.PUSH_ROWS:
        name, ids, blocks = rows_request(header, data, with_grads=True)
        table = state.check_rows(name, ids)
        table.check_push(ids, blocks)
        if apply:
            state.apply_push_rows(table, ids, blocks)
        return {}
    raise InvalidArgument(f"{kind.name} is not a mutation")


@dataclass
class Outcome:
    """What applying one client mutation of a command gave: its header and the
    proposer's token, and either the reply opts of a first application (``opts``),
    the stored reply of a duplicate (``cached``), or the error it was refused with
    (``error``)."""

    header: Header
    token: tuple[int, int] = (0, 0)
    opts: dict[str, Any] | None = None
    cached: dict[str, Any] | None = None
    error: PServerError | None = None


def apply_command(state: ShardStateMachine, cmd: Command, limits: Limits, *,
                  workers: int = 1, staleness: int = 0, shard: int = 0) -> list[Outcome]:
    """Apply one command of a committed log entry: one outcome per client mutation
    it carries (none for a worker drop/rejoin). A first application is recorded in
    the session table here."""
    if cmd.op == commands.DROP_WORKER:
        if cmd.worker not in state.dropped:
            log.warning("shard %d: worker %d dropped from the step quorum", shard, cmd.worker)
            state.drop_worker(cmd.worker)
        return []
    if cmd.op == commands.REJOIN_WORKER:
        if cmd.worker in state.dropped:
            log.warning("shard %d: worker %d is back; it resumes at the current step", shard,
                        cmd.worker)
            state.rejoin_worker(cmd.worker)
        return []
    if cmd.op == commands.SYNC_STEP:
        return _apply_sync_step(state, cmd, limits, shard)
    if cmd.op == commands.DIGEST:
        state.mark_digest(cmd.token)
        return []
    if cmd.op == commands.DIGEST_CHECK:
        if state.check_digest(cmd.token, cmd.digest) is False:
            log.critical("shard %d: this replica's state differs from its leader's at the "
                         "same log position (digest %s against %s): replicas must apply "
                         "identically; restore this one from a peer", shard,
                         state.last_mismatch[0], cmd.digest)
        return []
    header = decode_header(cmd.header, limits)
    try:
        cached = state.sessions.duplicate(header.client_id, header.seq)
        if cached is not None:
            return [Outcome(header, cmd.token, cached=cached)]
        opts = mutate(state, header, split_by_tensor(header, cmd.frames), workers=workers,
                      staleness=staleness)
    except PServerError as exc:
        return [Outcome(header, cmd.token, error=exc)]
    except Exception as exc:  # a bug: say so loudly; the replicas' digests show any damage
        log.exception("shard %d: applying %s seq %d failed", shard, header.kind.name,
                      header.seq)
        return [Outcome(header, cmd.token, error=InternalError(f"{type(exc).__name__}: {exc}"))]
    state.sessions.record(header.client_id, header.seq, opts)
    return [Outcome(header, cmd.token, opts=opts)]


def _apply_sync_step(state: ShardStateMachine, cmd: Command, limits: Limits,
                     shard: int) -> list[Outcome]:
    """A sync step the leader aggregated: all of it applies, or none of it (then every
    push it answers is refused with NotLeader, so its client sends it again)."""
    headers = [(token, decode_header(h, limits)) for token, h in cmd.members]
    try:
        for _, h in headers:
            if state.sessions.duplicate(h.client_id, h.seq) is not None:
                raise InvalidArgument(f"push seq {h.seq} of an aggregated step was applied "
                                      "before")
        steps, pos = [], 0
        for key, part, step, workers, n in cmd.steps:
            slot = state.check_sync_step(key, part, step, workers)
            steps.append((slot, workers, cmd.frames[pos:pos + n]))
            pos += n
    except PServerError as exc:
        log.warning("shard %d: an aggregated sync step does not apply (%s); its pushes are "
                    "sent back", shard, exc)
        retry = NotLeader(f"the aggregated step did not apply ({exc.message}); send it again",
                          shard=shard)
        return [Outcome(h, token, error=retry) for token, h in headers]
    state.apply_sync_step(steps)
    for _, h in headers:
        state.sessions.record(h.client_id, h.seq, {})
    return [Outcome(h, token, opts={}) for token, h in headers]


def rows_request(header: Header, data: list[list[memoryview]], with_grads: bool) -> tuple[
        Any, np.ndarray[Any, Any], list[np.ndarray[Any, Any]]]:
    """(table name, ids, gradient blocks) of a PULL_ROWS or PUSH_ROWS message: the
    first tensor holds the uint64 ids, the second (push) the (n, dim) gradients,
    returned as blocks of consecutive rows: one read-only view per frame where
    every frame holds whole rows (as clients send them), else one joined copy.
    A pull has no blocks."""
    want = 2 if with_grads else 1
    if len(header.tensors) != want:
        raise InvalidArgument(f"{header.kind.name} carries {want} tensor(s), "
                              f"not {len(header.tensors)}")
    ids_meta = header.tensors[0]
    if ids_meta.dtype != "uint64" or len(ids_meta.shape) != 1 or ids_meta.offset != 0 \
            or ids_meta.count != ids_meta.shape[0] or not ids_meta.nframes:
        raise InvalidArgument("row ids must be one whole 1-D uint64 tensor with its data")
    ids = join_frames(data[0], ids_meta.np_dtype)
    if not with_grads:
        return header.opts.get("table"), ids, []
    g = header.tensors[1]
    if len(g.shape) != 2 or g.offset != 0 or g.count != g.shape[0] * g.shape[1] \
            or g.shape[0] != ids.shape[0] or not g.nframes:
        raise ShapeMismatch(f"row gradients {g.dtype}{list(g.shape)} do not match "
                            f"{ids.shape[0]} ids", key=str(header.opts.get("table")))
    return header.opts.get("table"), ids, row_blocks(data[1], g.np_dtype, g.shape[1],
                                                     g.shape[0])
