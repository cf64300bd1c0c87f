"""``pserver.keras``: the Keras 3 shim (``PSOptimizer``, ``PServerCallback``),
defined in ``pserver.clients.keras``. Importing it imports keras; importing
``pserver`` does not."""

from pserver.clients.keras import PServerCallback, PSOptimizer

__all__ = ["PSOptimizer", "PServerCallback"]
