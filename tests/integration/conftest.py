"""Fixtures for the integration tests; the helpers themselves live in ``support.py``.

``cluster4`` and ``cluster_factory`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from .support import RawPeer


@pytest.fixture
def raw_peer() -> Iterator[Callable[[str], RawPeer]]:
    """Open bare DEALERs to any address; all are closed after the test."""
    ctx: zmq.Context[Any] = zmq.Context()
    peers: list[RawPeer] = []

    def open_peer(address: str) -> RawPeer:
        p = RawPeer(ctx, address)
        peers.append(p)
        return p

    yield open_peer
    for p in peers:
        p.close()
    ctx.term()
