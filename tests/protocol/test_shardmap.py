"""Unit tests for the key -> shard map."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from pserver.protocol.errors import ProtocolError
from pserver.protocol.shardmap import ShardMap


def _random_keys(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


KEYS = _random_keys(1000) + [f"layer{i}.weight" for i in range(200)]


@pytest.mark.parametrize("num_shards", [1, 2, 4, 7])
def test_map_rebuilt_from_wire_places_every_part_identically(num_shards: int) -> None:
    a = ShardMap.uniform(num_shards, epoch=3)
    b = ShardMap.from_wire(a.to_wire())
    assert b == a
    assert b.epoch == 3
    for key in KEYS:
        for part in range(5):
            assert b.shard_for(key, part) == a.shard_for(key, part)


def test_placement_does_not_depend_on_shard_id_order() -> None:
    a = ShardMap((0, 1, 2, 3))
    b = ShardMap((3, 1, 0, 2))
    assert b.shard_ids == (0, 1, 2, 3)
    assert all(a.shard_for(k, p) == b.shard_for(k, p) for k in KEYS for p in range(3))


def test_placement_is_within_the_shard_ids() -> None:
    m = ShardMap((10, 20, 30))
    assert {m.shard_for(k, p) for k in KEYS for p in range(4)} == {10, 20, 30}


def test_every_shard_gets_a_fair_share_of_keys() -> None:
    m = ShardMap.uniform(4)
    counts = Counter(m.home(k) for k in _random_keys(1000, seed=1))
    assert set(counts) == {0, 1, 2, 3}
    for shard, n in counts.items():
        assert 150 <= n <= 350, f"shard {shard} got {n} of 1000 keys: {counts}"


def test_home_is_part_zero() -> None:
    m = ShardMap.uniform(5)
    assert all(m.home(k) == m.shard_for(k, 0) == m.shard_for(k) for k in KEYS)


@pytest.mark.parametrize("num_shards", [2, 3, 4, 8])
def test_chunk_parts_of_one_key_spread_over_all_shards(num_shards: int) -> None:
    m = ShardMap.uniform(num_shards)
    for key in KEYS[:100]:
        owners = [m.shard_for(key, p) for p in range(num_shards)]
        assert sorted(owners) == list(range(num_shards)), (key, owners)
        # and the pattern repeats: part p and part p + N share a shard
        assert [m.shard_for(key, p + num_shards) for p in range(num_shards)] == owners


def test_adding_a_shard_moves_about_one_in_n_keys_and_only_to_the_new_shard() -> None:
    keys = _random_keys(2000, seed=2)
    before = ShardMap.uniform(4)
    after = ShardMap.uniform(5, epoch=2)
    moved = [k for k in keys if before.home(k) != after.home(k)]
    assert 0 < len(moved) < 0.35 * len(keys)
    assert {after.home(k) for k in moved} == {4}


def test_removing_a_shard_only_moves_its_keys() -> None:
    before = ShardMap((0, 1, 2, 3))
    after = ShardMap((0, 1, 3))
    for key in KEYS:
        if before.home(key) != 2:
            assert after.home(key) == before.home(key)


def test_different_seed_gives_a_different_placement() -> None:
    a = ShardMap.uniform(4)
    b = ShardMap((0, 1, 2, 3), seed=1)
    assert any(a.home(k) != b.home(k) for k in KEYS)


@pytest.mark.parametrize(
    ("shard_ids", "kwargs"),
    [
        pytest.param((), {}, id="empty"),
        pytest.param((0, 1, 1), {}, id="duplicate"),
        pytest.param((0, 1), {"vnodes": 0}, id="zero-vnodes"),
    ],
)
def test_bad_construction_raises(shard_ids: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        ShardMap(shard_ids, **kwargs)


def test_uniform_zero_shards_raises() -> None:
    with pytest.raises(ProtocolError):
        ShardMap.uniform(0)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"shard_ids": [], "epoch": 1, "vnodes": 64, "seed": 0}, id="empty-ids"),
        pytest.param({"shard_ids": [2, 2], "epoch": 1, "vnodes": 64, "seed": 0},
                     id="duplicate-ids"),
        pytest.param({"shard_ids": [0, 1], "epoch": 1, "vnodes": 64}, id="missing-seed"),
        pytest.param({"shard_ids": None, "epoch": 1, "vnodes": 64, "seed": 0}, id="ids-none"),
        pytest.param({"shard_ids": ["a"], "epoch": 1, "vnodes": 64, "seed": 0}, id="ids-not-int"),
        pytest.param({"shard_ids": [0], "epoch": "x", "vnodes": 64, "seed": 0}, id="bad-epoch"),
    ],
)
def test_bad_wire_map_raises(raw: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        ShardMap.from_wire(raw)
