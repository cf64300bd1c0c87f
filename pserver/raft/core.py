"""The Raft consensus algorithm as a pure state machine.

Owns one node's Raft state: term, vote, role, the log, the commit and applied
indices, and (as leader) each follower's progress. It changes state only in
``tick``, ``step``, ``propose``, ``transfer_leadership`` and ``peer_down``, and reports work in
``ready()``: entries and hard state to persist, messages to send, committed
entries to apply. The driver persists, then sends, then applies, then calls
``advance``. Elections use PreVote (thesis §9.6) and CheckQuorum (§6.2) when
configured; a leader commits only entries of its own term (§5.4.2) and appends
a no-op at the start of its term (§8). Must not import time, socket,
threading, os or anything outside this package; randomness is injected.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from .types import Config, Entry, EntryData, HardState, Message, MsgType, Ready, Snapshot

TRANSFER = -1  # reject_hint of a VOTE sent on TIMEOUT_NOW: disregard the leader lease


class Role(Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ProposalDropped(Exception):
    """A proposal reached a node that is not the leader (or is transferring)."""

    def __init__(self, leader_hint: int) -> None:
        super().__init__(f"not the leader (leader hint: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


@dataclass
class Progress:
    """What the leader knows of one follower's log."""

    match: int = 0
    next: int = 1
    recent_active: bool = False
    inflight: list[int] = field(default_factory=list)  # last index of each APP in flight
    sent_stamp: int = 0  # the leader's heartbeat round when the oldest in flight was sent
    snap_offset: int = 0  # bytes of our snapshot the follower acknowledged holding
    stamp: int = 0  # the latest heartbeat round the follower acknowledged


class RaftCore:
    """One Raft node. ``entries`` and ``hard_state`` are what its disk holds;
    ``applied`` is the last index its state machine has applied."""

    def __init__(self, config: Config, rng: random.Random, hard_state: HardState | None = None,
                 entries: Sequence[Entry] = (), applied: int = 0,
                 snapshot: Snapshot | None = None) -> None:
        hard_state = hard_state or HardState()
        if config.id not in config.peers:
            raise ValueError("a node must be one of its peers")
        self.cfg = config
        self.id = config.id
        self.rng = rng
        self.term, self.vote, self.commit = hard_state.term, hard_state.vote, hard_state.commit
        # The log holds the entries after the snapshot (entries up to snap_index are
        # compacted into it, §7).
        self.snapshot = snapshot
        self.snap_index = snapshot.index if snapshot else 0
        self.snap_term = snapshot.term if snapshot else 0
        self.log: list[Entry] = list(entries)
        if any(e.index != self.snap_index + i + 1 for i, e in enumerate(self.log)):
            raise ValueError("entries must follow the snapshot: numbered from its index + 1")
        self.commit = max(self.commit, self.snap_index)
        applied = max(applied, self.snap_index)  # the state machine starts from the snapshot
        if self.commit > self.last_index or applied > self.commit:
            raise ValueError("commit beyond the log, or applied beyond commit")
        self.stable = self.last_index
        self.applied = applied
        self.pending_snapshot: Snapshot | None = None  # received, for the driver to restore
        self._receiving: tuple[int, int, int, int] | None = None  # (index, term, crc, total)
        self._snap_crc: int | None = None  # of self.snapshot, computed when first sent
        self._reads: dict[bytes, tuple[int, set[int]]] = {}  # context -> (index, acks)
        self.read_states: list[tuple[bytes, int]] = []  # confirmed, for the next Ready
        self._received = bytearray()  # chunks of that snapshot so far
        self.role = Role.FOLLOWER
        self.lead = 0
        self.votes: dict[int, bool] = {}
        self.progress: dict[int, Progress] = {}
        self.transferee = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.timeout = self._random_timeout()
        self.ticks = 0  # since this node started
        # With leases: refuse votes until this tick, an election timeout after the last
        # message from a leader, whatever term changes come in between, and for the
        # first election timeout after a start (a lease may have been acknowledged
        # just before a crash).
        self._quiet_until = config.election_tick if config.lease_reads else 0
        # the leader whose message set _quiet_until, and its term ((0, 0): the start)
        self._quiet_for = (0, 0)
        self._gone: dict[int, int] = {}  # dead peer -> the last term it led in
        self.notices = 0  # peer_down calls that ended waiting on a dead leader
        self._told_to_campaign = 0  # the last term in which this leader sent TIMEOUT_NOW
        self.stamp = 0  # the last heartbeat round this node sent as leader
        self.msgs: list[Message] = []
        self._saved = HardState(self.term, self.vote, self.commit)

    # -- the log ----------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self.snap_index + len(self.log)

    @property
    def last_term(self) -> int:
        return self.log[-1].term if self.log else self.snap_term

    def term_at(self, index: int) -> int | None:
        """The term of entry ``index``; None when beyond the log or compacted away."""
        if index == self.snap_index:
            return self.snap_term
        if self.snap_index < index <= self.last_index:
            return self.log[index - self.snap_index - 1].term
        return None

    def _slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi (inclusive, 1-based), all after the snapshot."""
        return self.log[lo - self.snap_index - 1:hi - self.snap_index]

    def _up_to_date(self, last_term: int, last_index: int) -> bool:
        """§5.4.1: the candidate's log is at least as up-to-date as ours."""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    # -- driver interface -------------------------------------------------------------

    def has_ready(self) -> bool:
        return (HardState(self.term, self.vote, self.commit) != self._saved or bool(self.msgs)
                or self.stable < self.last_index or self.applied < self.commit
                or self.pending_snapshot is not None or bool(self.read_states))

    def ready(self) -> Ready:
        hs = HardState(self.term, self.vote, self.commit)
        applied = self.pending_snapshot.index if self.pending_snapshot else self.applied
        entries = self._slice(self.stable + 1, self.last_index)
        return Ready(
            hard_state=hs if hs != self._saved else None,
            snapshot=self.pending_snapshot,
            entries=entries,
            messages=self.msgs[:],
            committed=self._slice(applied + 1, self.commit),
            reads=self.read_states[:],
            must_sync=bool(entries) or (hs.term, hs.vote) != (self._saved.term,
                                                              self._saved.vote),
        )

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied what ``rd`` held."""
        if rd.hard_state is not None:
            self._saved = rd.hard_state
        if rd.snapshot is not None:
            self.applied = max(self.applied, rd.snapshot.index)
            if self.pending_snapshot == rd.snapshot:
                self.pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            if self.term_at(last.index) == last.term:  # not overwritten meanwhile
                self.stable = max(self.stable, last.index)
        del self.msgs[:len(rd.messages)]
        del self.read_states[:len(rd.reads)]
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)
        if self.role == Role.LEADER:
            self.progress[self.id].match = self.stable  # the leader counts itself once on disk
            if self._maybe_commit():
                self._broadcast_append(pending_only=True)

    def tick(self) -> None:
        """One unit of time passed."""
        self.ticks += 1
        self.election_elapsed += 1
        if self.role != Role.LEADER:
            if self.election_elapsed >= self.timeout:
                self.campaign()
            return
        self.heartbeat_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            self.transferee = 0  # a transfer not done within an election timeout is abandoned
            if self.cfg.check_quorum and not self._quorum_active():
                self._become_follower(self.term, 0)  # §6.2: a leader cut off steps down
                return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._heartbeat()

    def _heartbeat(self, context: bytes = b"") -> None:
        """One heartbeat round: a new stamp, sent to every follower."""
        self.stamp += 1
        for p in self._others():
            self._send(MsgType.HEARTBEAT, p, commit=min(self.progress[p].match, self.commit),
                       context=context, stamp=self.stamp)

    def lease_stamp(self) -> int:
        """The latest heartbeat round of this leader that a quorum (itself included)
        acknowledged, or 0 where no lease holds: not the leader, handing leadership
        over (or having told a follower to campaign at all this term), this term's
        first entry not committed yet, or leases not configured.
        Until an election timeout (as the followers count it) after the driver sent
        that round, no other node can become leader (a follower that heard from this
        one refuses votes), so the leader may serve reads at its commit index
        without a round of messages."""
        if (not self.cfg.lease_reads or not self.cfg.check_quorum or self.role != Role.LEADER
                or self.transferee or self._told_to_campaign == self.term
                or self.term_at(self.commit) != self.term):
            return 0
        stamps = sorted((self.stamp if p == self.id else pr.stamp
                         for p, pr in self.progress.items()), reverse=True)
        return stamps[len(self.cfg.peers) // 2]

    def propose(self, data: EntryData) -> int:
        """Append ``data`` to the log (leader only); returns its index."""
        if self.role != Role.LEADER or self.transferee:
            raise ProposalDropped(self.lead)
        self._append(data)
        self._broadcast_append()
        return self.last_index

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read (thesis §6.4): the leader notes its commit index
        and confirms it still leads with a round of heartbeats; once a majority
        answers, ``(context, index)`` appears in ``Ready.reads``. Needs an entry of
        the current term committed first (the term's no-op)."""
        if self.role != Role.LEADER:
            raise ProposalDropped(self.lead)
        if self.term_at(self.commit) != self.term:
            raise ProposalDropped(self.id)  # not yet: retry once this term's no-op commits
        self._reads[context] = (self.commit, {self.id})
        if len(self.cfg.peers) == 1:
            self._confirm_reads()
            return
        self._heartbeat(context)

    def _confirm_reads(self) -> None:
        q = len(self.cfg.peers) // 2 + 1
        for ctx, (index, acks) in list(self._reads.items()):
            if len(acks) >= q:
                self.read_states.append((ctx, index))
                del self._reads[ctx]

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The driver saved a snapshot of the state machine as of applied entry
        ``index``: drop the entries up to it (§7). Returns the snapshot, which
        followers that need compacted entries will receive."""
        if not self.snap_index < index <= self.applied:
            raise ValueError(f"can only compact applied entries after {self.snap_index}, "
                             f"not up to {index} (applied {self.applied})")
        term = self.term_at(index)
        assert term is not None
        del self.log[:index - self.snap_index]
        self.snap_index, self.snap_term = index, term
        self.snapshot = Snapshot(index, term, data)
        self._snap_crc = None
        return self.snapshot

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to ``to`` once its log is caught up (thesis §3.10)."""
        if self.role != Role.LEADER or to == self.id or to not in self.cfg.peers:
            return
        self.transferee = to
        self.election_elapsed = 0
        if self.progress[to].match == self.last_index:
            self._send_timeout_now(to)
        else:
            self._send_append(to)

    def peer_down(self, node: int) -> None:
        """The driver knows for certain that ``node``'s process is gone (its
        supervisor reaped it just now, before starting it again): it answers
        nothing and serves no reads. When it is the leader this node follows (or
        last heard from), waiting out an election timeout only to notice its
        silence, and refusing votes to keep the promise behind its lease, serve
        nobody: forget it, drop what it sent in this term and is still on its
        way, and campaign at the next tick. The live peers go in id order, two
        heartbeat intervals apart, so that followers told at once do not split
        the vote; if the first cannot win (its log is behind), the next one
        does. Only a dead process may be reported: a leader that is alive would
        keep serving reads under a lease that no longer holds."""
        if node == self.id or node not in self.cfg.peers or self.role == Role.LEADER:
            return
        if node == self.lead:
            self._gone[node] = self.term
            self.lead = 0
        elif node == self._quiet_for[0]:
            self._gone[node] = self._quiet_for[1]
        else:
            return  # not a leader this node waits on
        if self._quiet_for[0] == node:
            self._quiet_until = min(self._quiet_until, self.ticks)
            self._quiet_for = (0, 0)
        if self.role == Role.FOLLOWER:
            live = sorted(p for p in self.cfg.peers if p != node)
            rank = live.index(self.id)
            self.timeout = self.election_elapsed + 1 + 2 * rank * self.cfg.heartbeat_tick
            self.notices += 1

    def _send_timeout_now(self, to: int) -> None:
        # Its votes ignore the followers' leases, and may arrive after this transfer
        # was abandoned: no lease holds for the rest of this term.
        self._told_to_campaign = self.term
        self._send(MsgType.TIMEOUT_NOW, to)

    # -- roles --------------------------------------------------------------------------

    def _random_timeout(self) -> int:
        return self.cfg.election_tick + self.rng.randrange(self.cfg.election_tick)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term, self.vote = term, 0
        self._reads = {}  # unconfirmed reads die with the role; the driver times them out
        self.lead = 0
        self.votes = {}
        self.election_elapsed = self.heartbeat_elapsed = 0
        self.timeout = self._random_timeout()
        self.transferee = 0

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.role, self.lead = Role.FOLLOWER, lead

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role, self.lead = Role.LEADER, self.id
        self.progress = {p: Progress(next=self.last_index + 1) for p in self.cfg.peers}
        self.progress[self.id].match = self.stable
        self._append(b"")  # §8: a no-op lets the leader commit its predecessors' entries
        self._broadcast_append()

    def campaign(self, transfer: bool = False, pre_voted: bool = False) -> None:
        """Start an election (a pre-vote round first when configured, §9.6).
        ``transfer``: told to by the leader (TIMEOUT_NOW), so the votes asked for
        disregard the followers' leases; ``pre_voted``: the pre-vote round is won,
        this is the real election (which respects them)."""
        if self.cfg.pre_vote and not transfer and not pre_voted:
            kind, term = MsgType.PRE_VOTE, self.term + 1
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
        else:
            self._reset(self.term + 1)
            self.role, self.vote = Role.CANDIDATE, self.id
            kind, term = MsgType.VOTE, self.term
        self.votes = {self.id: True}
        if self._tally() == "won":
            self._won()
            return
        for p in self._others():
            self.msgs.append(Message(kind, self.id, p, term, log_term=self.last_term,
                                     index=self.last_index,
                                     reject_hint=TRANSFER if transfer else 0))

    def _tally(self) -> str:
        yes = sum(1 for v in self.votes.values() if v)
        no = len(self.votes) - yes
        q = len(self.cfg.peers) // 2 + 1
        return "won" if yes >= q else "lost" if no >= q else "pending"

    def _won(self) -> None:
        if self.role == Role.PRE_CANDIDATE:
            self.campaign(pre_voted=True)  # the real election, now that it can win
        else:
            self._become_leader()

    # -- messages -------------------------------------------------------------------------

    def _others(self) -> list[int]:
        return [p for p in self.cfg.peers if p != self.id]

    def _send(self, kind: MsgType, to: int, **fields: object) -> None:
        self.msgs.append(Message(kind, self.id, to, self.term, **fields))  # type: ignore[arg-type]

    def step(self, m: Message) -> None:
        """Handle one message from a peer (any order, duplicates and stale ones included)."""
        if m.frm not in self.cfg.peers or m.to != self.id:
            return
        if m.term <= self._gone.get(m.frm, -1) and m.type in (
                MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            return  # sent by a leader before it died (peer_down), delivered late: a
            # new process of that node leads only in a later term
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE) and self._ignores(m):
                return  # a live leader exists: ignore disruptive candidates (§6 / §9.6)
            if m.type == MsgType.PRE_VOTE or (m.type == MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes are asked and granted for a term not yet taken
            else:
                lead = m.frm if m.type in (MsgType.APP, MsgType.HEARTBEAT) else 0
                self._become_follower(m.term, lead)
        elif m.term < self.term:
            if m.type in (MsgType.APP, MsgType.HEARTBEAT):
                self._send(MsgType.APP_RESP, m.frm)  # tells a stale leader the newer term
            elif m.type == MsgType.PRE_VOTE:
                self._send(MsgType.PRE_VOTE_RESP, m.frm, reject=True)
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._answer_vote(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _ignores(self, m: Message) -> bool:
        """Whether to ignore the vote or pre-vote request ``m``: a leader was heard
        from within an election timeout (CheckQuorum's stickiness; with leases, the
        promise behind a leader's lease, kept across term changes), unless the
        leader itself asked for this election (TIMEOUT_NOW) or this node already
        voted for the sender in that term."""
        if not self.cfg.check_quorum or m.reject_hint == TRANSFER:
            return False
        if m.term > self.term and self.lead != 0 \
                and self.election_elapsed < self.cfg.election_tick:
            return True
        return self.ticks < self._quiet_until and not (m.term == self.term
                                                       and self.vote == m.frm)

    def _answer_vote(self, m: Message) -> None:
        """§5.2, §5.4.1: one vote per term, only for an up-to-date log."""
        if self._ignores(m):
            return
        pre = m.type == MsgType.PRE_VOTE
        can = (self.vote == m.frm or (self.vote == 0 and self.lead == 0)
               or (pre and m.term > self.term))
        resp = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        if can and self._up_to_date(m.log_term, m.index):
            self.msgs.append(Message(resp, self.id, m.frm, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(resp, m.frm, reject=True)

    def _step_candidate(self, m: Message) -> None:
        want = MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if m.type in (MsgType.APP, MsgType.HEARTBEAT):
            self._become_follower(self.term, m.frm)  # §5.2: a leader of this term exists
            self._step_follower(m)
        elif m.type == want:
            self.votes.setdefault(m.frm, not m.reject)
            result = self._tally()
            if result == "won":
                self._won()
            elif result == "lost":
                self._become_follower(self.term, 0)

    def _step_follower(self, m: Message) -> None:
        if self.cfg.lease_reads and m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self._quiet_until = max(self._quiet_until, self.ticks + self.cfg.election_tick)
            self._quiet_for = (m.frm, m.term)
        if m.type == MsgType.APP:
            self.election_elapsed, self.lead = 0, m.frm
            self._handle_append(m)
        elif m.type == MsgType.HEARTBEAT:
            self.election_elapsed, self.lead = 0, m.frm
            self._commit_to(min(m.commit, self.last_index))
            self._send(MsgType.HEARTBEAT_RESP, m.frm, context=m.context, stamp=m.stamp)
        elif m.type == MsgType.TIMEOUT_NOW:
            self.campaign(transfer=True)
        elif m.type == MsgType.SNAP and m.snapshot is not None:
            self.election_elapsed, self.lead = 0, m.frm
            self._restore(m)

    def _restore(self, m: Message) -> None:
        """§7 InstallSnapshot: collect the chunks in order, check the whole snapshot's
        CRC, then adopt it unless the log already holds its last entry (then only
        the commit index moves). Stale, duplicate and out-of-order chunks are
        answered with the offset held, so the leader resends from there."""
        chunk = m.snapshot
        assert chunk is not None
        if chunk.index <= self.commit:
            self._send(MsgType.APP_RESP, m.frm, index=self.commit)
            return
        key = (chunk.index, chunk.term, m.snap_crc, m.snap_total)
        if self._receiving != key:
            self._receiving, self._received = key, bytearray()
        if m.snap_offset == len(self._received):
            self._received += chunk.data
        if len(self._received) < m.snap_total:
            self._send(MsgType.SNAP_RESP, m.frm, snap_offset=len(self._received))
            return
        data = bytes(self._received)
        self._receiving, self._received = None, bytearray()
        if len(data) != m.snap_total or zlib.crc32(data) != m.snap_crc:
            self._send(MsgType.SNAP_RESP, m.frm, snap_offset=0)  # corrupt: start over
            return
        s = Snapshot(chunk.index, chunk.term, data)
        if self.term_at(s.index) == s.term:
            self._commit_to(s.index)
        else:
            self.log = []
            self.snap_index, self.snap_term = s.index, s.term
            self.snapshot = self.pending_snapshot = s
            self.commit = s.index
            self.stable = s.index  # the driver persists the snapshot before answering
        self._send(MsgType.APP_RESP, m.frm, index=s.index)

    def _handle_append(self, m: Message) -> None:
        """§5.3: accept entries only where the logs match; cut a conflicting suffix
        (never a committed entry); stale and duplicate messages change nothing."""
        if m.index < self.commit:
            self._send(MsgType.APP_RESP, m.frm, index=self.commit)
            return
        if self.term_at(m.index) != m.log_term:
            self._send(MsgType.APP_RESP, m.frm, index=m.index, reject=True,
                       reject_hint=self.last_index)
            return
        for e in m.entries:
            have = self.term_at(e.index)
            if have == e.term:
                continue
            if have is not None:  # a conflict: drop it and everything after (§5.3)
                assert e.index > self.commit, "a committed entry may never change"
                del self.log[e.index - self.snap_index - 1:]
                self.stable = min(self.stable, e.index - 1)
            self.log.append(e)
        last_new = m.index + len(m.entries)
        self._commit_to(min(m.commit, last_new))
        self._send(MsgType.APP_RESP, m.frm, index=last_new)

    def _commit_to(self, index: int) -> None:
        self.commit = max(self.commit, index)

    # -- leader -----------------------------------------------------------------------------

    def _append(self, data: EntryData) -> None:
        self.log.append(Entry(self.term, self.last_index + 1, data))

    def _send_append(self, to: int) -> None:
        """Send the follower its next entries: at most ``max_entries_per_msg`` and
        ``max_bytes_per_msg`` of data (one entry at least), and nothing while
        ``max_inflight`` messages with entries are unacknowledged (flow control)."""
        pr = self.progress[to]
        prev = pr.next - 1
        if prev < self.snap_index:  # the entries it needs are compacted: send the snapshot
            self._send_snapshot_chunk(to, pr)
            return
        entries: list[Entry] = []
        size = 0
        for e in self._slice(pr.next, min(self.last_index,
                                          prev + self.cfg.max_entries_per_msg)):
            if entries and size + len(e.data) > self.cfg.max_bytes_per_msg:
                break
            entries.append(e)
            size += len(e.data)
        if entries and len(pr.inflight) >= self.cfg.max_inflight:
            return  # paused until acknowledgements arrive; heartbeats keep going
        self._send(MsgType.APP, to, index=prev, log_term=self.term_at(prev) or 0,
                   entries=tuple(entries), commit=self.commit)
        if entries:
            if not pr.inflight:
                pr.sent_stamp = self.stamp
            pr.next = entries[-1].index + 1  # optimistic: pipeline the next batch
            pr.inflight.append(entries[-1].index)

    def _send_snapshot_chunk(self, to: int, pr: Progress) -> None:
        """The next chunk of the snapshot (thesis §5.3: chunked, checksummed, and
        resumed from the offset the follower reports)."""
        snap = self.snapshot
        if snap is None or pr.inflight:
            return  # one chunk in flight at a time; the response sends the next
        if self._snap_crc is None:
            self._snap_crc = zlib.crc32(snap.data)
        start = min(pr.snap_offset, len(snap.data))
        chunk = snap.data[start:start + self.cfg.snapshot_chunk_bytes]
        self._send(MsgType.SNAP, to, snapshot=Snapshot(snap.index, snap.term, chunk),
                   snap_offset=start, snap_total=len(snap.data), snap_crc=self._snap_crc)
        pr.sent_stamp = self.stamp
        pr.inflight.append(snap.index)

    def _broadcast_append(self, pending_only: bool = False) -> None:
        """Send every follower its next entries. ``pending_only`` (a new commit index):
        only followers with entries to send; the others learn the commit index from
        the next append or heartbeat (within a heartbeat), which spares a message to
        and from each follower per commit under a steady stream of small requests."""
        for p in self._others():
            if not pending_only or self.progress[p].next <= self.last_index:
                self._send_append(p)

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if m.type == MsgType.APP_RESP:
            if m.reject:
                # A rejection at or below what the follower already matched is stale (a
                # delayed or duplicated message): the follower has moved past it.
                if pr.match < m.index < pr.next:
                    pr.next = max(pr.match + 1, min(m.index, m.reject_hint + 1))
                    pr.inflight.clear()
                    self._send_append(m.frm)
                return
            while pr.inflight and pr.inflight[0] <= m.index:
                pr.inflight.pop(0)
            pr.sent_stamp = self.stamp  # what is left was sent no later than now
            pr.next = max(pr.next, m.index + 1)  # it holds m.index: never send from below
            if m.index > pr.match:
                pr.match = m.index
                pr.snap_offset = 0
                if self._maybe_commit():
                    self._broadcast_append(pending_only=True)
                if self.transferee == m.frm and pr.match == self.last_index:
                    self._send_timeout_now(m.frm)
            if pr.next <= self.last_index:
                self._send_append(m.frm)
        elif m.type == MsgType.SNAP_RESP:
            pr.inflight.clear()
            pr.snap_offset = m.snap_offset
            self._send_append(m.frm)
        elif m.type == MsgType.HEARTBEAT_RESP:
            pr.stamp = max(pr.stamp, m.stamp)
            if m.context in self._reads:
                self._reads[m.context][1].add(m.frm)
                self._confirm_reads()
            # Behind: send its entries if none are in flight. Those in flight are
            # resent (from its match) only if this heartbeat left after the oldest of
            # them: on an ordered channel the follower had it first, so it was lost.
            # A heartbeat sent just before a large append, answered while the append
            # is on its way, must not send that append a second time.
            if pr.match < self.last_index and (not pr.inflight
                                               or m.stamp > pr.sent_stamp):
                pr.next = pr.match + 1
                pr.inflight.clear()
                self._send_append(m.frm)

    def _maybe_commit(self) -> bool:
        """§5.3/§5.4.2: commit the highest index a majority holds, if of this term."""
        matches = sorted((p.match for p in self.progress.values()), reverse=True)
        index = matches[len(self.cfg.peers) // 2]
        if index > self.commit and self.term_at(index) == self.term:
            self.commit = index
            return True
        return False

    def _quorum_active(self) -> bool:
        active = 1 + sum(1 for p, pr in self.progress.items() if p != self.id and pr.recent_active)
        for p, pr in self.progress.items():
            if p != self.id:
                pr.recent_active = False
        return active >= len(self.cfg.peers) // 2 + 1
