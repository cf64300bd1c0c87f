"""A deterministic in-memory cluster that drives real ``RaftCore`` nodes the way the
replica driver will: persist, then send, then apply, then advance."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field

from pserver.raft import Config, Entry, HardState, Message, RaftCore, Role, Snapshot


@dataclass
class Node:
    core: RaftCore
    disk_entries: list[Entry] = field(default_factory=list)
    disk_state: HardState = field(default_factory=HardState)
    applied: list[Entry] = field(default_factory=list)  # the state machine: what it applied
    disk_snapshot: Snapshot | None = None  # entries on disk follow it


class Cluster:
    """Nodes 1..n on a network that can drop, duplicate, reorder and partition."""

    def __init__(self, n: int, seed: int = 0, **cfg: object) -> None:
        self.rng = random.Random(seed)
        peers = tuple(range(1, n + 1))
        self.nodes = {
            i: Node(RaftCore(Config(i, peers, **cfg), random.Random(seed * 100 + i)))  # type: ignore[arg-type]
            for i in peers
        }
        self.queue: list[Message] = []
        self.cut: set[frozenset[int]] = set()  # pairs that cannot talk
        self.leaders: dict[int, set[int]] = {}  # term -> leaders seen
        self.committed: list[Entry] = []  # every entry any node applied, by index

    def crash_restart(self, i: int) -> None:
        """Kill node ``i`` and start it again from its disk: the persisted hard state and
        entries survive, everything in memory (role, leader, progress, the state
        machine's applied entries) is lost and rebuilt by replaying the log."""
        old = self.nodes[i]
        self.queue = [m for m in self.queue if m.to != i]  # in flight to the dead process
        snap = old.disk_snapshot
        core = RaftCore(old.core.cfg, random.Random(self.rng.random()), old.disk_state,
                        old.disk_entries, applied=snap.index if snap else 0, snapshot=snap)
        applied = pickle.loads(snap.data) if snap else []
        self.nodes[i] = Node(core, list(old.disk_entries), old.disk_state, applied, snap)
        self.process(i)

    def partition(self, *groups: set[int]) -> None:
        self.cut = {frozenset((a, b)) for g in groups for h in groups if g is not h
                    for a in g for b in h}

    def split_at_random(self, rng: random.Random) -> None:
        """Cut the nodes into two random groups (or heal, one time in n)."""
        ids = list(self.nodes)
        rng.shuffle(ids)
        k = rng.randrange(0, len(ids))
        self.partition(set(ids[:k]), set(ids[k:])) if k else self.heal()

    def heal(self) -> None:
        self.cut = set()

    def process(self, i: int) -> None:
        node = self.nodes[i]
        core = node.core
        while core.has_ready():
            rd = core.ready()
            if rd.hard_state is not None:
                node.disk_state = rd.hard_state
            if rd.snapshot is not None:  # persist it, then restore the state machine
                node.disk_snapshot, node.disk_entries = rd.snapshot, []
                node.applied = pickle.loads(rd.snapshot.data)
                self._oracle(node.applied)
            if rd.entries:
                base = node.disk_snapshot.index if node.disk_snapshot else 0
                del node.disk_entries[rd.entries[0].index - base - 1:]
                node.disk_entries.extend(rd.entries)
            self.queue.extend(rd.messages)
            node.applied.extend(rd.committed)
            self._oracle(rd.committed)
            core.advance(rd)
        if core.role == Role.LEADER:
            self.leaders.setdefault(core.term, set()).add(i)

    def _oracle(self, entries: list[Entry]) -> None:
        for e in entries:  # §5.4.3: no two nodes ever apply different entries
                if e.index <= len(self.committed):
                    assert self.committed[e.index - 1] == e, f"index {e.index} applied twice"
                else:
                    assert e.index == len(self.committed) + 1
                    self.committed.append(e)

    def compact(self, i: int) -> None:
        """Node ``i`` snapshots its state machine at its applied index (§7)."""
        node = self.nodes[i]
        core = node.core
        if core.applied <= core.snap_index:
            return
        assert len(node.applied) == core.applied
        snap = core.compact(core.applied, pickle.dumps(node.applied))
        node.disk_snapshot = snap
        node.disk_entries = [e for e in node.disk_entries if e.index > snap.index]

    def tick(self, i: int | None = None) -> None:
        for j in [i] if i is not None else list(self.nodes):
            self.nodes[j].core.tick()
            self.process(j)

    def deliver(self, drop: float = 0.0, dup: float = 0.0, shuffle: bool = False) -> int:
        """Deliver what is queued (and what that produces) until the network is quiet."""
        n = 0
        while self.queue:
            batch, self.queue = self.queue, []
            if shuffle:
                self.rng.shuffle(batch)
            for m in batch:
                if frozenset((m.frm, m.to)) in self.cut or self.rng.random() < drop:
                    continue
                copies = 2 if self.rng.random() < dup else 1
                for _ in range(copies):
                    self.nodes[m.to].core.step(m)
                    self.process(m.to)
                    n += 1
        return n

    def run(self, ticks: int, **net: float | bool) -> None:
        for _ in range(ticks):
            self.tick()
            self.deliver(**net)  # type: ignore[arg-type]

    def leader(self) -> int | None:
        ls = [i for i, nd in self.nodes.items() if nd.core.role == Role.LEADER]
        top = max((self.nodes[i].core.term for i in ls), default=None)
        best = [i for i in ls if self.nodes[i].core.term == top]
        return best[0] if best else None

    def elect(self, max_ticks: int = 200) -> int:
        for _ in range(max_ticks):
            self.run(1)
            lead = self.leader()
            if lead is not None and all(
                    nd.core.lead == lead for i, nd in self.nodes.items()
                    if not any(frozenset((i, lead)) == c for c in self.cut)):
                return lead
        raise AssertionError("no leader elected")

    def check_invariants(self) -> None:
        """Election safety (§5.2) and state machine safety (§5.4.3)."""
        for term, ls in self.leaders.items():
            assert len(ls) == 1, f"two leaders in term {term}: {ls}"
        applied = [nd.applied for nd in self.nodes.values()]
        for a in applied:
            for b in applied:
                k = min(len(a), len(b))
                assert a[:k] == b[:k], "replicas applied different entries"
        for nd in self.nodes.values():
            core = nd.core
            assert [e.index for e in nd.applied] == list(range(1, len(nd.applied) + 1))
            for e in nd.applied[core.snap_index:]:
                assert core.log[e.index - core.snap_index - 1] == e, "a committed entry changed"
