"""``pserver.keras``: the Keras 3 shim (``PSOptimizer``, ``PSEmbedding``,
``PServerCallback``), defined in ``pserver.clients.keras``. Importing it imports
keras; importing ``pserver`` does not."""

from pserver.clients.keras import PSEmbedding, PServerCallback, PSOptimizer

__all__ = ["PSEmbedding", "PSOptimizer", "PServerCallback"]
