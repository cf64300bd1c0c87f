"""The replica driver: one process of a replicated shard (a Raft group member).

The only place that wires the transport, the replicated log (``replog.py``: Raft
core, WAL, snapshot file and state machine) and a clock together. The loop:
receive (client requests and Raft messages on one ROUTER), tick the core every
heartbeat interval, propose the mutations validated since the last round as one
log entry (group commit), ask for a ReadIndex for the reads that arrived, then
let the log handle ``Ready`` (persist, send, apply) and serve the reads whose
index is applied.

Reads: a leader that holds a lease answers them at its commit index without a
round of messages; else it asks for a ReadIndex. The lease runs from the time
this process sent a heartbeat round that a quorum acknowledged (the core's
``lease_stamp``), for 0.9 x (election ticks - 2) heartbeats: the followers that
acknowledged it refuse votes for at least (election ticks - 2) heartbeats after
they received it (a late tick may fire twice), and a restarted replica refuses
them for its first election timeout. A leader stopped for longer (SIGSTOP) finds
its lease run out on the monotonic clock when it wakes.

Only the leader answers clients: a follower answers ``NotLeader`` with the
leader's address as hint. A mutation is answered after its entry commits and
is applied, by the replica that proposed it (its token); every replica applies
it and records it in the session table, and a retry (same client id and
sequence number) is answered from there. Worker drops and rejoins are
replicated commands, so every replica completes the same sync steps. When the
leadership is lost, every request held for it is answered ``NotLeader``.
"""

from __future__ import annotations

import hmac
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pserver.protocol.codec import check_frames, decode_header, reply_header
from pserver.protocol.errors import (
    InternalError,
    InvalidArgument,
    NotLeader,
    ProtocolError,
    PServerError,
)
from pserver.protocol.schema import MUTATING_KINDS, Header, Kind
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.transport import Incoming

from . import aggregate, commands, peers
from .apply import Outcome, split_by_tensor
from .commands import Command
from .raft import Config, Role
from .raft.core import ProposalDropped
from .replog import ReplicatedLog
from .server import DRAIN_BATCH, ShardServer, worker_of
from .shard import Slot
from .wal import WALError

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 << 20  # one log entry's commands, at most (one command may exceed it)
READ_TIMEOUT_S = 30.0  # a read whose ReadIndex never confirmed is dropped (client retries)
LEASE_SAFETY = 0.9  # of the time no other leader can be elected: room for clock drift
STOP_LINGER_MS = 1000  # a replica stopping on a log failure: time for its last replies
DIGEST_EVERY_S = 10.0  # a leader marks a digest this often while entries are applied
READS = frozenset({Kind.PULL, Kind.META, Kind.KEYS, Kind.TABLE_META, Kind.PULL_ROWS})
LEADER_ONLY = READS | MUTATING_KINDS | {Kind.BARRIER, Kind.HEARTBEAT}


class ReplicaServer(ShardServer):
    """Replica ``replica_id`` (0-based) of shard ``shard_id``; ``peers`` maps every
    replica id of the shard (this one included) to its tcp address."""

    def __init__(self, shard_id: int, shard_map: ShardMap, endpoints: Sequence[str], *,
                 replica_id: int, peers: Mapping[int, str], data_dir: str | Path,
                 heartbeat_s: float = 0.05, election_ticks: int = 6,
                 snapshot_log_bytes: int = 256 << 20, seed: int | None = None,
                 cluster_token: str | None = None, **kwargs: Any) -> None:
        super().__init__(shard_id, shard_map, endpoints, data_dir=None, **kwargs)
        if replica_id not in peers:
            raise ValueError(f"replica {replica_id} is not among the peers {sorted(peers)}")
        self.replica_id = replica_id
        self.addresses = dict(peers)
        self.heartbeat_s = heartbeat_s
        self._token = cluster_token or ""
        if not self._token and len(self.addresses) > 1:
            log.warning("shard %d replica %d: no cluster token ($PSERVER_CLUSTER_TOKEN): "
                        "Raft messages from anyone who reaches its port are accepted",
                        shard_id, replica_id)
        self._heard_at: dict[int, float] = {}  # Raft id -> when its last message was handled
        self.raft_refused = 0  # RAFT messages dropped for a missing or wrong token
        ids = tuple(sorted(i + 1 for i in self.addresses))
        # No lease for a group of one (its ReadIndex needs no messages) or for fewer
        # than 3 election ticks (the lease would be empty).
        self._lease_s = LEASE_SAFETY * (election_ticks - 2) * heartbeat_s \
            if len(ids) > 1 and election_ticks >= 3 else 0.0
        cfg = Config(replica_id + 1, ids, election_tick=election_ticks, heartbeat_tick=1,
                     max_inflight=16, lease_reads=self._lease_s > 0)
        self._stamps_sent: dict[int, float] = {}  # heartbeat round -> when it was made
        self.lease_reads = 0  # reads answered under the lease
        self.read_index_reads = 0  # reads answered after a ReadIndex round
        rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8)))
        self.log = ReplicatedLog(
            Path(data_dir) / f"replica-{replica_id}", self.state, cfg, rng, self.limits,
            workers=self.default_workers, staleness=self.default_staleness, shard_id=shard_id,
            snapshot_log_bytes=snapshot_log_bytes)
        self.log.save_in_background = True
        self.core = self.log.core
        self._peers = peers_of(self.ctx, replica_id, peers, self.frame_bytes, self._token)
        self._batch: list[Command] = []
        self._batch_bytes = 0
        self._tokens = 0
        self._next_digest = time.monotonic() + DIGEST_EVERY_S  # see _mark_digest
        self._changed_since_mark = False  # commands other than digest marks applied
        self._digest_token: tuple[int, int] | None = None
        # token -> the requests a proposed mutation answers (copies sent again share it)
        self._waiters: dict[tuple[int, int], list[tuple[Incoming, Header]]] = {}
        # (client id, seq) -> token of a mutation proposed here and not yet applied
        self._in_log: dict[tuple[bytes, int], tuple[int, int]] = {}
        self._steps = aggregate.StepAggregator(self.state, self.frame_bytes)
        # pushes to ask again after each Ready, until their deadline
        self._held: list[tuple[Incoming, Header, float]] = []
        self._reads_new: list[tuple[Incoming, Header]] = []
        self._reads_asked: dict[bytes, tuple[float, list[tuple[Incoming, Header]]]] = {}
        self._reads_ready: list[tuple[int, list[tuple[Incoming, Header]]]] = []
        self._proposed_quorum: set[tuple[str, int]] = set()  # drops/rejoins in flight
        self._was_leader = False
        if len(self.addresses) == 1:
            self.core.campaign()  # the only voter wins at once: no election timeout to wait

    # -- the loop -------------------------------------------------------------

    def serve_forever(self) -> None:
        next_tick = time.monotonic() + self.heartbeat_s
        next_parent_check = time.monotonic() + 1.0
        try:
            while not self._stop:
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                incoming = self.endpoint.recv_within(wait_ms)
                if incoming is not None:
                    # Drain, but come back to the clock within half a heartbeat: a
                    # replica that stops ticking and answering peers looks dead.
                    until = time.monotonic() + self.heartbeat_s / 2
                    handled = 0
                    while incoming is not None:
                        self.handle(incoming)
                        handled += 1
                        if handled == DRAIN_BATCH or time.monotonic() > until:
                            break  # before receiving the next: it would be dropped
                        incoming = self.endpoint.recv()
                now = time.monotonic()
                if now >= next_tick:
                    self._stamped(self.core.tick, now)
                    next_tick = max(next_tick + self.heartbeat_s, now)
                    self._check_workers()
                    self._expire_reads(now)
                    self._mark_digest(now)
                self._flush()
                if now >= next_parent_check:
                    next_parent_check = now + 1.0
                    self.drop_dead_shm()
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
        try:
            self.log.maybe_compact()
        except WALError as exc:  # the snapshot file or the cut WAL could not be written
            self._stop_on_disk_failure(exc)

    def close(self) -> None:
        try:
            if self.core.applied > self.core.snap_index and not self.log.wal.failed:
                self.log.compact()
        except (OSError, WALError) as exc:
            log.error("shard %d replica %d: snapshot on stop failed: %s", self.shard_id,
                      self.replica_id, exc)
        self._peers.close()
        self.log.close()
        super().close()

    # -- requests -------------------------------------------------------------

    def handle(self, incoming: Incoming) -> None:
        header: Header | None = None
        try:
            header = decode_header(incoming.header, self.limits)
            if header.kind == Kind.RAFT:
                if self._token and not peers.signed(header, self._token):
                    self.raft_refused += 1
                    raise ProtocolError("a RAFT message without the cluster's token")
                msg = peers.decode(header, incoming.frames)
                self._heard_at[msg.frm] = time.monotonic()
                self.core.step(msg)
                return
            if header.kind == Kind.PEER_DOWN:
                self._peer_down(incoming, header)
                return
            self.requests += 1
            if header.shm is not None:
                incoming = self.attach_shm(incoming, header)
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

    def _must_copy(self, header: Header) -> bool:
        """A leader logs what it is sent, and log entries outlive the request's
        shared memory; a follower refuses data requests and keeps nothing."""
        return self.core.role == Role.LEADER

    def _peer_down(self, incoming: Incoming, header: Header) -> None:
        """The supervisor reaped another replica of this shard (PROTOCOL.md §5.4):
        if it led, stop waiting on it and elect a new leader now (``RaftCore.peer_down``).
        A report of a live leader would let another be elected while it still
        serves reads under its lease, so only one carrying the supervisor's token
        (given to its replicas in their environment) counts, and only if no message
        of that replica was handled here since its death was seen (``at``, on this
        host's monotonic clock): a message of the replica's next process, once
        restarted, would be; one its dead process sent just before dying may be too,
        and then the report is not acted on (the election timeout still runs)."""
        o = header.opts
        token, replica, at = o.get("token"), o.get("replica"), o.get("at")
        if not self._token or not isinstance(token, str) \
                or not hmac.compare_digest(token, self._token):
            raise InvalidArgument("PEER_DOWN is accepted only from this replica's supervisor")
        if isinstance(replica, bool) or not isinstance(replica, int) \
                or replica not in self.addresses or replica == self.replica_id:
            raise InvalidArgument(f"PEER_DOWN: replica must be another replica's id of shard "
                                  f"{self.shard_id}, not {replica!r}")
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise InvalidArgument("PEER_DOWN: at must be the time of the death on the "
                                  "monotonic clock")
        heard = self._heard_at.get(replica + 1, float("-inf"))
        accepted = heard < at
        if accepted:
            before = self.core.notices
            self.core.peer_down(replica + 1)
            if self.core.notices != before:
                log.info("shard %d replica %d: leader (replica %d) died; electing a new one",
                         self.shard_id, self.replica_id, replica)
        else:
            log.info("shard %d replica %d: report of replica %d's death not acted on: a "
                     "message of it was handled %.3f s after the death was seen",
                     self.shard_id, self.replica_id, replica, heard - at)
        self._reply(incoming, reply_header(header, opts={"accepted": accepted}))

    @property
    def leader_hint(self) -> str | None:
        lead = self.core.lead
        return self.addresses.get(lead - 1) if lead else None

    def _mutation(self, incoming: Incoming, header: Header) -> None:
        """Check the mutation against the applied state, then queue it for the next
        log entry; it is answered once that entry is committed and applied."""
        frames = incoming.frames
        ident = (header.client_id, header.seq)
        token = self._in_log.get(ident) if header.client_id and header.seq else None
        if token is not None and token in self._waiters:
            # Sent again while its first copy is on its way through the log (a client
            # that gave up on this replica for a moment): it is answered with the first.
            self._waiters[token].append((incoming, header))
            return
        data = split_by_tensor(header, frames)
        self.mutate(header, data, apply=False)
        route = self._steps.route(header) if self._own_term_applied() else aggregate.HOLD
        if route == aggregate.AGGREGATE and len(self.addresses) == 1:
            # A group of one sends nothing to peers: logging each sync push by itself
            # costs only its own disk, and acknowledges it once buffered, as an
            # in-memory shard does, not once the whole step (every worker) is in.
            route = aggregate.LOG
        if route == aggregate.HOLD:
            self._held.append((incoming, header, time.monotonic() + READ_TIMEOUT_S))
            return
        self._tokens += 1
        token = (self.core.term, self._tokens)
        self._waiters[token] = [(incoming, header)]
        if header.client_id and header.seq:
            self._in_log[ident] = token
        if route == aggregate.AGGREGATE:
            self._steps.add(header, data, token, bytes(incoming.header))
            for cmd in self._steps.ready():
                self._queue(cmd)
            return
        self._steps.logged(header, +1)
        self._queue(Command(commands.REQUEST, token, bytes(incoming.header), frames))

    def _own_term_applied(self) -> bool:
        """This leader applied its term's first entry, so everything committed before
        it is applied too (and the session table knows every applied push)."""
        return self.core.term_at(self.core.applied) == self.core.term

    def _retry_held(self) -> None:
        """Pushes held until this term's first entry (or a rejoin) was applied."""
        if not self._held or self.core.role != Role.LEADER:
            return
        held, self._held, now = self._held, [], time.monotonic()
        for incoming, header, expires in held:
            if expires < now:  # its client gave up long ago
                continue
            # Through the whole dispatch again: it may have been applied meanwhile (its
            # first copy was in the previous leader's log), then the table answers it.
            self._redispatch(incoming, header)
            if self._held and self._held[-1][0] is incoming:
                self._held[-1] = (incoming, header, expires)  # still held: keep its deadline

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
                tokens = [t for t, _ in c.members] if c.op == commands.SYNC_STEP else [c.token]
                for incoming, header in [w for t in tokens for w in self._waiters.pop(t, [])]:
                    self._in_log.pop((header.client_id, header.seq), None)
                    self._error(incoming, header, NotLeader(
                        "leadership moved before the request was logged", shard=self.shard_id,
                        leader_hint=self.leader_hint))

    def _stamped(self, step: Callable[[], None], now: float) -> None:
        """Run a core step that may start a heartbeat round; note when it did (``now``
        was read before the step, so the lease never starts after the send)."""
        before = self.core.stamp
        step()
        if self.core.stamp != before:
            self._stamps_sent[self.core.stamp] = now
            for old in [s for s, t in self._stamps_sent.items() if t + self._lease_s <= now]:
                del self._stamps_sent[old]  # too old to start a lease now

    def _in_lease(self) -> bool:
        """Whether a lease lets this leader answer reads at its commit index now."""
        stamp = self.core.lease_stamp() if self._lease_s else 0
        sent = self._stamps_sent.get(stamp) if stamp else None
        return sent is not None and time.monotonic() < sent + self._lease_s

    def _ask_reads(self) -> None:
        if not self._reads_new or self.core.role != Role.LEADER:
            return
        if self._in_lease():
            self.lease_reads += len(self._reads_new)
            self._reads_ready.append((self.core.commit, self._reads_new))
            self._reads_new = []
            return
        self._tokens += 1
        ctx = struct.pack("<QQ", self.core.term, self._tokens)
        try:
            self._stamped(lambda: self.core.read_index(ctx), time.monotonic())
        except ProposalDropped:
            return  # this term's no-op is not committed yet: ask again next round
        self.read_index_reads += len(self._reads_new)
        self._reads_asked[ctx] = (time.monotonic() + READ_TIMEOUT_S, self._reads_new)
        self._reads_new = []

    def _expire_reads(self, now: float) -> None:
        for ctx, (deadline, _) in list(self._reads_asked.items()):
            if deadline < now:
                del self._reads_asked[ctx]

    # -- Ready ----------------------------------------------------------------

    def _drive(self) -> None:
        try:
            reads = self.log.drive(self._peers.send, self._answer)
        except WALError as exc:
            self._stop_on_disk_failure(exc)
        for ctx, index in reads:
            asked = self._reads_asked.pop(ctx, None)
            if asked is not None:
                self._reads_ready.append((index, asked[1]))
        if self.core.role == Role.LEADER:
            self._release_parked()
        self._serve_reads()
        self._retry_held()

    def _stop_on_disk_failure(self, exc: WALError) -> NoReturn:
        """Nothing unpersisted may be acknowledged: stop; the supervisor restarts this
        replica from what its disk holds. Every request it holds is answered
        NotLeader first (no hint: not back here), a retryable error: the client
        sends it again, same sequence number, to whichever replica leads next, so a
        full disk (WALFull) or a failed write costs a retry, not a client's whole
        deadline. The replies get a moment to leave."""
        log.critical("shard %d replica %d: %s; stopping", self.shard_id, self.replica_id, exc)
        self._abandon_clients(NotLeader(
            f"replica {self.replica_id} of shard {self.shard_id} cannot write its log "
            f"({exc}) and stops; send the request again", shard=self.shard_id,
            leader_hint=None))
        self.close_linger_ms = STOP_LINGER_MS
        raise SystemExit(3) from exc

    def _answer(self, cmd: Command, outcomes: list[Outcome]) -> None:
        """A committed command was applied here: answer the clients of the mutations
        this replica proposed."""
        if cmd.op == commands.DROP_WORKER:
            self._proposed_quorum.discard(("drop", cmd.worker))
        elif cmd.op == commands.REJOIN_WORKER:
            self._proposed_quorum.discard(("rejoin", cmd.worker))
            self._steps.forget_worker(cmd.worker)
        elif cmd.op == commands.REQUEST and outcomes:
            self._steps.logged(outcomes[0].header, -1)
        if cmd.op == commands.SYNC_STEP and outcomes and outcomes[0].error is not None:
            self._abandon_steps()  # the leader's step numbers went wrong: start over
        if cmd.op not in (commands.DIGEST, commands.DIGEST_CHECK):
            self._changed_since_mark = True
        if cmd.op == commands.DIGEST and cmd.token == self._digest_token \
                and self.core.role == Role.LEADER and cmd.token in self.state.digest_marks:
            self._queue(Command(commands.DIGEST_CHECK, cmd.token,
                                digest=self.state.digest_marks[cmd.token]))
        for outcome in outcomes:
            self._in_log.pop((outcome.header.client_id, outcome.header.seq), None)
            for incoming, header in self._waiters.pop(outcome.token, []):
                if outcome.error is not None:
                    self._error(incoming, header, outcome.error)
                elif outcome.opts is not None:
                    self._send_mutation_reply(incoming, header, outcome.opts)
                else:
                    self._answer_duplicate(incoming, header)
        if cmd.op == commands.DROP_WORKER and self.core.role == Role.LEADER:
            for step in self._steps.ready():  # steps waiting only for that worker
                self._queue(step)

    def _mark_digest(self, now: float) -> None:
        """As leader, every DIGEST_EVERY_S while entries get applied, log a DIGEST
        mark: each replica hashes its state where it applies it, and once the leader
        has applied it, it logs its own hash (DIGEST_CHECK) for every replica to
        compare with its own. The log is the exchange: the same position on every
        replica, hand-started ones included."""
        if (now < self._next_digest or self.core.role != Role.LEADER
                or not self._changed_since_mark or not self._own_term_applied()):
            return
        self._next_digest = now + DIGEST_EVERY_S
        self._changed_since_mark = False  # an idle cluster logs no marks
        self._tokens += 1
        self._digest_token = (self.core.term, self._tokens)
        self._queue(Command(commands.DIGEST, self._digest_token))

    def _abandon_steps(self) -> None:
        """Send back every push waiting for its step (NotLeader: resend it)."""
        exc = NotLeader("the leader restarted its sync aggregation; send the push again",
                        shard=self.shard_id, leader_hint=self.leader_hint)
        for token in self._steps.reset():
            for incoming, header in self._waiters.pop(token, []):
                self._in_log.pop((header.client_id, header.seq), None)
                self._error(incoming, header, exc)

    def _readable(self, worker: int, header: Header, slots: Sequence[Slot]) -> bool:
        """As on an unreplicated shard, and a PULL also waits for the pushes of the
        same worker to those parts that this leader took before it: they are
        counted in the worker's steps only once applied, so without this a pull sent
        right after a sync push (still waiting for its step) read the step before."""
        if not super()._readable(worker, header, slots):
            return False
        return header.kind != Kind.PULL or not self._pushing(worker, slots)

    def _pushing(self, worker: int, slots: Sequence[Slot]) -> bool:
        """Whether a push of ``worker`` to any of ``slots`` is taken but unanswered."""
        if not self._waiters and not self._held:
            return False
        parts = {(s.key, s.part) for s in slots}
        taken = [h for ws in self._waiters.values() for _, h in ws]
        return any(h.kind in (Kind.PUSH, Kind.PUSH_PULL) and h.opts.get("worker", 0) == worker
                   and any((t.key, t.part) in parts for t in h.tensors)
                   for h in taken + [h for _, h, _ in self._held])

    def _serve_reads(self) -> None:
        keep = []
        for index, reads in self._reads_ready:
            if index > self.core.applied:
                keep.append((index, reads))
                continue
            for incoming, header in reads:
                self._redispatch(incoming, header)
        self._reads_ready = keep

    def _redispatch(self, incoming: Incoming, header: Header) -> None:
        """Dispatch a request held back (a read waiting for its ReadIndex, a push for
        its leader's first entry); an error is answered, never raised."""
        try:
            self._dispatch(incoming, header)
        except PServerError as exc:
            self._error(incoming, header, exc)
        except Exception as exc:
            log.exception("shard %d: internal error on a held %s", self.shard_id,
                          header.kind.name)
            self._error(incoming, header, InternalError(f"{type(exc).__name__}: {exc}"))

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

    def _abandon_clients(self, exc: NotLeader | None = None) -> None:
        """Answer every request held for the leader's role with NotLeader (``exc``, by
        default: the leadership was lost): the client retries at the new leader with
        the same sequence number."""
        if exc is None:
            exc = NotLeader(f"replica {self.replica_id} of shard {self.shard_id} lost the "
                            "leadership", shard=self.shard_id, leader_hint=self.leader_hint)
        held = [w for ws in self._waiters.values() for w in ws] + self._reads_new
        held += [r for _, reads in self._reads_asked.values() for r in reads]
        held += [r for _, reads in self._reads_ready for r in reads]
        held += [(inc, h) for _, _, inc, h, _ in self._parked]
        held += [r for _, waiting, _ in self._barriers.values() for r in waiting.values()]
        held += [(inc, h) for inc, h, _ in self._held]
        self._steps.reset()
        for incoming, header in held:
            self._error(incoming, header, exc)
        self._waiters.clear()
        self._in_log.clear()
        self._reads_new, self._reads_asked, self._reads_ready = [], {}, []
        self._parked, self._barriers, self._held = [], {}, []
        self._proposed_quorum.clear()

    # -- worker liveness as replicated commands ------------------------------------

    def _seen(self, header: Header) -> None:
        worker = worker_of(header)
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

    # -- status ---------------------------------------------------------------

    @property
    def role(self) -> str:
        """leader, follower or candidate (a PreVote campaign counts as candidate)."""
        role = self.core.role.value
        return "candidate" if role == "pre-candidate" else role

    def ping_info(self) -> dict[str, Any]:
        return {"shard": self.shard_id, "pid": os.getpid(), "replica": self.replica_id,
                "role": self.role, "leader_hint": self.leader_hint}

    def status(self) -> dict[str, Any]:
        out = super().status()
        core = self.core
        out.update(
            replica=self.replica_id, role=self.role, term=core.term,
            commit_index=core.commit, applied_index=core.applied, leader=core.lead - 1,
            last_index=core.last_index, snapshot_index=core.snap_index,
            digest=self.state.digest(), wal_syncs=self.log.wal.syncs,
            peer_sends_dropped=self._peers.dropped, lease_reads=self.lease_reads,
            read_index_reads=self.read_index_reads, peer_down_notices=core.notices,
            raft_refused=self.raft_refused, unreadable_entries=self.log.unreadable_entries,
            digest_checks=self.state.digest_checks,
            digest_mismatches=self.state.digest_mismatches,
        )
        return out


def peers_of(ctx: Any, replica_id: int, addresses: Mapping[int, str],
             frame_bytes: int, token: str = "") -> peers.Peers:
    """Links to the other replicas, keyed by their Raft ids (replica id + 1)."""
    return peers.Peers(ctx, {i + 1: a for i, a in addresses.items() if i != replica_id},
                       frame_bytes, token)
