"""clients/io.py against a bare ROUTER: sequence numbers and deadlines."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest
import zmq

from pserver.clients.io import IOEngine
from pserver.protocol.codec import decode_header, encode_header, reply_header
from pserver.protocol.errors import Unavailable
from pserver.protocol.schema import Header, Kind, Limits


@pytest.fixture
def router() -> Any:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield ctx, sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)
    ctx.term()


def _submit(engine: IOEngine, kind: Kind, rid: int, timeout: float = 10.0) -> Future[Any]:
    fut: Future[Any] = Future()
    engine.submit(0, Header(kind, rid), [], timeout, lambda h, _: fut.set_result(h),
                  fut.set_exception)
    return fut


def test_mutations_get_increasing_sequence_numbers_in_send_order(router: Any) -> None:
    """Whatever thread builds a request, a shard sees one client's mutations numbered
    1, 2, 3... in the order they arrive; reads carry no number."""
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: address}, Limits())
    futures: list[Future[Any]] = []
    lock = threading.Lock()

    def worker(base: int) -> None:
        for i in range(25):
            f = _submit(engine, Kind.PUSH if i % 5 else Kind.PULL, base + i)
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    seqs = []
    for _ in range(100):
        assert sock.poll(10_000)
        identity, raw = sock.recv_multipart()
        h = decode_header(raw, Limits())
        if h.kind == Kind.PUSH:
            seqs.append(h.seq)
        else:
            assert h.seq == 0
        sock.send_multipart([identity, encode_header(reply_header(h))])
    for t in threads:
        t.join()
    assert seqs == list(range(1, 81))
    for f in futures:
        f.result(timeout=10)
    engine.close()


def test_a_request_without_an_answer_fails_at_its_deadline(router: Any) -> None:
    ctx, _, address = router
    engine = IOEngine(ctx, {0: address}, Limits())
    fut = _submit(engine, Kind.PULL, 1, timeout=0.3)
    with pytest.raises(Unavailable) as info:
        fut.result(timeout=10)
    assert info.value.shard == 0
    engine.close()
