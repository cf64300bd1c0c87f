"""pserver.kernels: the numeric core (update kernels, row-id hashing, row copies).

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
    from_bfloat16,
    from_float16,
    gather_rows,
    has_repeats,
    new_row_index,
    partition_by_shard,
    scatter_rows,
    segment_sum,
    sgd,
    shard_of_ids,
    to_bfloat16,
    to_float16,
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
    "from_bfloat16",
    "from_float16",
    "gather_rows",
    "partition_by_shard",
    "scatter_rows",
    "sgd",
    "shard_of_ids",
    "to_bfloat16",
    "to_float16",
    "RowIndex",
    "dedup_ids",
    "has_repeats",
    "new_row_index",
    "segment_sum",
]
