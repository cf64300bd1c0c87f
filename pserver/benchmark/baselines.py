"""Side-by-side baselines for pserver benchmarks (public APIs only).

Owns the reference points every pserver figure is quoted against:

- ``EchoServer.round``: a raw pyzmq DEALER/ROUTER echo of the same bytes in the
  same chunking (chunks of ``chunk_bytes`` sent as zero-copy frames of
  ``frame_bytes``, ``window`` chunks in flight, the reply copied into a
  preallocated array): **the transport limit** for one worker's push+pull.
- ``EchoServer.roundtrips``: lockstep round trips of one small message through
  the same DEALER/ROUTER pair: **the small-request latency limit**.
- ``memory_bandwidth``: numpy ``a += b`` bytes read+written per second: **the
  memory limit** of a summing server.

The echo server runs in its own process (``python -m pserver.benchmark.baselines
ENDPOINT``), binds, prints its resolved endpoint on stdout and echoes every
message until it receives ``[b"stop"]``. Like a parameter server replying with
its own state, it sends back *copies* of the frames it received.
"""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from typing import Any

import numpy as np
import zmq

Array = np.ndarray[Any, Any]

HWM = 100_000
STOP = b"stop"


def bound_router(endpoint: str, hwm: int = 1000) -> tuple[zmq.Context[Any], Any, str]:
    """A ROUTER of a baseline server bound to ``endpoint`` (``tcp://HOST:0`` picks a
    free port), and the endpoint it is bound to."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        base = endpoint.rsplit(":", 1)[0]
        endpoint = f"{base}:{sock.bind_to_random_port(base)}"
    else:
        sock.bind(endpoint)
    return ctx, sock, endpoint


def _echo_main(endpoint: str) -> None:
    """The echo server process: bind ``endpoint``, print it, echo until ``stop``."""
    ctx, sock, endpoint = bound_router(endpoint, HWM)
    print(endpoint, flush=True)
    while True:
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 2 and parts[1].bytes == STOP:
            break
        # Echo back copies, as a server replying with its own state would.
        reply: list[Any] = [parts[0], parts[1]]
        reply.extend(bytes(p.buffer) for p in parts[2:])
        sock.send_multipart(reply, copy=False)
    sock.close(0)
    ctx.term()


class EchoServer:
    """A raw ROUTER echo server in its own process, and a DEALER talking to it.

    ``endpoint`` is ``tcp://HOST:0`` (a free port is picked) or ``ipc://PATH``.
    Use as a context manager, or call ``close``.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", start_timeout: float = 30.0) -> None:
        self.proc, self.endpoint = spawn_server("pserver.benchmark.baselines", endpoint,
                                                start_timeout, "echo server")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        self.sock.connect(self.endpoint)
        self._closed = False

    # -- measurements ---------------------------------------------------------------

    def round(
        self,
        data: Array,
        chunk_bytes: int = 4 << 20,
        frame_bytes: int = 1 << 20,
        window: int = 4,
        out: Array | None = None,
    ) -> float:
        """Seconds to send ``data`` and receive it back into ``out`` (allocated here
        when None): cut into chunks of ``chunk_bytes``, each sent as one message of
        zero-copy frames of ``frame_bytes``, ``window`` chunks in flight."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data  # bytes, no copy
        if out is None:
            out = np.empty(len(raw), np.uint8)
        dest = out.reshape(-1).view(np.uint8)
        if dest.size != len(raw):
            raise ValueError("out must have as many bytes as data")
        starts = list(range(0, len(raw), chunk_bytes)) or [0]
        t0 = time.perf_counter()
        sent = received = 0
        while received < len(starts):
            while sent < len(starts) and sent - received < window:
                c = raw[starts[sent] : starts[sent] + chunk_bytes]
                frames = [c[i : i + frame_bytes] for i in range(0, len(c), frame_bytes)] or [c]
                self.sock.send_multipart([sent.to_bytes(4, "little"), *frames], copy=False)
                sent += 1
            parts = self.sock.recv_multipart(copy=False)
            pos = starts[int.from_bytes(parts[0].bytes, "little")]
            for p in parts[1:]:
                b = np.frombuffer(p.buffer, dtype=np.uint8)
                dest[pos : pos + b.size] = b
                pos += b.size
            received += 1
        return time.perf_counter() - t0

    def roundtrips(self, payload: Array | bytes, count: int) -> list[float]:
        """Seconds of each of ``count`` lockstep round trips of ``payload`` (one frame,
        sent without a copy, the reply received without one)."""
        frame: Any = payload
        if not isinstance(payload, bytes):
            frame = np.ascontiguousarray(payload).reshape(-1).view(np.uint8).data
        tag = b"\0\0\0\0"
        sock = self.sock
        clock = time.perf_counter
        times: list[float] = []
        for _ in range(count):
            t0 = clock()
            sock.send_multipart([tag, frame], copy=False)
            sock.recv_multipart(copy=False)
            times.append(clock() - t0)
        return times

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.send_multipart([STOP], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._reap()  # before closing: linger 0 would drop the stop message
        self.sock.close(0)
        self.ctx.term()

    def _reap(self) -> None:
        reap(self.proc)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn_server(module: str, endpoint: str, timeout: float,
                 what: str) -> tuple[subprocess.Popen[str], str]:
    """Run ``python -m module endpoint`` and read the endpoint it prints once bound."""
    proc = subprocess.Popen([sys.executable, "-m", module, endpoint], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout):
            line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        reap(proc)
        raise RuntimeError(f"{what} for {endpoint} did not start")
    return proc, line


def reap(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Wait for ``proc`` (SIGKILL after ``timeout`` s) and close its stdout."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Best bytes/s of numpy ``a += b`` on float32 arrays of ``nbytes`` each,
    counting 3 x nbytes (read a and b, write a)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones(nbytes // 4, np.float32)
    a += b  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a += b
        best = min(best, time.perf_counter() - t)
    return 3 * nbytes / best


if __name__ == "__main__":
    try:
        _echo_main(sys.argv[1])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: no traceback
        sys.exit(130)
