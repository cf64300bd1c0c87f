"""Each side's CPU per 4 KiB push_pull when it never waits for the other.

    .venv/bin/python bench/hot_loops.py [--calls 10000] [--rounds 5]

``bench/profile_request.py`` times real lockstep round trips, in which each process
wakes up cold after the other side worked. This script times the same work hot:

- shard: ``ShardServer.handle`` on PUSH_PULL messages made up front (decode,
  validate, sessions, sgd, reply encoded and sent to a peer that is not there);
- client: ``Client.push_pull`` whose reply is queued on its socket before the
  call (the client's DEALER is pointed at a ROUTER this script answers from).

The gap between these figures and ``profile_request.py``'s is the cost of running
cold. Best of ``--rounds`` rounds; the ROUTER's own send is timed and reported.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import zmq

import pserver
from pserver.benchmark.scenarios import LocalCluster
from pserver.protocol.codec import encode_header, reply_header
from pserver.protocol.schema import Header, Kind, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.transport import Incoming
from pserver.server import ShardServer

GRAD = np.full(1024, 1e-3, np.float32)
META = (TensorMeta("k", 0, "float32", (GRAD.size,), 0, GRAD.size, 1),)


def shard_us(calls: int, rounds: int) -> float:
    server = ShardServer(0, ShardMap.uniform(1), ["tcp://127.0.0.1:0"])
    cid = b"hot-loop-client!"

    def message(kind: Kind, seq: int) -> Incoming:
        h = Header(kind, seq, client_id=cid, seq=seq, tensors=META)
        return Incoming(b"\0nobody", memoryview(encode_header(h)), [memoryview(GRAD)], [])

    server.handle(message(Kind.INIT, 1))
    msgs = [message(Kind.PUSH_PULL, i + 2) for i in range(calls * rounds)]
    best = float("inf")
    for r in range(rounds):
        t0 = time.perf_counter()
        for m in msgs[r * calls:(r + 1) * calls]:
            server.handle(m)
        best = min(best, (time.perf_counter() - t0) / calls)
    if server.errors:
        raise SystemExit(f"the shard answered {server.errors} messages with errors")
    server.close()
    return best * 1e6


def client_us(calls: int, rounds: int) -> tuple[float, float]:
    with LocalCluster.start(shards=1, replicas=1) as cluster:
        client = pserver.connect(cluster.address, ipc=False)
        try:
            client.init({"k": GRAD})
            ctx = zmq.Context.instance()
            router = ctx.socket(zmq.ROUTER)
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer = client._io._sockets[0][0].sock  # the rig reaches inside
            dealer.disconnect(client.endpoints[0][0])
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(encode_header(Header(Kind.PING, 1)))
            ident = router.recv_multipart()[0]
            first = 1 << 40
            replies = [encode_header(reply_header(Header(Kind.PUSH_PULL, first + n),
                                                  tensors=META))
                       for n in range(calls * rounds)]
            t0 = time.perf_counter()
            for h in replies[:calls]:
                router.send_multipart([ident, h, GRAD])
            router_us = (time.perf_counter() - t0) / calls * 1e6
            while dealer.poll(200):
                dealer.recv_multipart()
            client._ids = itertools.count(first)
            grads = {"k": GRAD}
            best = float("inf")
            for r in range(rounds):
                t0 = time.perf_counter()
                for h in replies[r * calls:(r + 1) * calls]:
                    router.send_multipart([ident, h, GRAD])
                    client.push_pull(grads)
                best = min(best, (time.perf_counter() - t0) / calls * 1e6)
                while router.poll(0):
                    router.recv_multipart()
            router.close(0)
        finally:
            client.close()
    return best - router_us, router_us


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"shard : {shard_us(args.calls, args.rounds):6.1f} µs per PUSH_PULL handled")
    client, router = client_us(args.calls, args.rounds)
    print(f"client: {client:6.1f} µs per push_pull (the rig's ROUTER send, {router:.1f} µs, "
          "taken off)")


if __name__ == "__main__":
    main()
