"""pserver.aggregate: the leader's sync steps, one log entry per complete step."""

from __future__ import annotations

from typing import Any

import numpy as np

from pserver import aggregate, commands
from pserver.apply import apply_command, mutate
from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.schema import Header, Kind, Limits, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.shard import ShardStateMachine

LIMITS = Limits()


def _state(workers: int) -> ShardStateMachine:
    sm = ShardStateMachine(0, ShardMap.uniform(1))
    for key in ("a", "b"):
        meta = TensorMeta(key, 0, "float32", (4,), 0, 4, 1)
        h = Header(Kind.INIT, 1, tensors=(meta,),
                   opts={"optimizer": {"name": "sgd", "lr": 1.0}, "mode": "sync",
                         "workers": workers})
        mutate(sm, h, [[np.zeros(4, np.float32).tobytes()]])
    return sm


def _push(worker: int, seq: int, grads: dict[str, float]) -> tuple[Header, list[Any], bytes]:
    metas = tuple(TensorMeta(k, 0, "float32", (4,), 0, 4, 1) for k in grads)
    header = Header(Kind.PUSH, seq, client_id=f"w{worker}".encode(), seq=seq, tensors=metas,
                    opts={"worker": worker})
    raw = encode_header(header)
    return decode_header(raw, LIMITS), [[np.full(4, g, np.float32)] for g in grads.values()], raw


def test_a_step_is_logged_once_every_push_it_needs_arrived() -> None:
    """Worker 0 pushes a and b together, worker 1 separately: the step of a cannot go
    before b's, since worker 0's push is answered whole."""
    sm = _state(workers=2)
    agg = aggregate.StepAggregator(sm, 1 << 20)
    for token, (w, seq, grads) in enumerate([(0, 1, {"a": 1.0, "b": 2.0}),
                                             (1, 1, {"a": 3.0}), (1, 2, {"b": 6.0})]):
        header, data, raw = _push(w, seq, grads)
        assert agg.route(header) == aggregate.AGGREGATE
        agg.add(header, data, (1, token), raw)
        ready = agg.ready()
        assert (len(ready) == 1) == (token == 2), "the step went before all its pushes"
    (cmd,) = commands.decode(commands.encode(ready))
    assert [s[:4] for s in cmd.steps] == [("a", 0, 0, (0, 1)), ("b", 0, 0, (0, 1))]
    outcomes = apply_command(sm, cmd, LIMITS)
    assert [o.token for o in outcomes] == [(1, 0), (1, 1), (1, 2)]
    assert all(o.error is None for o in outcomes)
    np.testing.assert_array_equal(sm.slots[("a", 0)].value, -np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(sm.slots[("b", 0)].value, -np.full(4, 4.0, np.float32))
    assert sm.slots[("a", 0)].sync_step == 1 and sm.slots[("a", 0)].worker_steps == {0: 1, 1: 1}
    again = apply_command(sm, cmd, LIMITS)  # a replayed step never applies twice
    assert all(o.error is not None for o in again)
    np.testing.assert_array_equal(sm.slots[("a", 0)].value, -np.full(4, 2.0, np.float32))


def test_a_dropped_worker_no_longer_holds_the_step_back() -> None:
    sm = _state(workers=3)
    agg = aggregate.StepAggregator(sm, 1 << 20)
    for w in (0, 1):
        header, data, raw = _push(w, 1, {"a": float(w)})
        agg.add(header, data, (1, w), raw)
    assert agg.ready() == []
    sm.drop_worker(2)
    (cmd,) = agg.ready()
    assert cmd.steps[0][:4] == ("a", 0, 0, (0, 1))


def test_pushes_mixing_modes_or_meeting_buffered_state_are_logged_one_by_one() -> None:
    sm = _state(workers=2)
    agg = aggregate.StepAggregator(sm, 1 << 20)
    meta = TensorMeta("c", 0, "float32", (4,), 0, 4, 1)
    mutate(sm, Header(Kind.INIT, 1, tensors=(meta,)), [[np.zeros(4, np.float32).tobytes()]])
    mixed = Header(Kind.PUSH, 2, tensors=(TensorMeta("a", 0, "float32", (4,), 0, 4, 1), meta))
    assert agg.route(mixed) == aggregate.LOG
    header, data, _ = _push(0, 1, {"b": 1.0})
    sm.apply_push(header.tensors, data, header.opts)  # buffered in the replicated state
    assert agg.route(_push(1, 1, {"b": 1.0})[0]) == aggregate.LOG
