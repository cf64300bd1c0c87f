"""ShardServer with requests in shared memory (PROTOCOL.md §4.6), in this process on
a real ROUTER: data read in place, values written to the offered region, and a
parked read whose region became unusable answered with frames instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from pserver.protocol.codec import decode_header, encode_header
from pserver.protocol.schema import Header, Kind, Limits, ShmRef, TensorMeta
from pserver.protocol.shardmap import ShardMap
from pserver.protocol.shm import SHM_DIR, Arena, Block
from pserver.server import ShardServer

N = 1024  # float32 elements of the key


class Rig:
    def __init__(self) -> None:
        self.server = ShardServer(0, ShardMap.uniform(1), ["tcp://127.0.0.1:0"])
        self.ctx = zmq.Context()
        self.socks = []
        for _ in range(2):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.server.endpoints[0])
            self.socks.append(sock)
        self.arena = Arena()
        self.rid = 0

    def send(self, worker: int, header: Header, frames: list[Any] = ()) -> None:
        self.socks[worker].send_multipart([encode_header(header), *frames])
        incoming = self.server.endpoint.recv_within(5000)
        assert incoming is not None
        self.server.handle(incoming)

    def reply(self, worker: int) -> tuple[Header, list[bytes]] | None:
        if not self.socks[worker].poll(200):
            return None
        raw, *frames = self.socks[worker].recv_multipart()
        return decode_header(raw, Limits()), frames

    def header(self, kind: Kind, worker: int, **kw: Any) -> Header:
        self.rid += 1
        meta = TensorMeta("w", 0, "float32", (N,), 0, N, 1)
        return Header(kind, self.rid, client_id=b"c%d" % worker, seq=self.rid,
                      tensors=(meta,), opts={"worker": worker}, **kw)

    def block_with(self, grad: np.ndarray[Any, Any]) -> tuple[Block, ShmRef]:
        """A block holding ``grad`` in its first page, its reply region in the next."""
        block = self.arena.alloc(3 * 4096)
        assert block is not None and block.offset % 4096 == 0
        block.array(block.offset, grad.nbytes)[:] = grad.view(np.uint8)
        ref = ShmRef(block.name, ((block.offset, grad.nbytes),), (block.offset + 4096, 4096))
        return block, ref

    def close(self) -> None:
        self.arena.close()
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()
        self.server.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_values_are_written_into_the_offered_region(rig: Rig) -> None:
    rig.send(0, Header(Kind.INIT, 1, tensors=(TensorMeta("w", 0, "float32", (N,), 0, N, 1),),
                       opts={"optimizer": {"name": "sum"}}),
             [np.arange(N, dtype=np.float32).tobytes()])
    assert rig.reply(0)[0].error == 0
    block, ref = rig.block_with(np.ones(N, np.float32))
    rig.send(0, rig.header(Kind.PUSH_PULL, 0, shm=ref))
    got = rig.reply(0)
    assert got is not None
    h, frames = got
    assert (h.error, frames) == (0, [])
    assert h.shm is not None and h.shm.name == block.name
    ((off, n),) = h.shm.spans
    assert ref.out is not None and ref.out[0] <= off and off + n <= sum(ref.out)
    np.testing.assert_array_equal(block.array(off, n).view(np.float32),
                                  np.arange(N, dtype=np.float32) + 1)


def test_a_parked_read_whose_region_shrank_gets_frames(rig: Rig) -> None:
    """A sync PUSH_PULL waits for the other worker; meanwhile its segment shrinks
    below the reply region. The step's completion still answers both workers:
    this one with frames, the other one unharmed."""
    rig.send(0, Header(Kind.INIT, 1, tensors=(TensorMeta("w", 0, "float32", (N,), 0, N, 1),),
                       opts={"optimizer": {"name": "sum"}, "mode": "sync", "workers": 2}),
             [np.zeros(N, np.float32).tobytes()])
    assert rig.reply(0)[0].error == 0
    block, ref = rig.block_with(np.full(N, 2.0, np.float32))
    rig.send(0, rig.header(Kind.PUSH_PULL, 0, shm=ref))
    assert rig.reply(0) is None  # parked: worker 1 has not pushed the step
    os.truncate(os.path.join(SHM_DIR, block.name), block.offset + 4096)  # data stays
    rig.send(1, rig.header(Kind.PUSH_PULL, 1), [np.full(N, 4.0, np.float32).tobytes()])
    want = np.full(N, 3.0, np.float32)  # the mean of the step
    for worker in (0, 1):
        got = rig.reply(worker)
        assert got is not None, f"worker {worker} got no reply"
        h, frames = got
        assert (h.error, h.shm) == (0, None), h.message
        np.testing.assert_array_equal(np.frombuffer(frames[0], np.float32), want)
