"""clients/io.py against a bare ROUTER: sequence numbers and deadlines."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from pserver.clients.io import SHM_MIN_BYTES, Completion, IOEngine, LazyFrame
from pserver.protocol.codec import decode_header, encode_header, reply_header
from pserver.protocol.errors import ProtocolError, Unavailable
from pserver.protocol.schema import Header, Kind, Limits, TensorMeta
from pserver.protocol.shm import Arena


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
    engine = IOEngine(ctx, {0: [address]}, Limits())
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
    engine = IOEngine(ctx, {0: [address]}, Limits())
    fut = _submit(engine, Kind.PULL, 1, timeout=0.3)
    with pytest.raises(Unavailable) as info:
        fut.result(timeout=10)
    assert info.value.shard == 0
    engine.close()


@pytest.fixture
def two_replicas() -> Any:
    """Two bare ROUTERs standing in for two replicas of shard 0."""
    ctx = zmq.Context()
    socks, addrs = [], []
    for _ in range(2):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        addrs.append(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
        socks.append(sock)
    yield ctx, socks, addrs
    for sock in socks:
        sock.close(0)
    ctx.term()


def _recv(sock: Any, timeout_ms: int = 10_000) -> tuple[bytes, Header]:
    assert sock.poll(timeout_ms), "nothing arrived"
    identity, raw, *_ = sock.recv_multipart()
    return identity, decode_header(raw, Limits())


def test_a_not_leader_reply_sends_the_request_again_to_the_hinted_replica(
        two_replicas: Any) -> None:
    ctx, (follower, leader), addrs = two_replicas
    engine = IOEngine(ctx, {0: addrs}, Limits(), {0: {addrs[0]: 0, addrs[1]: 1}})
    try:
        fut = _submit(engine, Kind.PUSH, 7)
        identity, first = _recv(follower)
        follower.send_multipart([identity, encode_header(reply_header(
            first, error=8, message="not the leader", opts={"leader_hint": addrs[1]}))])
        identity, again = _recv(leader)
        assert (again.request_id, again.seq) == (first.request_id, first.seq) == (7, 1)
        leader.send_multipart([identity, encode_header(reply_header(again))])
        assert fut.result(timeout=10).request_id == 7
        fut2 = _submit(engine, Kind.PUSH, 8)  # the next one goes straight to the leader
        identity, nxt = _recv(leader)
        assert nxt.seq == 2
        leader.send_multipart([identity, encode_header(reply_header(nxt))])
        fut2.result(timeout=10)
    finally:
        engine.close()


def test_a_silent_leader_is_pinged_then_left_for_the_next_replica(two_replicas: Any) -> None:
    ctx, (dead, alive), addrs = two_replicas
    engine = IOEngine(ctx, {0: addrs}, Limits(), {0: {addrs[0]: 0, addrs[1]: 1}})
    try:
        fut = _submit(engine, Kind.PUSH, 9, timeout=20.0)
        _, _first = _recv(dead)  # it never answers: neither the request nor the ping
        _, ping = _recv(dead)
        assert ping.kind == Kind.PING
        identity, again = _recv(alive)
        assert (again.request_id, again.seq) == (9, 1)
        alive.send_multipart([identity, encode_header(reply_header(again))])
        assert fut.result(timeout=10).request_id == 9
    finally:
        engine.close()


def test_a_leader_that_answers_the_ping_keeps_the_request(two_replicas: Any) -> None:
    """A slow answer (a sync read waiting for other workers) is not a dead leader."""
    ctx, (slow, other), addrs = two_replicas
    engine = IOEngine(ctx, {0: addrs}, Limits(), {0: {addrs[0]: 0, addrs[1]: 1}})
    try:
        fut = _submit(engine, Kind.PULL, 11, timeout=20.0)
        identity, req = _recv(slow)
        for _ in range(3):  # several attempt periods, each checked with a ping
            _, ping = _recv(slow)
            assert ping.kind == Kind.PING
            slow.send_multipart([identity, encode_header(reply_header(
                ping, opts={"role": "leader"}))])
        assert not other.poll(0), "the request went to another replica"
        slow.send_multipart([identity, encode_header(reply_header(req))])
        assert fut.result(timeout=10).request_id == 11
    finally:
        engine.close()


def test_a_completion_gives_its_result_once_and_the_same_future_every_time() -> None:
    """The first outcome wins; a Future asked for before or after completion
    completes with it."""
    early: Completion[int] = Completion()
    before = early.as_future()
    assert not early.done() and not before.done()
    early.set_result(7)
    early.set_exception(RuntimeError("too late"))  # ignored: the result came first
    assert early.done() and early.result() == 7
    assert before.result(timeout=0) == 7 and early.as_future() is before

    failed: Completion[int] = Completion()
    failed.set_exception(Unavailable("gone", shard=3))
    failed.set_result(1)  # ignored
    with pytest.raises(Unavailable):
        failed.result()
    with pytest.raises(Unavailable):
        failed.as_future().result(timeout=0)


def test_a_completion_wakes_a_thread_waiting_on_it() -> None:
    done: Completion[str] = Completion()
    assert not done.wait_done(0.01)
    seen: list[bool] = []
    waiter = threading.Thread(target=lambda: seen.append(done.wait_done(30.0)))
    waiter.start()
    done.set_result("ok")
    waiter.join(30.0)
    assert seen == [True] and done.wait_done(0) and done.result() == "ok"


def test_a_caller_whose_reply_another_thread_receives_gets_its_result(router: Any) -> None:
    """Two threads wait on the engine at once: whichever drives receives both replies,
    and each caller returns with its own."""
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: [address]}, Limits())
    results: dict[int, Any] = {}

    def call(rid: int) -> None:
        op: Completion[Header] = Completion()
        engine.enter_wait()
        try:
            engine.submit(0, Header(Kind.PULL, rid), [], 30.0,
                          lambda h, _: op.set_result(h), op.set_exception)
            results[rid] = engine.wait(op).request_id
        finally:
            engine.exit_wait()

    threads = [threading.Thread(target=call, args=(rid,)) for rid in (11, 12)]
    for t in threads:
        t.start()
    waiting = []
    for _ in range(2):
        assert sock.poll(10_000)
        waiting.append(sock.recv_multipart())
    for identity, raw in waiting:  # both answered only once both were sent
        sock.send_multipart([identity, encode_header(reply_header(decode_header(raw, Limits())))])
    for t in threads:
        t.join(30.0)
    assert results == {11: 11, 12: 12}
    engine.close()


def test_a_reply_with_the_sent_tensors_or_none_is_delivered_as_decode_header_gives_it(
        router: Any) -> None:
    """Replies the engine takes without decoding each descriptor again (the values of
    a PUSH_PULL, a bare acknowledgement) reach the request as the same Header that
    decode_header makes; replies with other tensors, opts or unfitting frames go
    through the general path, which refuses frames that do not fit."""
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: [address]}, Limits())
    metas = (TensorMeta("w", 0, "float32", (4,), 0, 4, 1),)
    values = np.arange(4, dtype=np.float32).tobytes()
    cases = [  # (reply header, reply frames, what arrives)
        (reply_header(Header(Kind.PUSH_PULL, 1), tensors=metas), [values], "plain"),
        (reply_header(Header(Kind.PUSH, 2)), [], "plain"),
        (reply_header(Header(Kind.PUSH_PULL, 3), tensors=(
            TensorMeta("w", 0, "float32", (2, 2), 0, 4, 1),)), [values], "decoded"),
        (reply_header(Header(Kind.INIT, 4), opts={"created": [True]}), [], "decoded"),
        (reply_header(Header(Kind.PUSH_PULL, 5), tensors=metas), [values[:8]], "refused"),
    ]
    for reply, frames, expect in cases:
        got: Future[Any] = Future()
        request = Header(Kind.PUSH_PULL, reply.request_id, tensors=metas)
        engine.submit(0, request, [values], 10.0, lambda h, inc, f=got: f.set_result(
            (h, [bytes(x) for x in inc.frames])), got.set_exception)
        assert sock.poll(10_000)
        identity, *_ = sock.recv_multipart()
        sock.send_multipart([identity, encode_header(reply), *frames])
        if expect == "refused":
            with pytest.raises(ProtocolError):
                got.result(timeout=10)
            continue
        header, data = got.result(timeout=10)
        assert header == decode_header(encode_header(reply), Limits()) and data == frames
        if expect == "plain" and reply.tensors:
            assert header.tensors is request.tensors  # the sent descriptors, not new ones
    engine.close()


def _answer(sock: Any) -> tuple[Header, list[bytes]]:
    """Take the next request on a bare ROUTER (within 10 s) and answer it with success."""
    assert sock.poll(10_000)
    identity, raw, *frames = sock.recv_multipart()
    h = decode_header(raw, Limits())
    sock.send_multipart([identity, encode_header(reply_header(h))])
    return h, frames


def test_an_idle_engine_exchanges_one_request_on_the_calling_thread(router: Any) -> None:
    """An idle engine exchanges a request (a reply within DIRECT_MS is taken by the
    caller's blocking receive); a reply sent only after ``exchange`` returned is taken
    by ``wait`` as usual.
    Both requests get sequence numbers as sent."""
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: [address]}, Limits())
    for rid, late in ((1, False), (2, True)):
        op: Completion[Any] = Completion()
        engine.enter_wait()
        try:
            answering = threading.Thread(target=_answer, args=(sock,))
            if not late:
                answering.start()
            used = engine.exchange(0, Header(Kind.PUSH, rid), [], 10.0,
                                   lambda h, _, op=op: op.set_result(h), op.set_exception)
            assert used
            if late:  # nothing was answered yet: still pending, for wait to finish
                assert not op.done()
                answering.start()
            assert engine.wait(op).request_id == rid
        finally:
            engine.exit_wait()
        answering.join(10)
    assert engine._seqs == {0: 2}
    engine.close()


def test_a_busy_engine_or_a_replicated_shard_does_not_exchange(router: Any,
                                                               two_replicas: Any) -> None:
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: [address]}, Limits())
    pending = _submit(engine, Kind.PULL, 7)  # in flight, not answered yet
    assert not engine.exchange(0, Header(Kind.PULL, 8), [], 10.0, lambda *_: None,
                               lambda _: None)
    assert sock.poll(10_000)
    identity, raw = sock.recv_multipart()
    sock.send_multipart([identity, encode_header(reply_header(decode_header(raw, Limits())))])
    assert pending.result(timeout=10).request_id == 7
    engine.close()
    rctx, _socks, addrs = two_replicas
    replicated = IOEngine(rctx, {0: addrs}, Limits())
    assert not replicated.exchange(0, Header(Kind.PULL, 9), [], 10.0, lambda *_: None,
                                   lambda _: None)
    replicated.close()


# -- shared memory (PROTOCOL.md §4.6): when a block may be used again ----------------------


@contextlib.contextmanager
def _shm_engine(ctx: Any, addrs: list[str],
                tmp_path: Path) -> Iterator[tuple[IOEngine, Arena]]:
    """An engine whose shard 0 (``addrs``) takes shared memory from an arena in
    ``tmp_path``; closed on the way out."""
    arena = Arena(directory=str(tmp_path))
    hints = {0: {a: i for i, a in enumerate(addrs)}}
    engine = IOEngine(ctx, {0: addrs}, Limits(), hints, arena=arena, shm_shards=frozenset({0}))
    try:
        yield engine, arena
    finally:
        engine.close()


def _shm_push(engine: IOEngine, rid: int, timeout: float = 10.0) -> Future[Any]:
    data = np.full(SHM_MIN_BYTES // 4, rid, np.float32)
    meta = TensorMeta("w", 0, "float32", (data.size,), 0, data.size, 1)
    fut: Future[Any] = Future()
    engine.submit(0, Header(Kind.PUSH, rid, tensors=(meta,)), [memoryview(data)], timeout,
                  lambda h, _: fut.set_result(h), fut.set_exception)
    return fut


def test_a_block_answered_by_its_only_replica_is_freed(router: Any, tmp_path: Path) -> None:
    ctx, sock, address = router
    with _shm_engine(ctx, [address], tmp_path) as (engine, arena):
        fut = _shm_push(engine, 21)
        h, frames = _answer(sock)
        assert h.shm is not None and frames == []
        fut.result(timeout=10)
        assert arena.blocks_out == 0


def test_a_block_sent_to_two_replicas_is_kept_out_of_use(two_replicas: Any,
                                                         tmp_path: Path) -> None:
    """After a NotLeader, the first replica may still read the block: it is not
    handed to the next request."""
    ctx, (follower, leader), addrs = two_replicas
    with _shm_engine(ctx, addrs, tmp_path) as (engine, arena):
        fut = _shm_push(engine, 22)
        identity, first = _recv(follower)
        follower.send_multipart([identity, encode_header(reply_header(
            first, error=8, message="not the leader", opts={"leader_hint": addrs[1]}))])
        identity, again = _recv(leader)
        assert again.shm == first.shm  # the same block, resent
        leader.send_multipart([identity, encode_header(reply_header(again))])
        fut.result(timeout=10)
        assert arena.blocks_out == 1  # quarantined
        fut = _shm_push(engine, 23)
        identity, nxt = _recv(leader)
        assert nxt.shm is not None and first.shm is not None
        assert nxt.shm.spans[0][0] != first.shm.spans[0][0]
        leader.send_multipart([identity, encode_header(reply_header(nxt))])
        fut.result(timeout=10)


def test_an_expired_block_comes_back_with_its_late_reply(router: Any, tmp_path: Path) -> None:
    ctx, sock, address = router
    with _shm_engine(ctx, [address], tmp_path) as (engine, arena):
        fut = _shm_push(engine, 24, timeout=0.3)
        identity, raw, *_ = sock.recv_multipart()
        with pytest.raises(Unavailable):
            fut.result(timeout=10)
        assert arena.blocks_out == 1  # the shard may still read it
        sock.send_multipart([identity, encode_header(reply_header(decode_header(raw, Limits())))])
        fut = _shm_push(engine, 25)  # drives the engine, which takes the late reply
        _answer(sock)
        fut.result(timeout=10)
        assert arena.blocks_out == 0


def test_shm_unavailable_resends_the_same_bytes_as_frames(router: Any, tmp_path: Path) -> None:
    ctx, sock, address = router
    with _shm_engine(ctx, [address], tmp_path) as (engine, arena):
        fut = _shm_push(engine, 26)
        identity, raw, *_ = sock.recv_multipart()
        h = decode_header(raw, Limits())
        sock.send_multipart([identity, encode_header(reply_header(
            h, error=12, message="cannot open shared memory"))])
        identity, raw, *frames = sock.recv_multipart()
        again = decode_header(raw, Limits())
        assert (again.request_id, again.seq, again.shm) == (26, h.seq, None)
        assert frames == [np.full(SHM_MIN_BYTES // 4, 26, np.float32).tobytes()]
        sock.send_multipart([identity, encode_header(reply_header(again))])
        fut.result(timeout=10)
        assert arena.blocks_out == 0


def _lazy_frames(data: np.ndarray[Any, Any], made: list[int]) -> list[LazyFrame]:
    """``data``'s bytes as two LazyFrames that count in ``made`` how often they are
    written."""
    raw = data.view(np.uint8)
    half = raw.size // 2

    def frame(a: int, b: int) -> LazyFrame:
        def fill(out: np.ndarray[Any, Any]) -> None:
            made.append(a)
            out[:] = raw[a:b]
        return LazyFrame(b - a, fill)

    return [frame(0, half), frame(half, raw.size)]


def test_lazy_frames_are_written_straight_into_shared_memory(router: Any,
                                                             tmp_path: Path) -> None:
    ctx, sock, address = router
    data = np.arange(SHM_MIN_BYTES // 4, dtype=np.float32)
    made: list[int] = []
    with _shm_engine(ctx, [address], tmp_path) as (engine, _arena):
        meta = TensorMeta("w", 0, "float32", (data.size,), 0, data.size, 2)
        fut: Future[Any] = Future()
        engine.submit(0, Header(Kind.PUSH, 31, tensors=(meta,)), _lazy_frames(data, made),
                      10.0, lambda h, _: fut.set_result(h), fut.set_exception)
        identity, raw, *frames = sock.recv_multipart()
        h = decode_header(raw, Limits())
        assert h.shm is not None and frames == [] and len(made) == 2
        with open(tmp_path / h.shm.name, "rb") as f:  # what a shard maps
            got = [np.frombuffer(_read_at(f, o, n), np.uint8) for o, n in h.shm.spans]
        assert np.concatenate(got).view(np.float32).tolist() == data.tolist()
        sock.send_multipart([identity, encode_header(reply_header(h))])
        fut.result(timeout=10)


def _read_at(f: Any, offset: int, n: int) -> bytes:
    f.seek(offset)
    return bytes(f.read(n))


def test_lazy_frames_are_made_once_for_the_socket(router: Any) -> None:
    """Without shared memory the frames are made into buffers at the first send; a
    resend after a NotLeader sends the same bytes without making them again."""
    ctx, sock, address = router
    engine = IOEngine(ctx, {0: [address]}, Limits())
    data = np.arange(1000, dtype=np.float32)
    made: list[int] = []
    meta = TensorMeta("w", 0, "float32", (data.size,), 0, data.size, 2)
    fut: Future[Any] = Future()
    engine.submit(0, Header(Kind.PUSH, 32, tensors=(meta,)), _lazy_frames(data, made), 10.0,
                  lambda h, _: fut.set_result(h), fut.set_exception)
    identity, raw, *frames = sock.recv_multipart()
    assert b"".join(frames) == data.tobytes() and made == [0, 2000]
    h = decode_header(raw, Limits())
    sock.send_multipart([identity, encode_header(reply_header(
        h, error=8, message="not the leader"))])
    identity, raw, *frames = sock.recv_multipart()
    assert b"".join(frames) == data.tobytes() and made == [0, 2000]
    sock.send_multipart([identity, encode_header(reply_header(decode_header(raw, Limits())))])
    fut.result(timeout=10)
    engine.close()
