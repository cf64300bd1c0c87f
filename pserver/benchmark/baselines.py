"""Side-by-side baselines for pserver benchmarks (public APIs only).

Owns the reference points every pserver figure is quoted against:
- ``EchoServer`` / ``echo_round``: a raw pyzmq DEALER/ROUTER echo of the same
  bytes in the same chunking (chunks of ``chunk_bytes`` sent as frames of
  ``frame_bytes``, ``window`` chunks in flight): the transport limit.
- ``memory_bandwidth``: numpy ``a += b`` bytes read+written per second.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np
import zmq


def _echo_main(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if endpoint.endswith(":0"):
        port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
        endpoint = endpoint.rsplit(":", 1)[0] + f":{port}"
    else:
        sock.bind(endpoint)
    print(endpoint, flush=True)
    while True:
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 2 and parts[1].bytes == b"stop":
            break
        # Echo back copies, as a server replying with its own state would.
        sock.send_multipart([parts[0], *[bytes(p.buffer) for p in parts[1:]]], copy=False)
    sock.close(0)
    ctx.term()


class EchoServer:
    """A raw ROUTER echo server in its own process."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0") -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, endpoint],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint: str = self.proc.stdout.readline().strip()
        if not self.endpoint:
            raise RuntimeError("echo server failed to start")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(self.endpoint)

    def round(self, data: np.ndarray[Any, Any], chunk_bytes: int = 4 << 20,
              frame_bytes: int = 1 << 20, window: int = 4) -> float:
        """Seconds to send ``data`` and receive it back, chunked, ``window`` in flight."""
        raw = memoryview(data.reshape(-1)).cast("B")
        chunks = [raw[i : i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)] or [raw]
        out = np.empty_like(data).reshape(-1).view(np.uint8)
        t0 = time.perf_counter()
        sent = received = 0
        offsets = {}
        while received < len(chunks):
            while sent < len(chunks) and sent - received < window:
                c = chunks[sent]
                frames = [c[i : i + frame_bytes] for i in range(0, len(c), frame_bytes)] or [c]
                offsets[sent] = sent * chunk_bytes
                self.sock.send_multipart([sent.to_bytes(4, "little"), *frames], copy=False)
                sent += 1
            parts = self.sock.recv_multipart(copy=False)
            idx = int.from_bytes(parts[0].bytes, "little")
            pos = offsets.pop(idx)
            for p in parts[1:]:
                b = np.frombuffer(p.buffer, dtype=np.uint8)
                out[pos : pos + b.size] = b
                pos += b.size
            received += 1
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.send_multipart([b"stop"])
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close(0)
        self.ctx.term()


def memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Best bytes/s of numpy ``a += b`` counting 3 x nbytes (read a, b; write a)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a += b
        best = min(best, time.perf_counter() - t)
    return 3 * nbytes / best


if __name__ == "__main__":
    _echo_main(sys.argv[1])
