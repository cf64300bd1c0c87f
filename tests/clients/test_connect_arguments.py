"""pserver.connect's arguments: a bad address, timeout or worker numbering is a
typed error at once, never a hang (an unparsable address once left a socket open
that made the client's cleanup wait forever)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pserver
from pserver.protocol.schema import MAX_WORKERS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["not-an-address", "tcp://nohost", "tcp://127.0.0.1:x",
                                     "ipc://", "udp://127.0.0.1:7000"])
def test_an_unparsable_address_is_invalid_argument(address: str) -> None:
    with pytest.raises(pserver.InvalidArgument, match="cannot connect"):
        pserver.connect(address, timeout=30.0)


@pytest.mark.timeout(60)
def test_pserver_status_with_an_unparsable_address_exits_with_an_error() -> None:
    done = subprocess.run([sys.executable, "-m", "pserver", "status", "--address",
                           "not-an-address"], check=False, capture_output=True, text=True,
                          timeout=50)
    assert done.returncode != 0
    assert "cannot connect to 'not-an-address'" in done.stderr


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), "5", None, True])
def test_a_timeout_that_is_no_positive_finite_number_is_refused(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout"):
        pserver.connect("tcp://127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize(("worker_id", "num_workers"), [
    (0, 0), (2, 2), (-1, 2), (0, MAX_WORKERS + 1), (0.0, 1), ("0", 1), (0, 2.0)])
def test_worker_numbering_outside_the_servers_range_is_refused(
        worker_id: object, num_workers: object) -> None:
    with pytest.raises(ValueError, match="worker_id"):
        pserver.connect("tcp://127.0.0.1:1", worker_id=worker_id,  # type: ignore[arg-type]
                        num_workers=num_workers, timeout=0.2)  # type: ignore[arg-type]


def test_numpy_integers_and_floats_are_taken_as_numbers() -> None:
    """Launchers and configs hand out numpy scalars: accepted (the bootstrap at
    this address is absent, so the connect ends Unavailable, not a TypeError)."""
    with pytest.raises(pserver.Unavailable):
        pserver.connect("tcp://127.0.0.1:1", worker_id=np.int64(1), num_workers=np.int32(2),
                        timeout=np.float32(0.2))  # type: ignore[arg-type]
