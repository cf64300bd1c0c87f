"""pserver.sessions: exactly-once application of mutations."""

from __future__ import annotations

import pytest

from pserver.protocol.errors import InvalidArgument
from pserver.sessions import Sessions


def test_a_repeated_mutation_gets_its_first_reply() -> None:
    s = Sessions()
    assert s.duplicate(b"c1", 1) is None
    s.record(b"c1", 1, {"created": [True]})
    assert s.duplicate(b"c1", 1) == {"created": [True]}
    assert s.duplicate(b"c1", 2) is None  # the next one is new
    assert s.duplicate(b"c2", 1) is None  # another client's numbers are its own


def test_requests_without_identity_are_never_deduplicated() -> None:
    s = Sessions()
    s.record(b"", 1, {})
    s.record(b"c", 0, {})
    assert s.duplicate(b"", 1) is None and s.duplicate(b"c", 0) is None
    assert len(s) == 0


def test_an_old_mutation_whose_reply_was_dropped_is_refused_not_reapplied() -> None:
    s = Sessions(replies_kept=2)
    for seq in (1, 2, 3):
        s.record(b"c", seq, {"seq": seq})
    assert s.duplicate(b"c", 3) == {"seq": 3}
    with pytest.raises(InvalidArgument):
        s.duplicate(b"c", 1)


def test_eviction_follows_activity_order_only() -> None:
    """Replicas must agree: the least recently active client goes first."""
    s = Sessions(max_sessions=2)
    s.record(b"a", 1, {})
    s.record(b"b", 1, {})
    s.record(b"a", 2, {})  # a is now the most recent
    s.record(b"c", 1, {})  # evicts b
    assert s.duplicate(b"a", 2) == {}
    assert s.duplicate(b"b", 1) is None  # forgotten: treated as new
    assert len(s) == 2


def test_mutations_arriving_out_of_order_are_each_applied_once() -> None:
    """A client redirected between replicas resends several mutations at once, so a
    shard may apply 4 before 3: 3 is still new, and both are duplicates after."""
    s = Sessions(replies_kept=4)
    s.record(b"c", 4, {"seq": 4})
    assert s.duplicate(b"c", 3) is None
    s.record(b"c", 3, {"seq": 3})
    assert s.duplicate(b"c", 3) == {"seq": 3} and s.duplicate(b"c", 4) == {"seq": 4}


def test_the_floor_survives_the_wire_form() -> None:
    s = Sessions(replies_kept=1)
    s.record(b"c", 1, {})
    s.record(b"c", 2, {})
    t = Sessions(replies_kept=1)
    t.load_wire(s.to_wire())
    with pytest.raises(InvalidArgument):
        t.duplicate(b"c", 1)
    assert t.duplicate(b"c", 2) == {} and t.duplicate(b"c", 3) is None
