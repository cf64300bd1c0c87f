"""Deterministic simulation of a replicated shard: the real Raft core, the real WAL
and snapshot files, the real command encoding and shard state machine
(``pserver.replog.ReplicatedLog``), on a seeded simulated network (drop,
duplicate, reorder, partition) and disk (what was not fsync'ed is lost on a
crash, the last write may be torn).

Clients push +1 at their own coordinate of one key (the set oracle) and resend a
push with the same (client id, seq) until its proposer answers it. Invariants
are checked after every event: one leader per term, an applied entry never
changes, replicas at the same applied index hold equal state, no coordinate
ever exceeds 1; at the end, after healing, every acknowledged push reads exactly
1 on every replica. A failing seed names itself; add it to ``REGRESSION``.
``SIM_SEEDS`` sets how many seeds run (``make soak`` runs thousands)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from pserver import commands
from pserver.apply import Outcome
from pserver.commands import Command
from pserver.protocol.codec import encode_header
from pserver.protocol.schema import Header, Kind, Limits, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.raft import Config, Entry, Message, Role
from pserver.raft.core import ProposalDropped
from pserver.replog import ReplicatedLog
from pserver.shard import ShardStateMachine

N = 48  # coordinates of the oracle key
KEY = "oracle"
REGRESSION: list[int] = []  # seeds that once failed, run on every CI run


class Crash(Exception):
    """The simulated process dies at this point (its unsynced writes are lost)."""


class Node:
    """One replica: a ReplicatedLog on real files in its own directory."""

    def __init__(self, sim: Sim, i: int) -> None:
        self.sim, self.id = sim, i
        self.dir = sim.root / f"replica-{i}"
        self.up = False
        self.start()

    def start(self) -> None:
        sim = self.sim
        state = ShardStateMachine(0, ShardMap.uniform(1), "async", 1 << 20, "cpu")
        cfg = Config(self.id, sim.peers, election_tick=8, heartbeat_tick=1,
                     max_bytes_per_msg=600, snapshot_chunk_bytes=700)
        self.log = ReplicatedLog(self.dir, state, cfg, random.Random(sim.rng.random()),
                                 Limits(), snapshot_log_bytes=sim.snapshot_bytes)
        self.log.before_sync = self._maybe_crash
        self.log.on_apply = self._applied
        self.up = True
        self.run()

    def _maybe_crash(self) -> None:
        if self.sim.rng.random() < self.sim.crash_in_sync:
            raise Crash

    def _applied(self, e: Entry) -> None:
        seen = self.sim.committed.setdefault(e.index, (e.term, e.data))
        assert seen == (e.term, e.data), f"seed {self.sim.seed}: entry {e.index} changed"

    def crash(self) -> None:
        """Power loss: the current WAL segment keeps what was fsync'ed plus a random
        prefix of what was written after (a torn write); memory is lost."""
        wal = self.log.wal
        synced = wal.synced_size
        wal._fh.flush()
        path = Path(wal._fh.name)
        wal._fh.close()
        size = path.stat().st_size
        keep = synced + self.sim.rng.randrange(size - synced + 1) if size > synced else size
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        os.close(self.log._lock)  # the kernel releases a dead process's lock
        self.up = False
        self.sim.queue = [m for m in self.sim.queue if m.to != self.id]

    def run(self) -> None:
        """Handle Ready until quiet; a crash inside (before an fsync) takes it down."""
        if not self.up:
            return
        try:
            self.log.drive(self.sim.queue.append, self._answer)
            self.log.maybe_compact()
        except Crash:
            self.crash()
            return
        if self.log.core.role == Role.LEADER:
            self.sim.leaders.setdefault(self.log.core.term, set()).add(self.id)

    def _answer(self, cmd: Command, outcomes: list[Outcome]) -> None:
        """The proposer of a command answers its client."""
        for outcome in outcomes:
            if self.sim.proposer.get(outcome.token) == self.id and outcome.error is None:
                self.sim.acked(outcome.header)


class Sim:
    def __init__(self, seed: int, root: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.root = root
        n = self.rng.choice([3, 3, 5])
        self.peers = tuple(range(1, n + 1))
        self.crash_in_sync = self.rng.choice([0.0, 0.01, 0.03])
        self.snapshot_bytes = self.rng.choice([300, 2000, 1 << 30])
        self.drop = self.rng.choice([0.0, 0.05, 0.2])
        self.dup = self.rng.choice([0.0, 0.05])
        self.queue: list[Message] = []
        self.cut: set[frozenset[int]] = set()
        self.leaders: dict[int, set[int]] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.proposer: dict[tuple[int, int], int] = {}
        self.tokens = 0
        self.cid = b"sim-client"
        # the client: INIT first (seq 1), then one push per coordinate
        self.pending: dict[int, int] = {1: -1}  # seq -> coordinate (-1: the INIT)
        self.acked_coords: set[int] = set()
        self.init_acked = False
        self.next_coord = 0
        self.nodes = {i: Node(self, i) for i in self.peers}

    # -- the client ----------------------------------------------------------------

    def message(self, seq: int, coord: int) -> tuple[bytes, list[bytes]]:
        meta = TensorMeta(KEY, 0, "float32", (N,), 0, N, 1)
        if coord < 0:
            header = Header(Kind.INIT, seq, client_id=self.cid, seq=seq, tensors=(meta,),
                            opts={"optimizer": {"name": "sum"}})
            return encode_header(header), [np.zeros(N, np.float32).tobytes()]
        g = np.zeros(N, np.float32)
        g[coord] = 1.0
        header = Header(Kind.PUSH, seq, client_id=self.cid, seq=seq, tensors=(meta,))
        return encode_header(header), [g.tobytes()]

    def acked(self, header: Header) -> None:
        coord = self.pending.pop(header.seq, None)
        if coord is None:
            return
        if coord < 0:
            self.init_acked = True
        else:
            self.acked_coords.add(coord)

    def send(self) -> None:
        """Send (or resend, same seq) one pending mutation to a node that leads."""
        if self.init_acked and self.next_coord < N and len(self.pending) < 4:
            self.pending[self.next_coord + 2] = self.next_coord  # seq = coord + 2
            self.next_coord += 1
        if not self.pending:
            return
        seq = self.rng.choice(sorted(self.pending))
        leaders = [nd for nd in self.nodes.values() if nd.up and nd.log.core.role == Role.LEADER]
        if not leaders:
            return
        nd = self.rng.choice(leaders)
        header, frames = self.message(seq, self.pending[seq])
        self.tokens += 1
        token = (nd.log.core.term, self.tokens)
        try:
            nd.log.core.propose(commands.encode([Command(commands.REQUEST, token, header,
                                                         frames)]))
        except ProposalDropped:
            return
        self.proposer[token] = nd.id
        nd.run()

    # -- the world -----------------------------------------------------------------

    def deliver_some(self) -> None:
        self.rng.shuffle(self.queue)
        batch, self.queue = self.queue[:8], self.queue[8:]
        for m in batch:
            dest = self.nodes[m.to]
            if not dest.up or frozenset((m.frm, m.to)) in self.cut or self.rng.random() < self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                dest.log.core.step(m)
                dest.run()

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.3:
            self.deliver_some()
        elif r < 0.5:
            for nd in self.nodes.values():
                if nd.up:
                    nd.log.core.tick()
                    nd.run()
        elif r < 0.75:
            self.send()
        elif r < 0.8:
            up = [nd for nd in self.nodes.values() if nd.up]
            if len(up) > 1:
                dead = self.rng.choice(up)
                dead.crash()
                if self.rng.random() < 0.5:  # its supervisor reports it (peer_down)
                    for nd in self.nodes.values():
                        if nd.up:
                            nd.log.core.peer_down(dead.id)
                            nd.run()
        elif r < 0.9:
            down = [nd for nd in self.nodes.values() if not nd.up]
            if down:
                self.rng.choice(down).start()
        elif r < 0.95:
            ids = list(self.peers)
            self.rng.shuffle(ids)
            k = self.rng.randrange(1, len(ids))
            a, b = set(ids[:k]), set(ids[k:])
            self.cut = {frozenset((x, y)) for x in a for y in b}
        else:
            self.cut = set()

    def check(self) -> None:
        for term, ls in self.leaders.items():
            assert len(ls) == 1, f"seed {self.seed}: two leaders in term {term}: {ls}"
        by_index: dict[int, str] = {}
        for nd in self.nodes.values():
            if not nd.up:
                continue
            st = nd.log.state
            if KEY in {k for k, _ in st.slots}:
                value = st.slots[(KEY, 0)].value
                assert value.max() <= 1.0, f"seed {self.seed}: a push was applied twice"
            d = st.digest()
            seen = by_index.setdefault(nd.log.core.applied, d)
            assert seen == d, (f"seed {self.seed}: replicas at applied index "
                               f"{nd.log.core.applied} differ")

    def settle(self) -> None:
        """Heal everything, restart every node, run until every push is acknowledged."""
        self.cut, self.drop, self.dup, self.crash_in_sync = set(), 0.0, 0.0, 0.0
        for nd in self.nodes.values():
            if not nd.up:
                nd.start()
        for _ in range(4000):
            if not self.pending and self.next_coord == N and self._caught_up():
                return
            self.send()
            for nd in self.nodes.values():
                nd.log.core.tick()
                nd.run()
            while self.queue:
                self.deliver_some()
            self.check()
        raise AssertionError(f"seed {self.seed}: no progress after healing "
                             f"({len(self.pending)} pushes pending)")

    def _caught_up(self) -> bool:
        return len({nd.log.core.applied for nd in self.nodes.values()}) == 1

    def close(self) -> None:
        for nd in self.nodes.values():
            if nd.up:
                nd.log.close()


@pytest.fixture(autouse=True)
def no_real_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated disk decides what survives a crash (``Node.crash`` keeps what
    ``WAL.sync`` marked durable); a real fsync would only make the run slow."""
    monkeypatch.setattr("pserver.wal.os.fsync", lambda fd: None)


SEEDS = sorted(set(range(int(os.environ.get("SIM_SEEDS", "200")))) | set(REGRESSION))


@pytest.mark.parametrize("seed", SEEDS)
def test_replicated_shard_keeps_every_acknowledged_push_exactly_once(
        seed: int, tmp_path: Path) -> None:
    sim = Sim(seed, tmp_path)
    try:
        for _ in range(400):
            sim.step()
            sim.check()
        sim.settle()
        assert sim.acked_coords == set(range(N))
        for nd in sim.nodes.values():
            value = nd.log.state.slots[(KEY, 0)].value
            assert np.array_equal(value, np.ones(N, np.float32)), \
                f"seed {seed}: replica {nd.id} lost or doubled a push: {value}"
    finally:
        sim.close()
