"""``pserver.torch``: the PyTorch shim (``DistributedOptimizer``, ``PSEmbedding``,
``state_dict_from_server``), defined in ``pserver.clients.torch``. Importing it
imports torch; importing ``pserver`` does not."""

from pserver.clients.torch import DistributedOptimizer, PSEmbedding, state_dict_from_server

__all__ = ["DistributedOptimizer", "PSEmbedding", "state_dict_from_server"]
