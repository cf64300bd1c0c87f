"""Leader-side aggregation of sync steps: replicate one entry per step, not per push.

Owns, on the leader of a replicated shard, the pushes to sync parts that wait
for the other workers of their step: each gradient (views of its message's frames),
the step it counts for, and the token of the message. Once every live worker
has pushed a step of a part, and every other part those messages touch is
complete for its step too (a push is answered whole or not at all), it builds
one SYNC_STEP command: the mean gradient of each part (summed in worker order,
the arithmetic of ``ShardStateMachine._complete_steps``, so the result is the
same bits as without replication) and the headers of the pushes it answers.

Pushes take this path only when every part they name is a sync part with
nothing buffered in the replicated state and no per-push entry of a sync part in
flight; otherwise they are logged one by one and the state machine buffers them
(``route``). Nothing here is replicated: a new leader starts empty and clients
send their unanswered pushes again. No sockets, threads or clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pserver.protocol.frames import split_frames
from pserver.protocol.schema import Header, Kind

from . import commands
from .commands import Command
from .shard import Pieces, ShardStateMachine, mean_into, pieces

Part = tuple[str, int]
Token = tuple[int, int]
AGGREGATE, LOG, HOLD = "aggregate", "log", "hold"


@dataclass
class _Push:
    header: bytes
    parts: list[tuple[Part, int]]  # (part, step) it counts for


class StepAggregator:
    """Sync pushes waiting on the leader for the rest of their step."""

    def __init__(self, state: ShardStateMachine, frame_bytes: int) -> None:
        self.state = state
        self.frame_bytes = frame_bytes
        self._grads: dict[Part, dict[int, dict[int, tuple[Pieces, Token]]]] = {}
        self._pushes: dict[Token, _Push] = {}
        self._next: dict[tuple[Part, int], int] = {}  # (part, worker) -> its next step
        self._proposed: dict[Part, int] = {}  # part -> the next step to propose
        self._logged: dict[Part, int] = {}  # part -> per-push entries in flight

    def route(self, header: Header) -> str:
        """AGGREGATE, LOG (one entry for this push) or HOLD (ask again after the
        next Ready: a worker's step that already passed, while its rejoin is
        being logged)."""
        if header.kind not in (Kind.PUSH, Kind.PUSH_PULL) or not header.tensors \
                or header.opts.get("encoding") == "topk":
            return LOG
        slots = [self.state.slots.get((t.key, t.part)) for t in header.tensors]
        if any(s is None or s.mode != "sync" for s in slots):
            return LOG
        if any(s.pending or self._logged.get((s.key, s.part)) for s in slots if s is not None):
            return LOG
        worker = header.opts.get("worker", 0)
        for s in slots:
            assert s is not None
            part = (s.key, s.part)
            if self._step_of(part, worker) < self._proposed.get(part, s.sync_step):
                return HOLD
        return AGGREGATE

    def _step_of(self, part: Part, worker: int) -> int:
        slot = self.state.slots[part]
        return self._next.get((part, worker), slot.worker_steps.get(worker, 0))

    def add(self, header: Header, data: Sequence[Sequence[Any]], token: Token,
            raw_header: bytes) -> None:
        """Buffer a push that ``route`` sent here (checked already)."""
        worker = header.opts.get("worker", 0)
        parts = []
        for t, frames in zip(header.tensors, data, strict=True):
            part = (t.key, t.part)
            slot = self.state.slots[part]
            grad = pieces(frames, t.np_dtype, slot, widen=False)
            step = self._step_of(part, worker)
            self._next[(part, worker)] = step + 1
            self._proposed.setdefault(part, slot.sync_step)
            self._grads.setdefault(part, {}).setdefault(step, {})[worker] = (grad, token)
            parts.append((part, step))
        self._pushes[token] = _Push(raw_header, parts)

    def logged(self, header: Header, delta: int) -> None:
        """A push of sync parts went into the log one by one (+1), or was applied (-1)."""
        for t in header.tensors:
            part = (t.key, t.part)
            if part in self.state.slots and self.state.slots[part].mode == "sync":
                n = self._logged.get(part, 0) + delta
                if n > 0:
                    self._logged[part] = n
                else:
                    self._logged.pop(part, None)

    def ready(self) -> list[Command]:
        """SYNC_STEP commands for every step that became complete."""
        out = []
        progress = True
        while progress:
            progress = False
            for part in sorted(self._grads):
                step = self._proposed.get(part)
                if step is None or step not in self._grads.get(part, {}):
                    continue
                closure = self._closure(part, step)
                if closure is not None:
                    out.append(self._command(*closure))
                    progress = True
        return out

    def _closure(self, part: Part, step: int) -> tuple[dict[Part, int], set[Token]] | None:
        """The parts (with their steps) and pushes that must be applied together with
        ``part``'s ``step``, if all of them are complete; else None."""
        steps: dict[Part, int] = {}
        tokens: set[Token] = set()
        todo = [(part, step)]
        while todo:
            p, s = todo.pop()
            if p in steps:
                if steps[p] != s:
                    return None  # a push spans two steps of one part: wait for the first
                continue
            slot = self.state.slots.get(p)
            if slot is None or self._proposed.get(p) != s:
                return None
            have = self._grads.get(p, {}).get(s, {})
            live = set(range(slot.workers)) - self.state.dropped
            if not live or not live <= have.keys():
                return None
            steps[p] = s
            for _, token in have.values():
                if token not in tokens:
                    tokens.add(token)
                    todo.extend(self._pushes[token].parts)
        return steps, tokens

    def _command(self, steps: dict[Part, int], tokens: set[Token]) -> Command:
        parts, frames = [], []
        for (key, p), s in sorted(steps.items()):
            slot = self.state.slots[(key, p)]
            buffered = self._grads[(key, p)].pop(s)
            if not self._grads[(key, p)]:
                del self._grads[(key, p)]
            grads = {w: g for w, (g, _) in buffered.items()}
            mean = np.empty(slot.count, slot.value.dtype)
            mean_into(grads, mean)
            fs = split_frames(mean, self.frame_bytes)
            parts.append((key, p, s, tuple(sorted(grads)), len(fs)))
            frames.extend(fs)
            self._proposed[(key, p)] = s + 1
        members = [(t, self._pushes.pop(t).header) for t in sorted(tokens)]
        return Command(commands.SYNC_STEP, frames=frames, steps=parts, members=members)

    def forget_worker(self, worker: int) -> None:
        """A worker rejoined: its next steps come from the replicated state again."""
        for key in [k for k in self._next if k[1] == worker]:
            del self._next[key]

    def reset(self) -> list[Token]:
        """Drop everything (leadership lost, or a step that did not apply); returns
        the tokens of the pushes that were waiting."""
        tokens = list(self._pushes)
        self._grads.clear()
        self._pushes.clear()
        self._next.clear()
        self._proposed.clear()
        self._logged.clear()
        return tokens
