"""pserver.clients: the client library (numpy ``Client``; framework shims later).

Imports ``pserver.protocol`` and ``pserver.kernels``, never the server modules.
"""

from .client import Client, KeyMeta, cluster_status, connect

__all__ = ["Client", "KeyMeta", "cluster_status", "connect"]
