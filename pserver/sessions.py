"""Client sessions: exactly-once application of mutations.

Owns, per client id, the replies to the most recently applied mutations (by
sequence number) and the highest sequence number whose reply was evicted, so
that a mutation sent again (a retry after a lost reply or a failover) is
answered from the table instead of being applied twice. Mutations may arrive
out of order (a client redirected between replicas resends several at once):
a number not in the table and above the evicted floor was never applied; one
at or below the floor may have been, and is refused rather than risked. Part
of the replicated state: eviction depends only on the order of applied
mutations (least recently active client first), never on a clock, so every
replica keeps the same table. No sockets, threads or clocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pserver.protocol.errors import InvalidArgument

MAX_SESSIONS = 10_000
REPLIES_KEPT = 64


@dataclass
class Session:
    floor: int = 0  # the highest sequence number whose reply was evicted
    replies: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)


class Sessions:
    """The session table of one shard."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, replies_kept: int = REPLIES_KEPT) -> None:
        self.max_sessions = max_sessions
        self.replies_kept = replies_kept
        self._table: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def duplicate(self, client_id: bytes, seq: int) -> dict[str, Any] | None:
        """The stored reply when (client_id, seq) was applied already, else None.
        Requests without a client id or sequence number are never deduplicated."""
        if not client_id or not seq:
            return None
        s = self._table.get(client_id)
        if s is None:
            return None
        reply = s.replies.get(seq)
        if reply is None and seq <= s.floor:
            raise InvalidArgument(
                f"mutation {seq} of this client is older than the {self.replies_kept} "
                "replies kept; it may have been applied and is not applied again")
        return reply

    def record(self, client_id: bytes, seq: int, reply: dict[str, Any]) -> None:
        """Remember that (client_id, seq) was applied with ``reply``."""
        if not client_id or not seq:
            return
        s = self._table.pop(client_id, None) or Session()
        self._table[client_id] = s  # most recently active last
        s.replies[seq] = reply
        while len(s.replies) > self.replies_kept:
            old, _ = s.replies.popitem(last=False)
            s.floor = max(s.floor, old)
        while len(self._table) > self.max_sessions:
            self._table.popitem(last=False)

    def to_wire(self) -> list[Any]:
        """The table as msgpack-able lists, in activity order (for snapshots)."""
        return [[cid, s.floor, [[seq, reply] for seq, reply in s.replies.items()]]
                for cid, s in self._table.items()]

    def load_wire(self, raw: list[Any]) -> None:
        self._table = OrderedDict(
            (bytes(cid), Session(int(floor), OrderedDict((int(q), r) for q, r in replies)))
            for cid, floor, replies in raw)
