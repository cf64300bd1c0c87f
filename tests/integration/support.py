"""Helpers for the integration tests (real processes, real sockets, real signals):
``wait_until`` (poll a condition against a deadline, never sleep-and-hope),
process checks, bit-exact array comparison, key placement and ``RawPeer`` (a
bare ZeroMQ DEALER speaking crafted messages)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zmq

from pserver.protocol.codec import decode_header
from pserver.protocol.schema import Header, Limits

T = TypeVar("T")

# Replies may be larger than requests; decode them with generous caps.
REPLY_LIMITS = Limits(max_header_bytes=64 << 20, max_keys=1 << 20, max_frames=1 << 20,
                      max_request_bytes=1 << 40)


def wait_until(cond: Callable[[], T], timeout: float, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll ``cond`` until it returns a truthy value (returned) or ``timeout`` s pass
    (AssertionError naming ``what`` and the last value or exception seen)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = cond()
        except Exception as exc:  # a condition may fail while the system settles
            value, last = None, exc  # type: ignore[assignment]
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not true within {timeout} s (last: {last!r})")
        time.sleep(interval)


def run_workers(worker: Callable[[int], None], n: int, timeout: float) -> None:
    """Run ``worker(rank)`` for ranks 0..n-1 on threads (each opens its own client)
    and re-raise the first exception any of them raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            worker(rank)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"workers still running after {timeout} s"
    if errors:
        raise errors[0]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # state is the first field after the parenthesised command name
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def shard_pids(status: dict[str, Any]) -> list[int]:
    return [r["pid"] for s in status["shards"] for r in s["replicas"]]


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str = "array") -> None:
    """Same dtype, same shape and the very same bytes (bit-exact, NaN-safe), with a
    short message on failure even for large arrays."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    a = np.ascontiguousarray(got).reshape(-1).view(np.uint8)
    b = np.ascontiguousarray(want).reshape(-1).view(np.uint8)
    if not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0]) // max(1, want.itemsize)
        raise AssertionError(
            f"{what}: differs first at element {first}: "
            f"got {got.reshape(-1)[first]!r}, want {want.reshape(-1)[first]!r}")


def key_on_shard(shard_map: Any, shard: int, prefix: str) -> str:
    """The first key ``prefix-N`` whose part 0 lives on ``shard``."""
    for n in range(100_000):
        key = f"{prefix}-{n}"
        if shard_map.shard_for(key, 0) == shard:
            return key
    raise AssertionError(f"no key with prefix {prefix!r} on shard {shard}")


class RawPeer:
    """A bare DEALER: sends crafted multipart messages, receives decoded replies."""

    def __init__(self, ctx: zmq.Context[Any], address: str) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        self.sock.send_multipart(list(parts))

    def recv(self, timeout: float = 10.0) -> tuple[Header, list[bytes]]:
        if not self.sock.poll(timeout * 1000, zmq.POLLIN):
            raise AssertionError(f"no reply from {self.address} within {timeout} s")
        parts = self.sock.recv_multipart()
        return decode_header(parts[0], REPLY_LIMITS), parts[1:]

    def request(self, header_bytes: bytes, frames: Sequence[bytes | memoryview] = (),
                timeout: float = 10.0) -> tuple[Header, list[bytes]]:
        self.send([header_bytes, *frames])
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close(0)


def replica_statuses(client: Any) -> list[dict[str, Any]]:
    """Each replica's own STATUS (fields the cluster status leaves out, such as
    ``parked_reads``, ``barrier_waiting`` and ``workers``), asked directly: every
    replica of every shard (only a leader holds reads and barriers)."""
    from pserver.protocol.schema import Kind
    from pserver.protocol.transport import call

    return [call(client._ctx, replica["tcp"], Header(Kind.STATUS, 1), client.limits,
                 5.0)[0].opts
            for shard in client.cluster_map["shards"] for replica in shard["replicas"]]


def wait_parked(client: Any, n: int, timeout: float = 20.0) -> None:
    """Until the shards hold at least ``n`` reads back (sync/ssp) in all."""
    wait_until(lambda: sum(s["parked_reads"] for s in replica_statuses(client)) >= n, timeout,
               f"{n} parked reads")
