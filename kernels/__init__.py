"""pserver.kernels: the numeric core (update kernels and row-id hashing).

Exports the dispatch functions only. A leaf package: it imports neither
``pserver.protocol`` nor the server or client modules.
"""

from .device import Memory
from .dispatch import (
    RowIndex,
    accumulate,
    adagrad,
    adam,
    aggregate,
    dedup_ids,
    default_backend,
    new_row_index,
    partition_by_shard,
    segment_sum,
    sgd,
    shard_of_ids,
)
from .errors import BackendUnavailable, KernelError

__all__ = [
    "BackendUnavailable",
    "KernelError",
    "Memory",
    "accumulate",
    "adagrad",
    "adam",
    "aggregate",
    "default_backend",
    "partition_by_shard",
    "sgd",
    "shard_of_ids",
    "RowIndex",
    "dedup_ids",
    "new_row_index",
    "segment_sum",
]
