"""The key -> shard map: a pure, serializable function with an epoch.

Owns where each key part lives. Keys are placed on a consistent-hash ring with
``vnodes`` virtual nodes per shard (xxh64), so adding a shard moves about 1/N
of the keys. Part ``p`` of a chunked key goes to the p-th shard after the
key's own shard in shard-id order, so one large tensor loads every shard
evenly. Client and server build the same map from the same wire dict.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import ProtocolError


@dataclass(frozen=True)
class ShardMap:
    """Placement of key parts on ``shard_ids`` (sorted, unique)."""

    shard_ids: tuple[int, ...]
    epoch: int = 1
    vnodes: int = 64
    seed: int = 0
    row_seed: int = 0  # rows of sparse tables go to shard_ids[splitmix64(id + row_seed) % N]
    _ring: tuple[tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.shard_ids or len(set(self.shard_ids)) != len(self.shard_ids):
            raise ProtocolError(f"shard ids must be non-empty and unique: {self.shard_ids}")
        if self.vnodes <= 0:
            raise ProtocolError("vnodes must be positive")
        object.__setattr__(self, "shard_ids", tuple(sorted(self.shard_ids)))
        points = sorted(
            (xxhash.xxh64_intdigest(f"shard-{s}#{v}".encode(), seed=self.seed), s)
            for s in self.shard_ids
            for v in range(self.vnodes)
        )
        object.__setattr__(
            self, "_ring", (tuple(p for p, _ in points), tuple(s for _, s in points))
        )

    @classmethod
    def uniform(cls, num_shards: int, epoch: int = 1) -> ShardMap:
        return cls(tuple(range(num_shards)), epoch)

    @property
    def num_shards(self) -> int:
        return len(self.shard_ids)

    def home(self, key: str) -> int:
        """The shard that owns part 0 of ``key``."""
        h = xxhash.xxh64_intdigest(key.encode("utf-8"), seed=self.seed)
        hashes, owners = self._ring
        i = bisect.bisect_right(hashes, h) % len(hashes)
        return owners[i]

    def row_shard_index(self, shard: int) -> int:
        """Rows hash to an index in [0, num_shards): the position in ``shard_ids``."""
        return self.shard_ids.index(shard)

    def shard_for(self, key: str, part: int = 0) -> int:
        """The shard that owns ``part`` of ``key``."""
        home = self.home(key)
        if part == 0:
            return home
        i = self.shard_ids.index(home)
        return self.shard_ids[(i + part) % len(self.shard_ids)]

    def to_wire(self) -> dict[str, Any]:
        return {
            "shard_ids": list(self.shard_ids),
            "epoch": self.epoch,
            "vnodes": self.vnodes,
            "seed": self.seed,
            "row_seed": self.row_seed,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ShardMap:
        try:
            return cls(
                tuple(int(s) for s in raw["shard_ids"]),
                int(raw["epoch"]),
                int(raw["vnodes"]),
                int(raw["seed"]),
                int(raw.get("row_seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed shard map: {exc}") from None
