"""pserver.kernels: the numeric core (update kernels and row-id hashing).

Exports the dispatch functions only. A leaf package: it imports neither
``pserver.protocol`` nor the server or client modules.
"""

from .dispatch import accumulate, partition_by_shard, sgd, shard_of_ids
from .errors import BackendUnavailable, KernelError

__all__ = [
    "BackendUnavailable",
    "KernelError",
    "accumulate",
    "partition_by_shard",
    "sgd",
    "shard_of_ids",
]
