"""The Raft rules, one test each, citing the paper (Ongaro & Ousterhout 2014) or
Ongaro's thesis; and seeded randomized runs over a faulty network."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest

from pserver.raft import Config, Entry, HardState, Message, MsgType, RaftCore, Role
from pserver.raft.core import ProposalDropped

from .harness import Cluster


def test_a_single_node_elects_itself_and_commits() -> None:
    """§5.2/§5.3: a group of one is its own majority: it wins its election at once
    and commits what it appends."""
    c = Cluster(1)
    lead = c.elect()
    c.nodes[lead].core.propose(b"x")
    c.process(lead)
    assert [e.data for e in c.nodes[lead].applied] == [b"", b"x"]  # the no-op, then x


def test_ready_must_sync_entries_term_and_vote_but_not_a_commit_index_alone() -> None:
    """Term, vote and entries must be durable before a node answers or counts itself
    (§5.1 persistent state); the commit index is volatile (Figure 2), so a Ready that
    only moves it need not be fsynced by itself (etcd's MustSync)."""
    core = RaftCore(Config(1, (1,)), random.Random(0))
    core.campaign()
    rd = core.ready()
    assert rd.must_sync and rd.hard_state is not None  # new term and vote, the no-op
    core.advance(rd)  # the leader counts itself: the no-op commits
    rd = core.ready()
    assert rd.hard_state is not None and rd.hard_state.commit == 1 and not rd.entries
    assert not rd.must_sync
    core.advance(rd)
    core.propose(b"x")
    assert core.ready().must_sync


def test_one_leader_is_elected_and_all_follow_it() -> None:
    """§5.2: a candidate with votes from a majority becomes leader; others follow."""
    c = Cluster(3, seed=1)
    lead = c.elect()
    assert sum(nd.core.role == Role.LEADER for nd in c.nodes.values()) == 1
    assert {nd.core.lead for nd in c.nodes.values()} == {lead}
    c.check_invariants()


def test_entries_replicate_and_commit_on_every_node() -> None:
    """§5.3: the leader replicates entries; committed entries are applied everywhere."""
    c = Cluster(3, seed=2)
    lead = c.elect()
    for i in range(20):
        c.nodes[lead].core.propose(f"e{i}".encode())
    c.process(lead)
    c.deliver()
    c.run(3)
    for nd in c.nodes.values():
        assert [e.data for e in nd.applied if e.data] == [f"e{i}".encode() for i in range(20)]
    c.check_invariants()


def test_a_follower_refuses_proposals_with_a_leader_hint() -> None:
    """§5.1 and §8: only the leader takes client requests; a follower redirects the
    client to the leader it knows."""
    c = Cluster(3, seed=3)
    lead = c.elect()
    follower = next(i for i in c.nodes if i != lead)
    with pytest.raises(ProposalDropped) as info:
        c.nodes[follower].core.propose(b"x")
    assert info.value.leader_hint == lead


def test_election_timeouts_are_randomized_over_one_election_timeout() -> None:
    """§5.2: each node waits a random time in [election_tick, 2 x election_tick)
    before it campaigns, drawn from the injected rng, so split votes are rare;
    a follower that keeps hearing from its leader never campaigns."""
    cfg = Config(1, (1, 2, 3), election_tick=10)
    seen = set()
    for seed in range(200):
        core = RaftCore(cfg, random.Random(seed))
        ticks = 0
        while core.role not in (Role.PRE_CANDIDATE, Role.CANDIDATE):
            core.tick()
            ticks += 1
        assert 10 <= ticks < 20, (seed, ticks)
        seen.add(ticks)
    assert seen == set(range(10, 20))  # every value of the range occurs
    again = [RaftCore(cfg, random.Random(7)).timeout for _ in range(2)]
    assert again[0] == again[1]  # the same rng seed, the same timeout


def test_one_vote_per_term() -> None:
    """§5.2: each server votes for at most one candidate in a given term."""
    core = RaftCore(Config(1, (1, 2, 3), pre_vote=False), random.Random(0))
    core.step(Message(MsgType.VOTE, 2, 1, term=5))
    core.step(Message(MsgType.VOTE, 3, 1, term=5))
    resps = [m for m in core.ready().messages if m.type == MsgType.VOTE_RESP]
    assert [(m.to, m.reject) for m in resps] == [(2, False), (3, True)]
    assert core.vote == 2


def test_no_vote_for_a_less_up_to_date_log() -> None:
    """§5.4.1: a voter denies a candidate whose log is behind its own."""
    log = [Entry(1, 1), Entry(2, 2)]
    core = RaftCore(Config(1, (1, 2, 3), pre_vote=False), random.Random(0),
                    HardState(term=2), log)
    core.step(Message(MsgType.VOTE, 2, 1, term=3, log_term=1, index=5))  # older last term
    core.step(Message(MsgType.VOTE, 3, 1, term=4, log_term=2, index=1))  # same term, shorter
    assert all(m.reject for m in core.ready().messages)


def test_append_rejects_where_logs_do_not_match_and_cuts_conflicts() -> None:
    """§5.3: the consistency check, and a conflicting suffix replaced by the leader's."""
    core = RaftCore(Config(1, (1, 2, 3)), random.Random(0), HardState(term=2),
                    [Entry(1, 1), Entry(1, 2), Entry(2, 3)])
    core.step(Message(MsgType.APP, 2, 1, term=3, index=3, log_term=3))
    assert core.ready().messages[-1].reject
    core.step(Message(MsgType.APP, 2, 1, term=3, index=2, log_term=1,
                      entries=(Entry(3, 3), Entry(3, 4)), commit=4))
    assert [e.term for e in core.log] == [1, 1, 3, 3]
    assert core.commit == 4


def test_a_stale_rejection_never_moves_the_leader_below_what_the_follower_holds() -> None:
    """§5.3: a rejection delayed past the follower's later success is stale; the
    leader must not send from below the matched index again (found by the
    simulation: with the log compacted, it resent the snapshot forever)."""
    c = Cluster(3, seed=11)
    lead = c.elect()
    core = c.nodes[lead].core
    for i in range(5):
        core.propose(f"e{i}".encode())
        c.process(lead)
        c.deliver()
    follower = next(i for i in c.nodes if i != lead)
    pr = core.progress[follower]
    match = pr.match
    assert match == core.last_index
    c.compact(lead)  # the entries below the match are gone: only a snapshot could resend
    core.step(Message(MsgType.APP_RESP, follower, lead, term=core.term, index=match - 2,
                      reject=True, reject_hint=match - 3))
    assert pr.match == match and pr.next == match + 1
    core.step(Message(MsgType.APP_RESP, follower, lead, term=core.term, index=match - 2))
    assert pr.next == match + 1


def test_stale_and_duplicate_appends_change_nothing() -> None:
    """§5.3: a repeated or delayed AppendEntries must not truncate newer entries."""
    core = RaftCore(Config(1, (1, 2, 3)), random.Random(0), HardState(term=1))
    full = Message(MsgType.APP, 2, 1, term=1, index=0, log_term=0,
                   entries=(Entry(1, 1), Entry(1, 2), Entry(1, 3)))
    core.step(full)
    core.step(Message(MsgType.APP, 2, 1, term=1, index=0, log_term=0, entries=(Entry(1, 1),)))
    core.step(full)
    assert [e.index for e in core.log] == [1, 2, 3]


def test_a_leader_commits_only_entries_of_its_own_term() -> None:
    """§5.4.2: an entry of an earlier term is committed only through a newer one."""
    core = RaftCore(Config(1, (1, 2, 3), pre_vote=False), random.Random(0), HardState(term=1),
                    [Entry(1, 1)])
    core.campaign()
    core.step(Message(MsgType.VOTE_RESP, 2, 1, term=2))
    assert core.role == Role.LEADER
    rd = core.ready()
    core.advance(rd)
    # a follower acknowledges only the old entry 1: not enough to commit it
    core.step(Message(MsgType.APP_RESP, 2, 1, term=2, index=1))
    assert core.commit == 0
    core.step(Message(MsgType.APP_RESP, 2, 1, term=2, index=2))  # the no-op of term 2
    assert core.commit == 2


def test_prevote_keeps_a_rejoining_node_from_disrupting_the_cluster() -> None:
    """Thesis §9.6: a node cut off campaigns with pre-votes, so its term does not grow
    and the leader keeps its place when it comes back."""
    c = Cluster(3, seed=4)
    lead = c.elect()
    term = c.nodes[lead].core.term
    loner = next(i for i in c.nodes if i != lead)
    c.partition({loner}, set(c.nodes) - {loner})
    c.run(100)
    assert c.nodes[loner].core.term == term
    c.heal()
    c.run(20)
    assert c.leader() == lead and c.nodes[lead].core.term == term


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    """§6.2 (CheckQuorum): a leader that hears from no majority for an election
    timeout steps down; the majority elects a new leader."""
    c = Cluster(3, seed=5)
    old = c.elect()
    c.partition({old}, set(c.nodes) - {old})
    c.run(60)
    assert c.nodes[old].core.role != Role.LEADER
    new = c.leader()
    assert new is not None and new != old


def test_uncommitted_entries_of_a_deposed_leader_are_replaced() -> None:
    """§5.3/§5.4: entries never committed may be overwritten; committed ones never."""
    c = Cluster(3, seed=6)
    old = c.elect()
    c.nodes[old].core.propose(b"committed")
    c.process(old)
    c.deliver()
    c.run(3)
    c.partition({old}, set(c.nodes) - {old})
    c.nodes[old].core.propose(b"lost")
    c.process(old)
    c.run(60)
    new = c.leader()
    assert new is not None and new != old
    c.nodes[new].core.propose(b"kept")
    c.process(new)
    c.deliver()
    c.heal()
    c.run(30)
    for nd in c.nodes.values():
        data = [e.data for e in nd.applied if e.data]
        assert data == [b"committed", b"kept"]
    c.check_invariants()


def test_leadership_transfer_hands_over_to_the_named_follower() -> None:
    """Thesis §3.10: the leader catches the target up, then tells it to campaign."""
    c = Cluster(3, seed=7)
    lead = c.elect()
    target = next(i for i in c.nodes if i != lead)
    c.nodes[lead].core.transfer_leadership(target)
    c.process(lead)
    c.deliver()
    c.run(5)
    assert c.leader() == target
    c.check_invariants()


def _entries_while_a_follower_is_cut_off(c: Cluster, data: list[str]) -> tuple[int, int]:
    """Elect a leader, cut one follower off, have the leader commit ``data`` with the
    other: (leader, the follower cut off)."""
    lead = c.elect()
    away = next(i for i in c.nodes if i != lead)
    c.partition({away}, set(c.nodes) - {away})
    for d in data:
        c.nodes[lead].core.propose(d.encode())
        c.process(lead)
        c.deliver()
    return lead, away


def _record_steps(c: Cluster, node: int) -> list[MsgType]:
    """The types of the messages ``node`` steps from now on, in order."""
    sent: list[MsgType] = []
    real_step = c.nodes[node].core.step

    def spy(m: Message) -> None:
        sent.append(m.type)
        real_step(m)

    c.nodes[node].core.step = spy  # type: ignore[method-assign]
    return sent


def test_leadership_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    """Thesis §3.10: a target missing entries gets them before TIMEOUT_NOW, so it
    can win the election (a stale log would lose it), and nothing is lost."""
    c = Cluster(3, seed=7)
    lead, target = _entries_while_a_follower_is_cut_off(c, [f"while-away-{i}" for i in range(5)])
    c.run(2)
    assert c.nodes[target].core.last_index < c.nodes[lead].core.last_index
    c.heal()
    sent = _record_steps(c, target)
    c.nodes[lead].core.transfer_leadership(target)
    c.process(lead)
    c.deliver()
    c.run(8)
    assert c.leader() == target
    appends = [i for i, t in enumerate(sent) if t == MsgType.APP]
    assert appends and MsgType.TIMEOUT_NOW in sent
    assert appends[0] < sent.index(MsgType.TIMEOUT_NOW)  # caught up, then told to campaign
    data = [e.data for e in c.nodes[target].core.log if e.data]
    assert [f"while-away-{i}".encode() for i in range(5)] == [d for d in data
                                                                if d.startswith(b"while")]
    c.check_invariants()


@pytest.mark.parametrize("seed", range(int(os.environ.get("RAFT_SEEDS", "300"))))
def test_random_faults_never_break_safety(seed: int) -> None:
    """Drops, duplicates, reordering, partitions, snapshots (§7) and crash-restarts
    from disk: one
    leader per term, identical applied prefixes, committed entries never change or
    vanish; and progress once healed."""
    rng = random.Random(seed)
    c = Cluster(rng.choice([3, 5]), seed=seed)
    proposed = 0
    for step in range(300):
        if step % 50 == 0:
            c.split_at_random(rng)
        lead = c.leader()
        if lead is not None and rng.random() < 0.3:
            try:
                c.nodes[lead].core.propose(f"{seed}-{proposed}".encode())
                proposed += 1
            except ProposalDropped:
                pass
            c.process(lead)
        if rng.random() < 0.02:
            c.crash_restart(rng.choice(list(c.nodes)))
        if rng.random() < 0.03:
            c.compact(rng.choice(list(c.nodes)))
        c.run(1, drop=0.1, dup=0.05, shuffle=True)
        c.check_invariants()
    c.heal()
    lead = c.elect(max_ticks=500)
    c.nodes[lead].core.propose(b"final")
    c.process(lead)
    c.run(40)
    c.check_invariants()
    for nd in c.nodes.values():
        assert nd.applied and nd.applied[-1].data == b"final", f"seed {seed}: no progress"


def _leader_with_one_follower(**settings: Any) -> RaftCore:
    """Node 1 of two, elected, its no-op acknowledged; ``settings`` go to its Config."""
    core = RaftCore(Config(1, (1, 2), pre_vote=False, **settings), random.Random(0))
    core.campaign()
    core.step(Message(MsgType.VOTE_RESP, 2, 1, term=1))
    core.advance(core.ready())
    core.step(Message(MsgType.APP_RESP, 2, 1, term=1, index=1))  # the no-op
    core.advance(core.ready())
    return core


def test_flow_control_bounds_bytes_per_message_and_messages_in_flight() -> None:
    """A slow follower gets at most max_inflight messages of at most
    max_bytes_per_msg entry bytes; acknowledgements release more."""
    core = _leader_with_one_follower(max_bytes_per_msg=1000, max_inflight=2)
    for i in range(10):
        core.propose(bytes([i]) * 600)  # two entries never fit one message
    rd = core.ready()
    apps = [m for m in rd.messages if m.type == MsgType.APP and m.entries]
    assert len(apps) == 2
    assert all(len(m.entries) == 1 for m in apps)
    core.advance(rd)
    core.step(Message(MsgType.APP_RESP, 2, 1, term=1, index=apps[0].entries[-1].index))
    more = [m for m in core.ready().messages if m.type == MsgType.APP and m.entries]
    assert len(more) == 1  # one acknowledged, one more sent


def _heartbeat_round(core: RaftCore) -> int:
    """Tick until the leader sends a heartbeat round; its stamp."""
    for _ in range(core.cfg.heartbeat_tick):
        core.tick()
    rd = core.ready()
    [hb] = [m for m in rd.messages if m.type == MsgType.HEARTBEAT]
    core.advance(rd)
    return hb.stamp


def _apps(core: RaftCore) -> list[Message]:
    rd = core.ready()
    core.advance(rd)
    return [m for m in rd.messages if m.type == MsgType.APP and m.entries]


def test_an_append_in_flight_is_not_sent_again_for_an_earlier_heartbeat() -> None:
    """§5.3 retries lost appends. A heartbeat the leader sent before an append,
    answered while the append is still on its way (a large entry being written),
    proves nothing lost: the append is not sent again (it used to be, once per
    heartbeat, so each large entry could cross the network twice)."""
    core = _leader_with_one_follower()
    before = _heartbeat_round(core)
    core.propose(b"x" * 4096)
    [app] = _apps(core)
    core.step(Message(MsgType.HEARTBEAT_RESP, 2, 1, term=1, stamp=before))
    assert _apps(core) == []  # still in flight: nothing sent again
    core.step(Message(MsgType.APP_RESP, 2, 1, term=1, index=app.entries[-1].index))
    assert core.commit == app.entries[-1].index


def test_an_append_lost_on_the_way_is_sent_again_after_a_later_heartbeat() -> None:
    """The follower answered a heartbeat the leader sent after the append without
    acknowledging the append: on an ordered channel the append was lost, so the
    leader sends it again from the follower's match."""
    core = _leader_with_one_follower()
    core.propose(b"x" * 4096)
    [app] = _apps(core)
    after = _heartbeat_round(core)
    core.step(Message(MsgType.HEARTBEAT_RESP, 2, 1, term=1, stamp=after))
    [again] = _apps(core)
    assert again.index == app.index and again.entries == app.entries


def test_a_follower_behind_a_compacted_log_catches_up_by_snapshot() -> None:
    """§7: entries a follower needs were compacted away, so the leader sends its
    snapshot; the follower restores it and continues from there."""
    c = Cluster(3, seed=8)
    lead, slow = _entries_while_a_follower_is_cut_off(c, [f"e{i}" for i in range(10)])
    c.run(3)
    c.compact(lead)
    assert c.nodes[lead].core.snap_index > 1
    sent = _record_steps(c, slow)
    c.heal()
    c.run(5)
    assert MsgType.SNAP in sent
    follower = c.nodes[slow]
    assert [e.data for e in follower.applied if e.data] == [f"e{i}".encode() for i in range(10)]
    assert follower.core.snap_index == c.nodes[lead].core.snap_index
    c.nodes[lead].core.propose(b"after")
    c.process(lead)
    c.run(3)
    assert follower.applied[-1].data == b"after"
    c.check_invariants()


def test_compaction_only_covers_applied_entries() -> None:
    """§7: a snapshot covers only entries the state machine applied."""
    core = RaftCore(Config(1, (1,)), random.Random(0))
    core.campaign()
    core.advance(core.ready())
    with pytest.raises(ValueError, match="compact"):
        core.compact(5, b"")


@pytest.mark.parametrize("seed", range(20))
def test_a_large_snapshot_arrives_in_checked_chunks_despite_drops(seed: int) -> None:
    """Thesis §5.3: the snapshot travels in chunks; a dropped or repeated chunk is
    resent from the offset the follower reports, and a corrupted one (caught by the
    CRC) restarts the transfer."""
    rng = random.Random(seed)
    c = Cluster(3, seed=seed, snapshot_chunk_bytes=512)
    lead = c.elect()
    slow = next(i for i in c.nodes if i != lead)
    c.partition({slow}, set(c.nodes) - {slow})
    for i in range(40):
        c.nodes[lead].core.propose(bytes([i]) * 50)
        c.process(lead)
        c.deliver()
    c.run(3)
    c.compact(lead)
    assert len(c.nodes[lead].core.snapshot.data) > 5 * 512  # type: ignore[union-attr]
    real_step = c.nodes[slow].core.step
    corrupted = []

    def flaky(m: Message) -> None:
        if m.type == MsgType.SNAP and m.snapshot and m.snapshot.data and not corrupted \
                and rng.random() < 0.3:
            bad = bytes([m.snapshot.data[0] ^ 0xFF]) + m.snapshot.data[1:]
            corrupted.append(m.snap_offset)
            m = Message(**{**m.__dict__, "snapshot": type(m.snapshot)(
                m.snapshot.index, m.snapshot.term, bad)})
        real_step(m)

    c.nodes[slow].core.step = flaky  # type: ignore[method-assign]
    c.heal()
    for _ in range(200):
        c.run(1, drop=0.2, dup=0.1, shuffle=True)
        if len(c.nodes[slow].applied) >= 41:
            break
    assert [e.data for e in c.nodes[slow].applied[1:41]] == [bytes([i]) * 50 for i in range(40)]
    c.check_invariants()


def test_read_index_confirms_leadership_with_a_quorum_first() -> None:
    """Thesis §6.4: a read is served at the commit index only after a majority
    acknowledged a heartbeat sent after the read arrived."""
    c = Cluster(3, seed=9)
    lead = c.elect()
    core = c.nodes[lead].core
    core.read_index(b"r1")
    assert not core.read_states
    reads: list[tuple[bytes, int]] = []
    real_ready = core.ready

    def spy() -> Any:
        rd = real_ready()
        reads.extend(rd.reads)
        return rd

    core.ready = spy  # type: ignore[method-assign]
    c.process(lead)
    c.deliver()
    assert reads == [(b"r1", core.commit)]


def test_a_cut_off_leader_never_confirms_a_read() -> None:
    """§8 (thesis §6.4): a ReadIndex read is served only after a quorum confirms the
    leadership; a leader cut off from the majority never confirms one."""
    c = Cluster(3, seed=10)
    lead = c.elect()
    c.partition({lead}, set(c.nodes) - {lead})
    core = c.nodes[lead].core
    core.read_index(b"stale?")
    c.process(lead)
    c.run(30)
    assert not core.read_states and b"stale?" not in core._reads  # dropped on stepping down
    follower = next(i for i in c.nodes if i != lead)
    with pytest.raises(ProposalDropped):
        c.nodes[follower].core.read_index(b"x")


# -- leases (thesis §6.4.1) ---------------------------------------------------------------


def test_the_lease_stamp_is_the_newest_heartbeat_round_a_quorum_acknowledged() -> None:
    c = Cluster(3, seed=11, lease_reads=True)
    lead = c.elect()
    core = c.nodes[lead].core
    c.run(2)
    acked = core.lease_stamp()
    assert acked == core.stamp > 0  # every round so far was answered
    c.partition({lead}, set(c.nodes) - {lead})
    c.run(1)
    assert core.stamp > acked and core.lease_stamp() == acked  # the new round is not
    c.heal()
    c.run(1)
    assert core.lease_stamp() == core.stamp
    follower = next(i for i in c.nodes if i != lead)
    assert c.nodes[follower].core.lease_stamp() == 0
    core.transfer_leadership(follower)
    assert core.lease_stamp() == 0  # handing over: the follower may win votes at once
    c.partition({follower}, set(c.nodes) - {follower})  # its campaign never arrives
    c.process(lead)
    c.run(core.cfg.election_tick + 2)
    assert core.role == Role.LEADER and core.transferee == 0  # the transfer was abandoned
    assert core.lease_stamp() == 0  # but its late votes would still ignore leases
    plain = Cluster(3, seed=11)
    plain_lead = plain.elect()
    plain.run(2)
    assert plain.nodes[plain_lead].core.lease_stamp() == 0  # leases not configured


def test_a_restarted_node_refuses_votes_for_its_first_election_timeout() -> None:
    """It may have acknowledged a leader's lease just before it crashed, and has
    forgotten when: it votes only once an election timeout has passed."""
    c = Cluster(3, seed=12, lease_reads=True, pre_vote=False)
    lead = c.elect()
    voter = next(i for i in c.nodes if i != lead)
    candidate = next(i for i in c.nodes if i not in (lead, voter))
    c.crash_restart(voter)
    core = c.nodes[voter].core
    term = core.term
    ask = Message(MsgType.VOTE, candidate, voter, term + 1, log_term=core.term_at(
        core.last_index) or 0, index=core.last_index)
    for _ in range(core.cfg.election_tick - 1):
        core.tick()
        core.step(ask)
        assert core.term == term and not any(m.type == MsgType.VOTE_RESP for m in core.msgs)
    core.tick()
    core.step(ask)
    assert core.term == term + 1 and core.vote == candidate


@pytest.mark.parametrize("seed", range(int(os.environ.get("RAFT_SEEDS", "300")) // 3))
def test_a_leader_within_its_lease_holds_the_newest_commit(seed: int) -> None:
    """Random partitions, drops, duplicates, late messages, crash-restarts (half
    of them reported to the other nodes, as a supervisor does: ``peer_down``) and
    stalls (a node that neither ticks nor hears anything for up to three election
    timeouts, as a SIGSTOPped process), the other nodes ticking at the same rate: whenever a
    leader's lease holds (a round a quorum acknowledged, sent less than
    election_tick - 2 ticks ago, as the replica driver counts it on its clock), no
    node has committed past it, so a read served at its commit index is current."""
    rng = random.Random(seed)
    c = Cluster(rng.choice([3, 5]), seed=seed, lease_reads=True)
    e = c.nodes[1].core.cfg.election_tick
    lease = e - 2
    sent: dict[tuple[int, int], int] = {}  # (node, stamp) -> the tick it was sent at
    stalled: dict[int, int] = {}  # node -> the tick it wakes at
    late: list[tuple[int, Message]] = []  # (tick it arrives at, message)
    served = 0
    split = c.cut
    for now in range(400):
        if now % 40 == 0:
            c.split_at_random(rng)
            split = c.cut
        if rng.random() < 0.04:
            stalled[rng.choice(list(c.nodes))] = now + rng.randrange(1, 3 * e)
        asleep = {i for i, until in stalled.items() if until > now}
        c.cut = split | {frozenset((i, j)) for i in asleep for j in c.nodes if j != i}
        lead = c.leader()
        if lead is not None and lead not in asleep and rng.random() < 0.3:
            with contextlib.suppress(ProposalDropped):
                c.nodes[lead].core.propose(b"x")
            c.process(lead)
        if rng.random() < 0.03:
            victim = rng.choice(list(c.nodes))
            c.crash_restart(victim)
            sent = {k: t for k, t in sent.items() if k[0] != victim}
            if rng.random() < 0.5:  # its supervisor reports the death (what the dead
                for i in c.nodes:  # process sent may still arrive, late)
                    if i != victim and i not in asleep:
                        c.nodes[i].core.peer_down(victim)
                        c.process(i)
        before = {i: nd.core.stamp for i, nd in c.nodes.items()}
        for i in c.nodes:
            if i not in asleep:
                c.tick(i)
        for m in c.queue:  # a fifth of what the ticks sent arrives up to 2e ticks late
            if rng.random() < 0.2:
                late.append((now + rng.randrange(1, 2 * e), m))
        c.queue = [m for m in c.queue if all(m is not x for _, x in late)]
        c.queue += [m for t, m in late if t <= now]
        late = [(t, m) for t, m in late if t > now]
        c.deliver(drop=0.15, dup=0.05, shuffle=True)
        newest = max(nd.core.commit for nd in c.nodes.values())
        for i, nd in c.nodes.items():
            if nd.core.stamp != before[i]:
                sent[(i, nd.core.stamp)] = now
            stamp = nd.core.lease_stamp()
            if stamp and now < sent.get((i, stamp), -lease) + lease:
                served += 1
                assert nd.core.commit == newest, f"seed {seed}: stale lease on node {i}"
        c.check_invariants()
    assert served  # leases did hold for part of the run


def _pump(c: Cluster, pred: Any, drop: Any = lambda m: False) -> None:
    """Deliver the queued messages ``pred`` picks (the rest stay queued); ``drop``
    loses some of them."""
    go = [m for m in c.queue if pred(m)]
    c.queue = [m for m in c.queue if not pred(m)]
    for m in go:
        if frozenset((m.frm, m.to)) not in c.cut and not drop(m):
            c.nodes[m.to].core.step(m)
            c.process(m.to)


def _leader_cut_from_a_candidate() -> tuple[Cluster, int, int, int]:
    """3 nodes with leases: (cluster, leader, follower, candidate), the candidate
    unable to reach the leader."""
    c = Cluster(3, seed=5, lease_reads=True)
    lead = c.elect()
    c.run(3)
    f, cand = [i for i in c.nodes if i != lead]
    c.cut = {frozenset((lead, cand))}
    return c, lead, f, cand


def test_the_vote_after_a_won_pre_vote_respects_a_lease_acknowledged_in_between() -> None:
    """A follower grants a pre-vote, then hears from the leader (which was stalled)
    and acknowledges a heartbeat round: the candidate's real vote request, which
    follows, must not get its vote while that lease holds."""
    c, lead, f, cand = _leader_cut_from_a_candidate()
    lc, fc, cc = (c.nodes[i].core for i in (lead, f, cand))
    e = lc.cfg.election_tick
    fc.timeout, cc.timeout = 10 * e, e + 1
    while cc.role != Role.PRE_CANDIDATE:  # the leader is stalled: it does not tick
        c.tick(f)
        c.tick(cand)
        _pump(c, lambda m: lead not in (m.frm, m.to))
    c.queue = [m for m in c.queue if m.to != lead]
    _pump(c, lambda m: m.type == MsgType.PRE_VOTE and m.to == f)  # granted: no lease yet
    c.tick(lead)  # the leader wakes: a heartbeat round, acknowledged by the follower
    _pump(c, lambda m: m.type in (MsgType.HEARTBEAT, MsgType.HEARTBEAT_RESP))
    _pump(c, lambda m: m.type == MsgType.HEARTBEAT_RESP)
    stamp = lc.lease_stamp()
    assert stamp == lc.stamp > 0
    for _ in range(3):
        _pump(c, lambda m: lead not in (m.frm, m.to))
    assert cc.role != Role.LEADER and fc.vote != cand
    assert lc.lease_stamp() == stamp  # and it keeps its lease


def test_a_term_change_does_not_end_a_followers_promise_to_a_lease() -> None:
    """A follower that acknowledged a lease is moved to a higher term (a rejection of
    its own late pre-vote carries it), which forgets its leader: it still refuses
    votes until an election timeout after that acknowledgement."""
    c, lead, f, cand = _leader_cut_from_a_candidate()
    lc, fc, cc = (c.nodes[i].core for i in (lead, f, cand))
    e = lc.cfg.election_tick
    fc.timeout, cc.timeout = e + 2, e + 1

    def both() -> None:
        c.tick(f)
        c.tick(cand)

    while cc.role != Role.CANDIDATE:  # the leader stalled; the candidate's votes are lost
        both()
        _pump(c, lambda m: lead not in (m.frm, m.to), drop=lambda m: m.type == MsgType.VOTE)
    cc.timeout = e
    while fc.role != Role.PRE_CANDIDATE:
        both()
    late = [m for m in c.queue if m.type == MsgType.PRE_VOTE and m.frm == f]
    c.queue = [m for m in c.queue if m not in late and m.to != lead]
    both()
    c.tick(lead)  # the leader wakes; the follower acknowledges its round
    _pump(c, lambda m: m.type == MsgType.HEARTBEAT and m.to == f)
    _pump(c, lambda m: m.type == MsgType.HEARTBEAT_RESP)
    stamp = lc.lease_stamp()
    assert stamp > 0
    c.queue += late
    _pump(c, lambda m: m.type in (MsgType.PRE_VOTE, MsgType.PRE_VOTE_RESP))
    _pump(c, lambda m: m.type == MsgType.PRE_VOTE_RESP)
    assert fc.term > lc.term and fc.lead == 0  # moved on, its leader forgotten
    for _ in range(e - 2):  # the lease's length; the leader's messages are slow
        both()
        c.tick(lead)
        for _ in range(4):
            _pump(c, lambda m: True, drop=lambda m: lead in (m.frm, m.to))
        assert cc.role != Role.LEADER, "a second leader while the lease holds"


# -- a supervisor reports a dead process (peer_down) -----------------------------------


def _kill(c: Cluster, dead: int) -> None:
    """The process of node ``dead`` is gone: cut off from everyone (what it sent and
    what was sent to it stays queued, as in the kernel's buffers)."""
    c.cut |= {frozenset((dead, j)) for j in c.nodes if j != dead}


def _ticks_to_new_leader(c: Cluster, dead: int, limit: int) -> int | None:
    live = [i for i in c.nodes if i != dead]
    for t in range(1, limit + 1):
        for i in live:
            c.tick(i)
        c.deliver()
        lead = c.leader()
        if lead is not None and lead != dead:
            return t
    return None


def test_a_dead_leader_reported_by_its_supervisor_is_replaced_at_the_next_tick() -> None:
    """Without the report the followers wait out an election timeout and keep their
    promise to the dead leader's lease; with it, the lowest live id campaigns at its
    next tick and the others vote for it."""
    for told in (False, True):
        c = Cluster(3, seed=31, lease_reads=True)
        lead = c.elect()
        c.run(3)
        _kill(c, lead)
        if told:
            for i in c.nodes:
                if i != lead:
                    c.nodes[i].core.peer_down(lead)
                    c.process(i)
        e = c.nodes[lead].core.cfg.election_tick
        ticks = _ticks_to_new_leader(c, lead, 3 * e)
        assert ticks is not None
        if told:
            assert ticks == 1 and c.leader() == min(i for i in c.nodes if i != lead)
            assert sum(c.nodes[i].core.notices for i in c.nodes if i != lead) == 2
        else:
            assert ticks >= e  # an election timeout at least
        c.check_invariants()


def test_a_report_of_a_follower_or_of_a_leader_not_followed_changes_nothing() -> None:
    c = Cluster(3, seed=32, lease_reads=True)
    lead = c.elect()
    c.run(2)
    a, b = (i for i in c.nodes if i != lead)
    core = c.nodes[a].core
    before = (core.lead, core.timeout, core.election_elapsed, core._quiet_until)
    core.peer_down(b)  # a follower: no leader lost
    core.peer_down(a)  # itself
    core.peer_down(99)  # not a peer
    assert (core.lead, core.timeout, core.election_elapsed, core._quiet_until) == before
    assert core.notices == 0
    lc = c.nodes[lead].core
    lc.peer_down(a)  # a leader has nothing to wait for
    assert lc.role == Role.LEADER and lc.notices == 0


def test_what_a_dead_leader_sent_before_it_died_is_dropped() -> None:
    """A heartbeat still on its way when the report arrives would make the follower
    take the dead node for its leader again (and refuse votes for it)."""
    c = Cluster(3, seed=33, lease_reads=True)
    lead = c.elect()
    c.run(2)
    c.tick(lead)  # a heartbeat round, not delivered yet
    late = [m for m in c.queue if m.frm == lead and m.type == MsgType.HEARTBEAT]
    assert late
    c.queue = []
    _kill(c, lead)
    for i in c.nodes:
        if i != lead:
            c.nodes[i].core.peer_down(lead)
    for m in late:
        c.nodes[m.to].core.step(m)
        c.process(m.to)
        assert c.nodes[m.to].core.lead == 0
    assert _ticks_to_new_leader(c, lead, 1) == 1


def test_when_the_first_live_peer_cannot_win_the_next_one_does() -> None:
    """The lowest live id campaigns first, but its log lacks a committed entry: the
    other refuses it (§5.4.1) and campaigns itself two heartbeats later. Nothing
    committed is lost."""
    c = Cluster(3, seed=34, lease_reads=True)
    lead = c.elect()
    c.run(2)
    low, high = sorted(i for i in c.nodes if i != lead)
    c.cut = {frozenset((lead, low))}
    c.nodes[lead].core.propose(b"only on two")
    c.process(lead)
    c.deliver()
    lc = c.nodes[lead].core
    assert lc.commit == lc.last_index == c.nodes[high].core.last_index  # on 2 of 3: committed
    assert c.nodes[low].core.last_index < lc.last_index
    c.heal()
    _kill(c, lead)
    for i in (low, high):
        c.nodes[i].core.peer_down(lead)
        c.process(i)
    ticks = _ticks_to_new_leader(c, lead, 10)
    hb = c.nodes[high].core.cfg.heartbeat_tick
    assert c.leader() == high and ticks is not None and 1 < ticks <= 1 + 2 * hb + 1
    for _ in range(3):
        c.run(1)
    assert b"only on two" in [e.data for e in c.nodes[low].applied]
    c.check_invariants()
