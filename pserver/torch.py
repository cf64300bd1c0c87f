"""``pserver.torch``: the PyTorch shim (``DistributedOptimizer``, ``PSEmbedding``,
``register_ddp_hook``, ``state_dict_from_server``), defined in
``pserver.clients.torch``. Importing it imports torch; importing ``pserver``
does not."""

from pserver.clients.torch import (
    DistributedOptimizer,
    PSEmbedding,
    PSEmbeddingBag,
    register_ddp_hook,
    state_dict_from_server,
)

__all__ = ["DistributedOptimizer", "PSEmbedding", "PSEmbeddingBag", "register_ddp_hook",
           "state_dict_from_server"]
