"""Client.barrier(): no worker passes until all num_workers have arrived."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import pserver

from .support import replica_statuses, wait_until

pytestmark = pytest.mark.integration


def _waiting(c: Any) -> int:
    return sum(s["barrier_waiting"] for s in replica_statuses(c))


def test_workers_wait_for_each_other_at_every_barrier(cluster4: Any) -> None:
    clients = [pserver.connect(cluster4.address, worker_id=i, num_workers=3, timeout=30.0)
               for i in range(3)]
    try:
        for round_ in range(2):
            done = [threading.Event() for _ in range(2)]

            def enter(i: int, done: list[threading.Event] = done) -> None:
                clients[i].barrier()
                done[i].set()

            threads = [threading.Thread(target=enter, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            wait_until(lambda: _waiting(clients[2]) >= 2, 20, "two workers at the barrier")
            assert not any(d.is_set() for d in done), f"round {round_}: passed too early"
            clients[2].barrier()  # the last one releases everybody
            for t in threads:
                t.join(20)
            assert all(d.is_set() for d in done)
    finally:
        for c in clients:
            c.close()


def test_a_missing_worker_makes_the_barrier_time_out(cluster4: Any) -> None:
    with pserver.connect(cluster4.address, worker_id=0, num_workers=2, timeout=0.5) as c, \
            pytest.raises(pserver.Unavailable):
        c.barrier()


def test_one_worker_passes_at_once_and_bad_worker_ids_are_refused(cluster4: Any) -> None:
    with pserver.connect(cluster4.address) as c:
        c.barrier()
    with pytest.raises(ValueError, match="worker_id"):
        pserver.connect(cluster4.address, worker_id=2, num_workers=2)
