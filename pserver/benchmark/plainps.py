"""The plain parameter server: what a simple implementation reaches.

Owns the baseline the issue calls "a single-process pyzmq parameter server
written in the plainest way": one process, one ROUTER socket, a dict of numpy
arrays, a msgpack header per request and the tensor cut into frames of 1 MiB
(without chunking, one 64 MiB ZeroMQ frame moves at a third of the speed here).
Every request names one key: ``init`` creates it, ``push_pull`` applies
``value -= lr * grad`` frame by frame and replies with copies of the new
value's frames. No validation beyond what numpy raises, no sharding, no
batching of keys, no replication, one request at a time.

``PlainServer`` runs it in its own process (``python -m
pserver.benchmark.plainps ENDPOINT``; it prints its endpoint and serves until
``stop``); ``PlainClient`` is its lockstep client: one request per key.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import numpy as np
import zmq

from .baselines import bound_router, reap, spawn_server

Array = np.ndarray[Any, Any]

FRAME_BYTES = 1 << 20
LR = 0.01
STOP = b"stop"


def _serve(endpoint: str) -> None:
    ctx, sock, endpoint = bound_router(endpoint)
    print(endpoint, flush=True)
    params: dict[str, Array] = {}
    while True:
        ident, head, *frames = sock.recv_multipart(copy=False)
        if head.bytes == STOP:
            break
        req = msgpack.unpackb(head.bytes)
        key = req["key"]
        if req["op"] == "init":
            params.setdefault(key, np.zeros(req["n"], np.float32))
            sock.send_multipart([ident, b"ok"])
            continue
        value = params[key]
        pos = 0
        for f in frames:
            g = np.frombuffer(f.buffer, np.float32)
            value[pos : pos + g.size] -= LR * g
            pos += g.size
        raw = value.view(np.uint8)
        reply = [raw[i : i + FRAME_BYTES].tobytes() for i in range(0, raw.size, FRAME_BYTES)]
        sock.send_multipart([ident, b"ok", *reply])
    sock.close(0)
    ctx.term()


class PlainServer:
    """The plain server in its own process; ``endpoint`` once it is up."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", start_timeout: float = 30.0) -> None:
        self.proc, self.endpoint = spawn_server("pserver.benchmark.plainps", endpoint,
                                                start_timeout, "the plain parameter server")

    def close(self) -> None:
        if self.proc.poll() is None:
            with PlainClient(self.endpoint) as c:
                c.sock.send_multipart([STOP])
        reap(self.proc)

    def __enter__(self) -> PlainServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainClient:
    """One DEALER; every call is one request and waits for its reply."""

    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        self.sock.connect(endpoint)

    def init(self, key: str, value: Array) -> None:
        self.sock.send_multipart([msgpack.packb({"op": "init", "key": key, "n": value.size})])
        self.sock.recv_multipart()

    def push_pull(self, key: str, grad: Array, out: Array) -> None:
        raw = np.ascontiguousarray(grad).reshape(-1).view(np.uint8).data
        frames = [raw[i : i + FRAME_BYTES] for i in range(0, len(raw), FRAME_BYTES)]
        self.sock.send_multipart([msgpack.packb({"op": "push_pull", "key": key}), *frames],
                                 copy=False)
        parts = self.sock.recv_multipart(copy=False)
        dest = out.reshape(-1).view(np.uint8)
        pos = 0
        for p in parts[1:]:
            b = np.frombuffer(p.buffer, np.uint8)
            dest[pos : pos + b.size] = b
            pos += b.size

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> PlainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    try:
        _serve(sys.argv[1])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: no traceback
        sys.exit(130)
