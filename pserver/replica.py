"""The replica driver: one process of a replicated shard (a Raft group member).

The only place that wires the transport, the Raft core, the WAL, the snapshot
file and the shard state machine together, and the only one with a clock. The
loop: receive (client requests and Raft messages on one ROUTER), tick the core
every heartbeat interval, propose the mutations validated since the last
round as one log entry (group commit), ask for a ReadIndex for the reads that
arrived, then handle ``Ready`` as etcd's RawNode is driven: persist (snapshot,
entries and hard state, one fsync), send, apply the committed entries, serve
the reads whose index is applied, ``advance``.

Only the leader answers clients: a follower answers ``NotLeader`` with the
leader's address as hint. A mutation is answered after its entry commits and
is applied, by the replica that proposed it (its token); every replica applies
it, records it in the session table, and a retry (same client id and sequence
number) is answered from there. Worker drops and rejoins are replicated
commands, so every replica completes the same sync steps. The log is compacted
into a snapshot (``raft.snap``, then ``WAL.compact``) once it holds more than
``snapshot_log_bytes``, and on a clean stop.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from pserver.protocol.codec import check_frames, decode_header
from pserver.protocol.errors import InternalError, NotLeader, ProtocolError, PServerError
from pserver.protocol.schema import MUTATING_KINDS, Header, Kind
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.transport import Incoming

from . import commands, peers, snapshot
from .commands import Command
from .raft import Config, Entry, HardState, RaftCore, Role, Snapshot
from .raft.core import ProposalDropped
from .server import ShardServer, split_by_tensor
from .wal import WAL, WALError, atomic_write

log = logging.getLogger(__name__)

RAFT_SNAPSHOT = "raft.snap"
_SNAP_MAGIC = b"PSRAFT1\n"
_SNAP_HEAD = struct.Struct("<QQ")  # index, term
MAX_BATCH_BYTES = 64 << 20  # one log entry's commands, at most (one command may exceed it)
READ_TIMEOUT_S = 30.0  # a read whose ReadIndex never confirmed is dropped (client retries)
READS = frozenset({Kind.PULL, Kind.META, Kind.KEYS, Kind.TABLE_META, Kind.PULL_ROWS})
LEADER_ONLY = READS | MUTATING_KINDS | {Kind.BARRIER, Kind.HEARTBEAT}


def save_raft_snapshot(path: Path, snap: Snapshot) -> None:
    atomic_write(path, _SNAP_MAGIC + _SNAP_HEAD.pack(snap.index, snap.term) + snap.data)


def load_raft_snapshot(path: Path) -> Snapshot | None:
    if not path.exists():
        return None
    raw = path.read_bytes()
    if not raw.startswith(_SNAP_MAGIC):
        raise snapshot.SnapshotError(f"{path} is not a Raft snapshot of pserver")
    index, term = _SNAP_HEAD.unpack_from(raw, len(_SNAP_MAGIC))
    return Snapshot(index, term, raw[len(_SNAP_MAGIC) + _SNAP_HEAD.size:])


class ReplicaServer(ShardServer):
    """Replica ``replica_id`` (0-based) of shard ``shard_id``; ``peers`` maps every
    replica id of the shard (this one included) to its tcp address."""

    def __init__(self, shard_id: int, shard_map: ShardMap, endpoints: Sequence[str], *,
                 replica_id: int, peers: Mapping[int, str], data_dir: str | Path,
                 heartbeat_s: float = 0.05, election_ticks: int = 6,
                 snapshot_log_bytes: int = 256 << 20, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(shard_id, shard_map, endpoints, data_dir=None, **kwargs)
        if replica_id not in peers:
            raise ValueError(f"replica {replica_id} is not among the peers {sorted(peers)}")
        self.replica_id = replica_id
        self.addresses = dict(peers)
        self.heartbeat_s = heartbeat_s
        self.snapshot_log_bytes = snapshot_log_bytes
        self.dir = Path(data_dir) / f"replica-{replica_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.snap_path = self.dir / RAFT_SNAPSHOT
        self.wal, core = self._recover(election_ticks, seed)
        self.core = core
        self._peers = peers_of(self.ctx, replica_id, peers, self.frame_bytes)
        self._batch: list[Command] = []
        self._batch_bytes = 0
        self._tokens = 0
        self._waiters: dict[tuple[int, int], tuple[Incoming, Header]] = {}
        self._reads_new: list[tuple[Incoming, Header]] = []
        self._reads_asked: dict[bytes, tuple[float, list[tuple[Incoming, Header]]]] = {}
        self._reads_ready: list[tuple[int, list[tuple[Incoming, Header]]]] = []
        self._proposed_quorum: set[tuple[str, int]] = set()  # drops/rejoins in flight
        self._was_leader = False
        self._log_bytes = sum(len(e.data) for e in core.log)
        self.mismatch = ""

    # -- start-up -------------------------------------------------------------

    def _recover(self, election_ticks: int, seed: int | None) -> tuple[WAL, RaftCore]:
        """Rebuild from disk: the Raft snapshot into the state machine, then the WAL's
        hard state and the entries after the snapshot into the core (committed ones
        are applied again by the first Ready)."""
        snap = load_raft_snapshot(self.snap_path)
        wal, rec = WAL.open(self.dir / "wal")
        snap_index = snap.index if snap else 0
        if rec.base_index > snap_index:
            raise WALError(f"{self.dir}: the log was compacted up to entry {rec.base_index} but "
                           f"the snapshot holds only {snap_index}; refusing to start")
        if snap is not None:
            snapshot.decode(snap.data, self.state, str(self.snap_path))
            self.state.applied_index = snap.index
        entries = [e for e in rec.entries if e.index > snap_index]
        if entries and entries[0].index != snap_index + 1:
            entries = []  # the snapshot came from a leader past the end of this log
        last = entries[-1].index if entries else snap_index
        hs = rec.hard_state
        hs = HardState(hs.term, hs.vote, max(snap_index, min(hs.commit, last)))
        ids = tuple(sorted(i + 1 for i in self.addresses))
        cfg = Config(self.replica_id + 1, ids, election_tick=election_ticks, heartbeat_tick=1,
                     max_inflight=16)
        rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8)))
        core = RaftCore(cfg, rng, hs, entries, applied=snap_index, snapshot=snap)
        log.info("shard %d replica %d: recovered term %d, snapshot at %d, %d entries, "
                 "commit %d", self.shard_id, self.replica_id, hs.term, snap_index,
                 len(entries), hs.commit)
        return wal, core

    # -- the loop -------------------------------------------------------------

    def serve_forever(self) -> None:
        next_tick = time.monotonic() + self.heartbeat_s
        next_parent_check = time.monotonic() + 1.0
        try:
            while not self._stop:
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                if self.endpoint.wait_readable(wait_ms):
                    for _ in range(64):
                        incoming = self.endpoint.recv()
                        if incoming is None:
                            break
                        self.handle(incoming)
                now = time.monotonic()
                if now >= next_tick:
                    self.core.tick()
                    next_tick = max(next_tick + self.heartbeat_s, now)
                    self._check_workers()
                    self._expire_reads(now)
                self._flush()
                if now >= next_parent_check:
                    next_parent_check = now + 1.0
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        log.warning("shard %d replica %d: supervisor gone; exiting",
                                    self.shard_id, self.replica_id)
                        break
        finally:
            self.close()

    def _flush(self) -> None:
        """Propose the batch, ask for pending reads, then drive Ready to quiet."""
        self._propose_batch()
        self._ask_reads()
        self._drive()
        self._role_changes()
        self._maybe_compact()

    def close(self) -> None:
        try:
            if self.core.applied > self.core.snap_index:
                self._compact()
        except (OSError, WALError, snapshot.SnapshotError) as exc:
            log.error("shard %d replica %d: snapshot on stop failed: %s", self.shard_id,
                      self.replica_id, exc)
        self._peers.close()
        self.wal.close()
        super().close()

    # -- requests -------------------------------------------------------------

    def handle(self, incoming: Incoming) -> None:
        header: Header | None = None
        try:
            header = decode_header(incoming.header, self.limits)
            if header.kind == Kind.RAFT:
                self.core.step(peers.decode(header, incoming.frames))
                return
            self.requests += 1
            check_frames(header, [f.nbytes for f in incoming.frames], self.limits)
            if header.kind in LEADER_ONLY and self.core.role != Role.LEADER:
                raise NotLeader(f"replica {self.replica_id} of shard {self.shard_id} is not "
                                "the leader", shard=self.shard_id, leader_hint=self.leader_hint)
            if header.kind in READS:
                if "worker" in header.opts:
                    self._seen(header)
                self._reads_new.append((incoming, header))
                return
            self._dispatch(incoming, header)
        except PServerError as exc:
            if isinstance(exc, ProtocolError):
                log.info("shard %d: malformed message: %s", self.shard_id, exc)
            if header is None or header.kind != Kind.RAFT:
                self._error(incoming, header, exc)
        except Exception as exc:
            log.exception("shard %d replica %d: internal error", self.shard_id, self.replica_id)
            if header is None or header.kind != Kind.RAFT:
                self._error(incoming, header, InternalError(f"{type(exc).__name__}: {exc}"))

    @property
    def leader_hint(self) -> str | None:
        lead = self.core.lead
        return self.addresses.get(lead - 1) if lead else None

    def _mutation(self, incoming: Incoming, header: Header) -> None:
        """Check the mutation against the applied state, then queue it for the next
        log entry; it is answered once that entry is committed and applied."""
        frames = incoming.frames
        self.mutate(header, split_by_tensor(header, frames), apply=False)
        self._tokens += 1
        token = (self.core.term, self._tokens)
        self._waiters[token] = (incoming, header)
        self._queue(Command(commands.REQUEST, token, bytes(incoming.header), frames))

    def _queue(self, cmd: Command) -> None:
        size = sum(memoryview(f).nbytes for f in cmd.frames)
        if self._batch and self._batch_bytes + size > MAX_BATCH_BYTES:
            self._propose_batch()
        self._batch.append(cmd)
        self._batch_bytes += size

    def _propose_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        try:
            self.core.propose(commands.encode(batch))
        except ProposalDropped:
            for c in batch:
                waiter = self._waiters.pop(c.token, None)
                if waiter is not None:
                    self._error(waiter[0], waiter[1], NotLeader(
                        "leadership moved before the request was logged", shard=self.shard_id,
                        leader_hint=self.leader_hint))

    def _ask_reads(self) -> None:
        if not self._reads_new or self.core.role != Role.LEADER:
            return
        self._tokens += 1
        ctx = struct.pack("<QQ", self.core.term, self._tokens)
        try:
            self.core.read_index(ctx)
        except ProposalDropped:
            return  # this term's no-op is not committed yet: ask again next round
        self._reads_asked[ctx] = (time.monotonic() + READ_TIMEOUT_S, self._reads_new)
        self._reads_new = []

    def _expire_reads(self, now: float) -> None:
        for ctx, (deadline, _) in list(self._reads_asked.items()):
            if deadline < now:
                del self._reads_asked[ctx]

    # -- Ready ----------------------------------------------------------------

    def _drive(self) -> None:
        core = self.core
        while core.has_ready():
            rd = core.ready()
            try:
                if rd.snapshot is not None:
                    self._install(rd.snapshot, rd.hard_state or HardState(core.term, core.vote,
                                                                          core.commit))
                if rd.entries or rd.hard_state is not None:
                    self.wal.append(rd.entries, rd.hard_state)
                    self.wal.sync()
                    self._log_bytes += sum(len(e.data) for e in rd.entries)
            except WALError as exc:
                # Nothing unpersisted may be acknowledged: stop; the supervisor restarts
                # this replica from what its disk holds.
                log.critical("shard %d replica %d: %s; stopping", self.shard_id,
                             self.replica_id, exc)
                raise SystemExit(3) from exc
            for m in rd.messages:
                self._peers.send(m)
            for e in rd.committed:
                self._apply_entry(e)
            for ctx, index in rd.reads:
                asked = self._reads_asked.pop(ctx, None)
                if asked is not None:
                    self._reads_ready.append((index, asked[1]))
            core.advance(rd)
            self._serve_reads()

    def _install(self, snap: Snapshot, hs: HardState) -> None:
        """A snapshot from the leader replaces this replica's state and log."""
        save_raft_snapshot(self.snap_path, snap)
        snapshot.decode(snap.data, self.state, "snapshot from the leader")
        self.state.applied_index = snap.index
        self.wal.compact(snap.index, snap.term, [], hs)
        self._log_bytes = 0
        log.info("shard %d replica %d: installed the leader's snapshot at entry %d "
                 "(%d bytes)", self.shard_id, self.replica_id, snap.index, len(snap.data))

    def _apply_entry(self, e: Entry) -> None:
        if e.data:
            for cmd in commands.decode(e.data):
                self._apply_command(cmd)
        self.state.applied_index = e.index
        if self.core.role == Role.LEADER:
            self._release_parked()

    def _apply_command(self, cmd: Command) -> None:
        waiter = self._waiters.pop(cmd.token, None) if cmd.op == commands.REQUEST else None
        if cmd.op == commands.DROP_WORKER:
            self._proposed_quorum.discard(("drop", cmd.worker))
            if cmd.worker not in self.state.dropped:
                log.warning("shard %d: worker %d dropped from the step quorum", self.shard_id,
                            cmd.worker)
                self.state.drop_worker(cmd.worker)
            return
        if cmd.op == commands.REJOIN_WORKER:
            self._proposed_quorum.discard(("rejoin", cmd.worker))
            if cmd.worker in self.state.dropped:
                log.warning("shard %d: worker %d is back; it resumes at the current step",
                            self.shard_id, cmd.worker)
                self.state.rejoin_worker(cmd.worker)
            return
        header = decode_header(cmd.header, self.limits)
        try:
            cached = self.state.sessions.duplicate(header.client_id, header.seq)
            if cached is None:
                opts = self.mutate(header, split_by_tensor(header, cmd.frames))
        except PServerError as exc:
            if waiter is not None:
                self._error(waiter[0], waiter[1], exc)
            return
        except Exception as exc:  # a bug: say so loudly; the digests will show any damage
            log.exception("shard %d replica %d: applying %s seq %d failed", self.shard_id,
                          self.replica_id, header.kind.name, header.seq)
            if waiter is not None:
                self._error(waiter[0], waiter[1], InternalError(f"{type(exc).__name__}: {exc}"))
            return
        if waiter is None:
            if cached is None:
                self.state.sessions.record(header.client_id, header.seq, opts)
        elif cached is None:
            self.answer_mutation(waiter[0], header, opts)
        else:
            self._answer_duplicate(waiter[0], header)

    def _serve_reads(self) -> None:
        keep = []
        for index, reads in self._reads_ready:
            if index > self.core.applied:
                keep.append((index, reads))
                continue
            for incoming, header in reads:
                try:
                    self._dispatch(incoming, header)
                except PServerError as exc:
                    self._error(incoming, header, exc)
                except Exception as exc:
                    log.exception("shard %d: internal error on a read", self.shard_id)
                    self._error(incoming, header, InternalError(f"{type(exc).__name__}: {exc}"))
        self._reads_ready = keep

    # -- leadership -----------------------------------------------------------

    def _role_changes(self) -> None:
        leader = self.core.role == Role.LEADER
        if leader and not self._was_leader:
            log.info("shard %d replica %d: leader of term %d", self.shard_id, self.replica_id,
                     self.core.term)
            now = time.monotonic()  # every known worker gets a full timeout from now
            self._last_seen = {w: now for s in self.state.slots.values()
                               for w in s.worker_steps}
        elif self._was_leader and not leader:
            log.info("shard %d replica %d: no longer the leader (term %d)", self.shard_id,
                     self.replica_id, self.core.term)
            self._abandon_clients()
        self._was_leader = leader

    def _abandon_clients(self) -> None:
        """Answer every request held for the leader's role with NotLeader: the client
        retries at the new leader with the same sequence number."""
        exc = NotLeader(f"replica {self.replica_id} of shard {self.shard_id} lost the "
                        "leadership", shard=self.shard_id, leader_hint=self.leader_hint)
        held = list(self._waiters.values()) + self._reads_new
        held += [r for _, reads in self._reads_asked.values() for r in reads]
        held += [r for _, reads in self._reads_ready for r in reads]
        held += [(inc, h) for _, _, inc, h, _ in self._parked]
        held += [r for _, waiting in self._barriers.values() for r in waiting.values()]
        for incoming, header in held:
            self._error(incoming, header, exc)
        self._waiters.clear()
        self._reads_new, self._reads_asked, self._reads_ready = [], {}, []
        self._parked, self._barriers = [], {}
        self._proposed_quorum.clear()

    # -- worker liveness as replicated commands ------------------------------------

    def _seen(self, header: Header) -> None:
        worker = header.opts.get("worker")
        if type(worker) is not int or worker < 0:
            return
        self._last_seen[worker] = time.monotonic()
        if worker in self.state.dropped and ("rejoin", worker) not in self._proposed_quorum \
                and self.core.role == Role.LEADER:
            self._proposed_quorum.add(("rejoin", worker))
            self._queue(Command(commands.REJOIN_WORKER, worker=worker))

    def _check_workers(self) -> None:
        if self.worker_timeout <= 0 or self.core.role != Role.LEADER:
            return
        now = time.monotonic()
        for worker, seen in self._last_seen.items():
            if worker not in self.state.dropped and now - seen > self.worker_timeout \
                    and ("drop", worker) not in self._proposed_quorum:
                log.warning("shard %d: worker %d sent nothing for %.1f s; proposing to drop it",
                            self.shard_id, worker, now - seen)
                self._proposed_quorum.add(("drop", worker))
                self._queue(Command(commands.DROP_WORKER, worker=worker))

    # -- compaction -----------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self._log_bytes > self.snapshot_log_bytes and self.core.applied > self.core.snap_index:
            self._compact()

    def _compact(self) -> None:
        core = self.core
        index = core.applied
        snap = core.compact(index, snapshot.encode(self.state))
        save_raft_snapshot(self.snap_path, snap)
        self.wal.compact(snap.index, snap.term, core.log,
                         HardState(core.term, core.vote, core.commit))
        self._log_bytes = sum(len(e.data) for e in core.log)
        log.info("shard %d replica %d: log compacted into a snapshot at entry %d (%d bytes)",
                 self.shard_id, self.replica_id, index, len(snap.data))

    # -- status ---------------------------------------------------------------

    def digest(self) -> str:
        """A hash of the applied state (values, optimizer state and steps of every key
        part, every table's rows): equal on replicas that applied the same entries."""
        h = xxhash.xxh64()
        read = self.state.memory.read
        for key in sorted(self.state.slots):
            s = self.state.slots[key]
            h.update(f"{s.key}\0{s.part}\0{s.step}\0{s.sync_step}".encode())
            h.update(np.ascontiguousarray(read(s.value)).tobytes())
            for name in sorted(s.state):
                h.update(np.ascontiguousarray(read(s.state[name])).tobytes())
        for name in sorted(self.state.tables):
            t = self.state.tables[name]
            ids, slots = t.index.items()
            order = ids.argsort()
            h.update(ids[order].tobytes())
            h.update(t.values[slots[order]].tobytes())
        return h.hexdigest()

    def ping_info(self) -> dict[str, Any]:
        role = self.core.role.value
        return {"shard": self.shard_id, "pid": os.getpid(), "replica": self.replica_id,
                "role": "candidate" if role == "pre-candidate" else role,
                "leader_hint": self.leader_hint}

    def status(self) -> dict[str, Any]:
        out = super().status()
        core = self.core
        out.update(
            replica=self.replica_id, role=core.role.value, term=core.term,
            commit_index=core.commit, applied_index=core.applied, leader=core.lead - 1,
            last_index=core.last_index, snapshot_index=core.snap_index,
            digest=self.digest(), wal_syncs=self.wal.syncs, peer_sends_dropped=self._peers.dropped,
        )
        if out["role"] in ("pre-candidate",):
            out["role"] = "candidate"
        return out


def peers_of(ctx: Any, replica_id: int, addresses: Mapping[int, str],
             frame_bytes: int) -> peers.Peers:
    """Links to the other replicas, keyed by their Raft ids (replica id + 1)."""
    return peers.Peers(ctx, {i + 1: a for i, a in addresses.items() if i != replica_id},
                       frame_bytes)
