"""Sparse tables end to end: create_table, pull_rows, push_rows through 4 shards."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import pserver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(cluster4: Any) -> Any:
    with pserver.connect(cluster4.address, timeout=30.0) as c:
        yield c


def test_rows_spread_over_every_shard_and_round_trip(client: Any) -> None:
    assert client.create_table("t/spread", 8, optimizer={"name": "sum"}) is True
    assert client.create_table("t/spread", 8, optimizer={"name": "sum"}) is False
    ids = np.arange(20_000, dtype=np.uint64) * np.uint64(7919)
    g = np.random.default_rng(0).standard_normal((ids.size, 8)).astype(np.float32)
    assert not client.pull_rows("t/spread", ids).any()  # zeros before any push
    before = [s["rows"] for s in client.status()["shards"]]
    client.push_rows("t/spread", ids, g)
    np.testing.assert_array_equal(client.pull_rows("t/spread", ids), g)
    after = [s["rows"] for s in client.status()["shards"]]
    added = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(added) == ids.size
    assert min(added) > ids.size // 8  # every shard holds a fair share


def test_repeated_ids_are_summed_and_order_is_kept(client: Any) -> None:
    client.create_table("t/repeat", 2, optimizer={"name": "sgd", "lr": 1.0})
    ids = np.array([9, 4, 9, 9], np.int64)  # int64 ids are accepted
    client.push_rows("t/repeat", ids, np.ones((4, 2), np.float32))
    got = client.pull_rows("t/repeat", np.array([4, 9, 4], np.uint64))
    np.testing.assert_array_equal(got, [[-1, -1], [-3, -3], [-1, -1]])


def test_initial_values_are_the_same_from_any_client(client: Any, cluster4: Any) -> None:
    client.create_table("t/init", 16, init=("normal", 0.01))
    ids = np.array([1, 2, 3, 2**64 - 1], np.uint64)
    a = client.pull_rows("t/init", ids)
    with pserver.connect(cluster4.address) as other:
        b = other.pull_rows("t/init", ids[::-1].copy())
    np.testing.assert_array_equal(a, b[::-1])
    assert 0 < np.abs(a).mean() < 0.05


def test_bad_table_calls_give_typed_errors_and_change_nothing(client: Any) -> None:
    client.create_table("t/bad", 4, optimizer={"name": "sum"})
    ids = np.array([1, 2], np.uint64)
    with pytest.raises(pserver.KeyNotFound):
        client.pull_rows("t/missing", ids)
    with pytest.raises(pserver.ShapeMismatch):
        client.push_rows("t/bad", ids, np.ones((2, 5), np.float32))
    with pytest.raises(pserver.ShapeMismatch):
        client.push_rows("t/bad", ids, np.ones((2, 4), np.float64))
    with pytest.raises(pserver.ShapeMismatch):
        client.create_table("t/bad", 8)
    with pytest.raises(pserver.InvalidArgument):
        client.pull_rows("t/bad", np.ones((2, 2), np.uint64))
    with pytest.raises(pserver.InvalidArgument):
        client.create_table("t/bad-init", 4, init=("xavier",))
    for dim in (True, np.bool_(True), 2.0):  # the protocol refuses bools and floats
        with pytest.raises(pserver.InvalidArgument):
            client.create_table("t/bad-dim", dim)
    with pytest.raises(pserver.InvalidArgument):  # not numpy's float64 default
        client.create_table("t/bad-dtype", 4, dtype=None)  # type: ignore[arg-type]
    for name in ("t/bad-dim", "t/bad-dtype", "t/bad-init"):
        with pytest.raises(pserver.KeyNotFound):
            client.pull_rows(name, ids)
    assert not client.pull_rows("t/bad", ids).any()


def test_empty_id_lists_work(client: Any) -> None:
    client.create_table("t/empty", 3)
    assert client.pull_rows("t/empty", np.array([], np.uint64)).shape == (0, 3)
    client.push_rows("t/empty", np.array([], np.uint64), np.zeros((0, 3), np.float32))


def test_pushes_of_many_wide_rows_apply_every_row_once(client: Any) -> None:
    """12 MB of 400-byte rows: each shard's message holds several frames cut between
    rows, applied where they lie; a later push repeats ids across its frames (summed
    first). The result is exactly what numpy computes."""
    client.create_table("t/wide", 100, optimizer={"name": "sgd", "lr": 1.0})
    rng = np.random.default_rng(5)
    ids = np.unique(rng.integers(0, 2**63, 30_000).astype(np.uint64))
    g1 = rng.standard_normal((ids.size, 100)).astype(np.float32)
    client.push_rows("t/wide", ids, g1)
    want = -g1
    np.testing.assert_array_equal(client.pull_rows("t/wide", ids), want)
    again = np.concatenate([ids[:8000], ids[:8000]])  # each id twice, far apart
    g2 = rng.standard_normal((again.size, 100)).astype(np.float32)
    client.push_rows("t/wide", again, g2)
    want[:8000] -= g2[:8000] + g2[8000:]
    np.testing.assert_array_equal(client.pull_rows("t/wide", ids), want)
