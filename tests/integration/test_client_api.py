"""The public client surface (DESIGN.md section 3) against a real 4-shard cluster.

Every test uses its own key names on the module's shared cluster (``cluster4``).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import pserver

from .support import assert_bits_equal, key_on_shard, pid_alive, run_workers, wait_until

pytestmark = pytest.mark.integration

SGD_HALF = {"name": "sgd", "lr": 0.5}
SUM = {"name": "sum"}
MiB = 1 << 20


@pytest.fixture(scope="module")
def client(cluster4: Any) -> Any:
    c = pserver.connect(cluster4.address, timeout=20.0)
    yield c
    c.close()


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# -- dense updates -------------------------------------------------------------


def test_sgd_push_changes_value_by_exactly_minus_half_grad(client: Any) -> None:
    rng = rng_for("sgd")
    w, g1, g2 = f32(rng, 33, 7), f32(rng, 33, 7), f32(rng, 33, 7)
    assert client.init({"sgd/w": w}, optimizer=SGD_HALF) == {"sgd/w": True}
    assert_bits_equal(client.pull(["sgd/w"])["sgd/w"], w, "value after init")

    client.push({"sgd/w": g1})
    want = w - np.float32(0.5) * g1
    assert_bits_equal(client.pull(["sgd/w"])["sgd/w"], want, "value after one push")

    got = client.push_pull({"sgd/w": g2})["sgd/w"]
    want = want - np.float32(0.5) * g2
    assert_bits_equal(got, want, "push_pull result")
    assert_bits_equal(client.pull(["sgd/w"])["sgd/w"], want, "value after push_pull")


def test_default_optimizer_is_sgd_lr_0_01(client: Any) -> None:
    w = np.ones(5, np.float32)
    g = np.full(5, 2.0, np.float32)
    client.init({"default/w": w})
    client.push({"default/w": g})
    assert_bits_equal(client.pull(["default/w"])["default/w"], w - np.float32(0.01) * g)


def test_sum_optimizer_accumulates_every_push(client: Any) -> None:
    rng = rng_for("sum")
    start = f32(rng, 1000)
    grads = [f32(rng, 1000) for _ in range(5)]
    client.init({"sum/acc": start}, optimizer=SUM)
    want = start.copy()
    for g in grads:
        client.push({"sum/acc": g})
        want += g
    assert_bits_equal(client.pull(["sum/acc"])["sum/acc"], want)


def test_init_again_with_same_shape_is_a_no_op(client: Any) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert client.init({"noop/w": w}, optimizer=SUM) == {"noop/w": True}
    client.push({"noop/w": np.ones((3, 4), np.float32)})
    again = client.init({"noop/w": np.zeros((3, 4), np.float32)}, optimizer=SGD_HALF)
    assert again == {"noop/w": False}
    assert_bits_equal(client.pull(["noop/w"])["noop/w"], w + 1)
    # The optimizer of the first init stays: sum still adds.
    client.push({"noop/w": np.ones((3, 4), np.float32)})
    assert_bits_equal(client.pull(["noop/w"])["noop/w"], w + 2)


@pytest.mark.parametrize("other", [np.zeros((4, 3), np.float32), np.zeros(12, np.float32),
                                   np.zeros((3, 4), np.float64), np.zeros((3, 4), np.int32)],
                         ids=["transposed", "flat", "float64", "int32"])
def test_init_with_other_shape_or_dtype_raises_shape_mismatch(client: Any,
                                                              other: np.ndarray) -> None:
    key = f"mismatch/{other.dtype}{other.shape}"
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    client.init({key: w})
    with pytest.raises(pserver.ShapeMismatch) as info:
        client.init({key: other})
    assert isinstance(info.value, pserver.PServerError)
    assert_bits_equal(client.pull([key])[key], w, "value after the refused init")


def test_pull_of_unknown_key_raises_key_not_found(client: Any) -> None:
    client.init({"known/k": np.zeros(3, np.float32)})
    with pytest.raises(pserver.KeyNotFound) as info:
        client.pull(["known/k", "never/initialized"])
    assert isinstance(info.value, pserver.PServerError)
    assert "never/initialized" in str(info.value)
    with pytest.raises(pserver.KeyNotFound):
        client.push({"never/initialized": np.zeros(3, np.float32)})


@pytest.mark.parametrize("grad", [np.zeros(7, np.float32), np.zeros((2, 3), np.float32),
                                  np.zeros(6, np.float64), np.zeros(6, np.int64)],
                         ids=["longer", "2d", "float64", "int64"])
def test_push_of_wrong_shape_or_dtype_raises_shape_mismatch(client: Any,
                                                            grad: np.ndarray) -> None:
    w = np.arange(6, dtype=np.float32)
    client.init({"wrongpush/w": w}, optimizer=SUM)
    before = client.pull(["wrongpush/w"])["wrongpush/w"]
    with pytest.raises(pserver.ShapeMismatch):
        client.push({"wrongpush/w": grad})
    with pytest.raises(pserver.ShapeMismatch):
        client.push_pull({"wrongpush/w": grad})
    assert_bits_equal(client.pull(["wrongpush/w"])["wrongpush/w"], before)


def test_unknown_optimizer_is_refused_and_creates_nothing(client: Any) -> None:
    with pytest.raises(pserver.PServerError):
        client.init({"badopt/w": np.zeros(3, np.float32)}, optimizer={"name": "no-such"})
    with pytest.raises(pserver.KeyNotFound):
        client.pull(["badopt/w"])


# -- large tensors and many keys ------------------------------------------------


def test_20_mib_tensor_is_chunked_over_all_shards_and_round_trips(client: Any) -> None:
    rng = rng_for("big")
    n = 20 * MiB // 4
    w = f32(rng, n)
    before = [s["bytes"] for s in client.status()["shards"]]
    client.init({"big/w": w}, optimizer=SGD_HALF)
    after = [s["bytes"] for s in client.status()["shards"]]
    grown = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(grown) == w.nbytes, f"per-shard growth {grown}"
    # 5 chunks of 4 MiB over 4 shards: every shard holds at least one whole chunk
    assert all(g >= 4 * MiB for g in grown), f"per-shard growth {grown}"

    assert_bits_equal(client.pull(["big/w"])["big/w"], w, "20 MiB round trip")
    g = f32(rng, n)
    got = client.push_pull({"big/w": g})["big/w"]
    want = w - np.float32(0.5) * g
    assert_bits_equal(got, want, "20 MiB push_pull")
    out = np.empty_like(w)
    client.pull_into({"big/w": out})
    assert_bits_equal(out, want, "20 MiB pull_into")


def test_10000_keys_in_one_init_and_one_pull(client: Any, cluster4: Any) -> None:
    n = 10_000  # more than max_keys (4096) per request: the client must split
    values = {f"many/{i}": np.full(4, i, np.int64) for i in range(n)}
    before = client.status()["keys"]
    created = client.init(values, optimizer=SUM)
    assert len(created) == n
    assert all(created.values())
    assert client.status()["keys"] == before + n
    # A fresh client knows none of the keys: its pull also fetches their metadata.
    with pserver.connect(cluster4.address, timeout=20.0) as other:
        got = other.pull(list(values))
    assert set(got) == set(values)
    for k, v in values.items():
        assert_bits_equal(got[k], v, k)


# -- dtypes and shapes ------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "start", "grads"), [
    (np.float16, [1.5, -2.0, 1000.0], [[0.25, 0.125, 3.0], [0.001, -1.0, 0.5]]),
    (np.float64, [0.1, 1e300, -3.0], [[0.2, 1e300, 1e-300], [0.3, -2e300, 7.0]]),
    (np.int32, [1, -5, 2**31 - 10], [[2, -7, 3], [-3, 12, 6]]),
    (np.int64, [2**53 + 1, -(2**62), 7], [[2, 3, -8], [2**53, 1, 1]]),
    (np.uint64, [2**63 + 1, 0, 2**64 - 10], [[2**62 + 3, 1, 4], [1, 2**63, 5]]),
], ids=["float16", "float64", "int32", "int64", "uint64"])
def test_sum_is_exact_for_every_allowed_dtype(client: Any, dtype: Any, start: list[Any],
                                              grads: list[list[Any]]) -> None:
    key = f"dtype/{np.dtype(dtype).name}"
    w = np.array(start, dtype=dtype)
    client.init({key: w}, optimizer=SUM)
    want = w.copy()
    for g in grads:
        ga = np.array(g, dtype=dtype)
        client.push({key: ga})
        want += ga
    got = client.pull([key])[key]
    assert_bits_equal(got, want, key)


def test_empty_and_zero_dimensional_arrays(client: Any) -> None:
    arrays = {
        "shape/empty": np.zeros(0, np.float32),
        "shape/empty2d": np.zeros((2, 0, 3), np.float64),
        "shape/scalar": np.array(1.5, np.float32),
    }
    assert client.init(arrays, optimizer=SGD_HALF) == dict.fromkeys(arrays, True)
    got = client.pull(list(arrays))
    for k, v in arrays.items():
        assert_bits_equal(got[k], v, k)
    out = client.push_pull({"shape/scalar": np.array(1.0, np.float32),
                            "shape/empty": np.zeros(0, np.float32)})
    assert_bits_equal(out["shape/scalar"], np.array(1.0, np.float32))
    assert_bits_equal(out["shape/empty"], np.zeros(0, np.float32))
    assert_bits_equal(client.pull(["shape/scalar"])["shape/scalar"], np.array(1.0, np.float32))


# -- futures, pull_into, threads ---------------------------------------------------


def test_async_variants_return_futures(client: Any) -> None:
    w = np.zeros(100, np.float32)
    fut = client.init_async({"async/w": w}, optimizer=SUM)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=20) == {"async/w": True}

    ones = np.ones(100, np.float32)
    pushes = [client.push_async({"async/w": ones}) for _ in range(50)]
    assert all(isinstance(f, concurrent.futures.Future) for f in pushes)
    assert [f.result(timeout=20) for f in pushes] == [None] * 50

    fut_pull = client.pull_async(["async/w"])
    assert isinstance(fut_pull, concurrent.futures.Future)
    assert_bits_equal(fut_pull.result(timeout=20)["async/w"], np.full(100, 50, np.float32))

    fut_pp = client.push_pull_async({"async/w": ones})
    assert isinstance(fut_pp, concurrent.futures.Future)
    assert_bits_equal(fut_pp.result(timeout=20)["async/w"], np.full(100, 51, np.float32))

    out = np.empty(100, np.float32)
    fut_into = client.pull_into_async({"async/w": out})
    assert isinstance(fut_into, concurrent.futures.Future)
    fut_into.result(timeout=20)
    assert_bits_equal(out, np.full(100, 51, np.float32))


def test_async_errors_arrive_through_the_future(client: Any) -> None:
    client.init({"asyncerr/w": np.zeros(3, np.float32)})
    fut = client.init_async({"asyncerr/w": np.zeros(4, np.float32)})
    with pytest.raises(pserver.ShapeMismatch):
        fut.result(timeout=20)


def test_async_calls_on_keys_new_to_the_client_return_futures_carrying_errors(
        client: Any, cluster4: Any) -> None:
    """A key this client has not used needs a metadata round trip first: the call
    still returns its Future at once, and every error comes out of it."""
    client.init({"asyncnew/w": np.zeros(3, np.float32)}, optimizer=SUM)
    with pserver.connect(cluster4.address, timeout=20.0) as fresh:
        for fut in (fresh.pull_async(["asyncnew/missing"]),
                    fresh.push_async({"asyncnew/missing": np.ones(3, np.float32)}),
                    fresh.push_pull_async({"asyncnew/missing": np.ones(3, np.float32)})):
            assert isinstance(fut, concurrent.futures.Future)
            with pytest.raises(pserver.KeyNotFound):
                fut.result(timeout=20)
        bad = fresh.push_async({"asyncnew/w": np.ones(4, np.float32)})
        with pytest.raises(pserver.ShapeMismatch):
            bad.result(timeout=20)
        known = fresh.push_async({"asyncnew/w": np.ones(5, np.float32)})  # meta cached now
        with pytest.raises(pserver.ShapeMismatch):
            known.result(timeout=20)


def test_async_calls_keep_their_order_behind_a_metadata_round_trip(cluster4: Any) -> None:
    """A push whose key's metadata is fetched first is queued; the calls after it,
    async or not, go after it, so each pull reads the pushes issued before it."""
    with pserver.connect(cluster4.address, timeout=20.0) as setup:
        setup.init({"asyncorder/a": np.zeros(8, np.float32),
                    "asyncorder/b": np.zeros(8, np.float32)}, optimizer=SUM)
        setup.pull(["asyncorder/b"])
    for _ in range(5):
        with pserver.connect(cluster4.address, timeout=20.0) as c:
            c.pull(["asyncorder/b"])  # b's metadata cached, a's not
            before = c.pull(["asyncorder/b"])["asyncorder/b"][0]
            pushed = c.push_async({"asyncorder/a": np.ones(8, np.float32)})  # META first
            pushed_b = c.push_async({"asyncorder/b": np.ones(8, np.float32)})
            after_b = c.pull_async(["asyncorder/b"])
            seen_a = c.pull(["asyncorder/a"])["asyncorder/a"][0]
            pushed.result(timeout=20)
            pushed_b.result(timeout=20)
            assert after_b.result(timeout=20)["asyncorder/b"][0] == before + 1
            assert seen_a >= 1  # the synchronous pull went after the queued push


def test_an_async_call_does_not_wait_for_a_stopped_shard(client: Any, cluster4: Any) -> None:
    key = key_on_shard(client.shard_map, 2, "asyncstop")
    client.init({key: np.ones(4, np.float32)}, optimizer=SUM)
    pid = client.status()["shards"][2]["replicas"][0]["pid"]
    with pserver.connect(cluster4.address, timeout=20.0) as fresh:
        os.kill(pid, signal.SIGSTOP)
        try:
            fut = fresh.pull_async([key])  # the metadata is on the stopped shard
            assert not fut.done()  # a call that waited would have come back finished
        finally:
            os.kill(pid, signal.SIGCONT)
        assert_bits_equal(fut.result(timeout=20)[key], np.ones(4, np.float32))


def test_pull_into_writes_into_the_callers_arrays(client: Any) -> None:
    rng = rng_for("into")
    a, b = f32(rng, 3, 5), np.arange(6 * MiB // 8, dtype=np.float64)  # b has 2 chunks
    client.init({"into/a": a, "into/b": b})
    out_a = np.full((3, 5), np.nan, np.float32)
    out_b = np.zeros_like(b)
    result = client.pull_into({"into/a": out_a, "into/b": out_b})
    assert result["into/a"] is out_a
    assert result["into/b"] is out_b
    assert_bits_equal(out_a, a)
    assert_bits_equal(out_b, b)
    with pytest.raises(pserver.ShapeMismatch):
        client.pull_into({"into/a": np.empty((5, 3), np.float32)})


def test_client_shared_by_8_threads(client: Any) -> None:
    threads, pushes = 8, 40
    n = threads * pushes
    client.init({"threads/oracle": np.zeros(n, np.float32),
                 "threads/total": np.zeros(16, np.int64)}, optimizer=SUM)
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait(timeout=20)
        for i in range(pushes):
            onehot = np.zeros(n, np.float32)
            onehot[t * pushes + i] = 1.0  # each push owns one coordinate
            total = np.full(16, t + 1, np.int64)
            if i % 2:
                client.push({"threads/oracle": onehot, "threads/total": total})
            else:
                client.push_pull({"threads/oracle": onehot, "threads/total": total})

    run_workers(worker, threads, 60)
    got = client.pull(["threads/oracle", "threads/total"])
    assert_bits_equal(got["threads/oracle"], np.ones(n, np.float32), "one-hot oracle")
    want_total = pushes * sum(range(1, threads + 1))
    assert_bits_equal(got["threads/total"], np.full(16, want_total, np.int64), "total")


# -- lifecycle, status, transports -------------------------------------------------


def _io_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "pserver-client-io")


def test_context_manager_closes_the_client(cluster4: Any) -> None:
    before = _io_threads()
    with pserver.connect(cluster4.address, timeout=10.0) as c:
        c.init({"ctx/w": np.ones(2, np.float32)})
        assert_bits_equal(c.pull(["ctx/w"])["ctx/w"], np.ones(2, np.float32))
    wait_until(lambda: _io_threads() == before, 5.0, "the client's I/O thread stopped")
    with pytest.raises(pserver.PServerError):
        c.pull(["ctx/w"])
    c.close()  # closing twice is harmless


def test_status_fields(client: Any) -> None:
    st = client.status()
    shards = st["shards"]
    assert [s["id"] for s in shards] == [0, 1, 2, 3]
    pids = []
    for s in shards:
        assert isinstance(s["keys"], int)
        assert isinstance(s["bytes"], int)
        assert len(s["replicas"]) == 1
        r = s["replicas"][0]
        for field in ("id", "address", "pid", "role", "term", "commit_index", "applied_index"):
            assert field in r, f"shard {s['id']} replica lacks {field}"
        assert r["role"] == "leader"
        assert r["address"] == client.cluster_map["shards"][s["id"]]["replicas"][0]["tcp"]
        assert isinstance(r["term"], int)
        assert r["commit_index"] >= r["applied_index"] >= 0
        assert pid_alive(r["pid"])
        pids.append(r["pid"])
    assert len(set(pids)) == 4
    assert os.getpid() not in pids

    # keys, bytes and applied_index follow what the shard holds
    key = key_on_shard(client.shard_map, 2, "status")
    before = client.status()["shards"][2]
    client.init({key: np.zeros(1000, np.float64)}, optimizer=SUM)
    client.push({key: np.ones(1000, np.float64)})
    after = client.status()["shards"][2]
    assert after["keys"] == before["keys"] + 1
    assert after["bytes"] == before["bytes"] + 8000
    assert after["replicas"][0]["applied_index"] == before["replicas"][0]["applied_index"] + 2
    total = client.status()
    assert total["keys"] >= 1
    assert total["bytes"] == sum(s["bytes"] for s in total["shards"])


def test_same_host_client_uses_ipc_and_ipc_false_uses_tcp(client: Any, cluster4: Any) -> None:
    assert client.endpoints
    assert all(e.startswith("ipc://") for es in client.endpoints.values() for e in es)
    rng = rng_for("ipc")
    w = f32(rng, 6 * MiB // 4)  # 2 chunks, so two shards are involved
    client.init({"ipc/w": w}, optimizer=SUM)
    with pserver.connect(cluster4.address, ipc=False, timeout=20.0) as tcp_client:
        assert tcp_client.endpoints
        assert all(e.startswith("tcp://") for es in tcp_client.endpoints.values() for e in es)
        assert_bits_equal(tcp_client.pull(["ipc/w"])["ipc/w"], w, "pull over tcp")
        tcp_client.push({"ipc/w": w})
    assert_bits_equal(client.pull(["ipc/w"])["ipc/w"], w + w, "tcp push seen over ipc")


def test_connect_to_a_port_without_server_raises_unavailable_in_time() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(pserver.Unavailable):
        pserver.connect(f"tcp://127.0.0.1:{port}", timeout=1.0)
    assert time.monotonic() - t0 < 3.0


def test_request_to_a_frozen_shard_raises_unavailable_naming_it(client: Any,
                                                               cluster4: Any) -> None:
    key = key_on_shard(client.shard_map, 1, "frozen")
    client.init({key: np.ones(4, np.float32)}, optimizer=SUM)
    pid = client.status()["shards"][1]["replicas"][0]["pid"]
    with pserver.connect(cluster4.address, timeout=1.0) as impatient:
        impatient.pull([key])  # metadata cached; the next pull only needs shard 1
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(pserver.Unavailable) as info:
                impatient.pull([key])
            assert time.monotonic() - t0 < 3.0
            assert info.value.shard == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        # the shard answers again, and the late reply does not confuse the client
        assert_bits_equal(impatient.pull([key])[key], np.ones(4, np.float32))


def test_push_pull_into_writes_the_new_values_into_the_callers_arrays(client: Any) -> None:
    key = "api/push-pull-into"
    client.init({key: np.zeros((300, 7), np.float32)}, optimizer={"name": "sgd", "lr": 0.5})
    out = {key: np.full((300, 7), 9.0, np.float32)}
    got = client.push_pull_into({key: np.ones((300, 7), np.float32)}, out)
    assert got[key] is out[key]
    np.testing.assert_array_equal(out[key], np.full((300, 7), -0.5, np.float32))
    with pytest.raises(pserver.ShapeMismatch):
        client.push_pull_into({key: np.ones((300, 7), np.float32)},
                              {key: np.empty((7, 300), np.float32)})
    with pytest.raises(pserver.PServerError):
        client.push_pull_into({key: np.ones((300, 7), np.float32)}, {})
    np.testing.assert_array_equal(client.pull([key])[key], np.full((300, 7), -0.5, np.float32))


@pytest.mark.parametrize("name", ["momentum", "adam", "adamw", "adagrad"])
def test_server_side_optimizers_follow_the_reference_on_a_chunked_key(
        client: Any, name: str) -> None:
    """A 6 MiB key (two parts on two shards) trained for 5 pushes equals the
    numpy reference run locally; every part keeps its own optimizer state."""
    from pserver.kernels import reference

    rng = np.random.default_rng(len(name))
    key = f"api/optim-{name}"
    start = rng.standard_normal(6 * 2**20 // 4).astype(np.float32)
    hp: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.001}
    client.init({key: start}, optimizer={"name": name, **hp})
    want = start.copy()
    state = [np.zeros_like(want) for _ in range(2)]
    for step in range(1, 6):
        g = rng.standard_normal(want.size).astype(np.float32)
        client.push({key: g})
        if name == "momentum":
            reference.sgd_step(want, g, state[0], lr=0.01, weight_decay=0.001, momentum=0.9,
                               dampening=0.0, nesterov=False, first=step == 1)
        elif name == "adagrad":
            reference.adagrad_step(want, g, state[0], step=step, lr=0.01, lr_decay=0.0,
                                   weight_decay=0.001, eps=1e-10)
        else:
            reference.adam_step(want, g, state[0], state[1], None, step=step, lr=0.01,
                                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.001,
                                decoupled=name == "adamw")
    np.testing.assert_allclose(client.pull([key])[key], want, rtol=1e-5, atol=1e-6)


def test_optimizer_hyperparameters_are_checked(client: Any) -> None:
    for bad in ({"name": "adam", "betas": [0.9]}, {"name": "sgd", "nesterov": True},
                {"name": "adagrad", "lr": -1.0}, {"name": "adam", "amsgrad": 1}):
        with pytest.raises(pserver.InvalidArgument):
            client.init({"api/bad-hp": np.zeros(3, np.float32)}, optimizer=bad)
    with pytest.raises(pserver.KeyNotFound):
        client.pull(["api/bad-hp"])


@pytest.mark.parametrize(("comp", "rtol"), [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_half_precision_compression_stays_close(client: Any, comp: str, rtol: float) -> None:
    """The client casts each gradient for the wire; the server widens it back and
    accumulates in float32 (a chunked key: both parts)."""
    rng = np.random.default_rng(1)
    key = f"api/comp-{comp}"
    n = 6 * 2**20 // 4
    client.init({key: np.zeros(n, np.float32)}, optimizer={"name": "sum"}, compression=comp)
    total = np.zeros(n, np.float32)
    for _ in range(2):
        g = rng.standard_normal(n).astype(np.float32)
        client.push({key: g})
        total += g
    got = client.pull([key])[key]
    assert got.dtype == np.float32
    assert np.linalg.norm(got - total) / np.linalg.norm(total) < rtol
    with pserver.connect(client.address) as other:  # another client learns the setting
        other.push({key: np.ones(n, np.float32)})
    np.testing.assert_allclose(client.pull([key])[key], got + 1, rtol=rtol, atol=rtol)


def test_topk_with_error_feedback_delivers_the_whole_gradient_over_time(client: Any) -> None:
    key = "api/comp-topk"
    client.init({key: np.zeros(1000, np.float32)}, optimizer={"name": "sum"},
                compression=("topk", 0.05))
    g = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    client.push({key: g})
    first = client.pull([key])[key]
    assert np.count_nonzero(first) == 50  # 5 % of the entries, the largest ones
    np.testing.assert_array_equal(first[first != 0], g[first != 0])
    assert np.abs(g[first != 0]).min() >= np.abs(g[first == 0]).max()
    for _ in range(199):
        client.push({key: g})
    got = client.pull([key])[key]
    assert np.linalg.norm(got - 200 * g) / np.linalg.norm(200 * g) < 0.1


def test_float16_gradients_go_into_float32_keys(client: Any) -> None:
    key = "api/half-grad"
    client.init({key: np.zeros(8, np.float32)}, optimizer={"name": "sgd", "lr": 0.5})
    client.push({key: np.ones(8, np.float16)})
    np.testing.assert_array_equal(client.pull([key])[key], np.full(8, -0.5, np.float32))


@pytest.mark.parametrize(("made_with", "reinit_with"),
                         [(None, "float16"), (("topk", 0.25), None), ("bfloat16", "float16")])
def test_init_of_an_existing_key_keeps_its_compression(client: Any, made_with: Any,
                                                       reinit_with: Any) -> None:
    """A second client's init of an existing key is a no-op: its pushes use the
    compression the key was made with, not the one that init asked for."""
    key = f"api/comp-reinit-{made_with}-{reinit_with}"
    client.init({key: np.zeros(8, np.float32)}, optimizer={"name": "sum"},
                compression=made_with)
    g = np.arange(1, 9, dtype=np.float32) / 3
    with pserver.connect(client.address) as other:
        assert other.init({key: np.zeros(8, np.float32)}, optimizer={"name": "sum"},
                          compression=reinit_with) == {key: False}
        other.push({key: g})
    with pserver.connect(client.address) as fresh:  # a client that never called init
        fresh.push({key: g})
    got = client.pull([key])[key]
    if made_with is None:
        want = 2 * g  # exact: nothing was cast to float16 on the way
    elif made_with == "bfloat16":
        want = 2 * g.astype(ml_dtypes.bfloat16).astype(np.float32)
    else:  # top-k 25 %: the 2 largest entries, twice (the second client's first push)
        want = np.where(np.arange(8) >= 6, 2 * g, 0).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_bad_compression_settings_are_refused(client: Any) -> None:
    for bad in ("gzip", ("topk", 0), ("topk", 1.5), ("topk",)):
        with pytest.raises(pserver.InvalidArgument):
            client.init({"api/bad-comp": np.zeros(4, np.float32)}, compression=bad)
    with pytest.raises(pserver.InvalidArgument):
        client.init({"api/bad-comp-int": np.zeros(4, np.int32)}, optimizer={"name": "sum"},
                    compression="float16")


def test_float16_gradients_in_push_pull_return_the_keys_float32_values(client: Any) -> None:
    key = "api/half-grad-pp"
    client.init({key: np.zeros(8, np.float32)}, optimizer={"name": "sgd", "lr": 0.5})
    got = client.push_pull({key: np.ones(8, np.float16)})[key]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.full(8, -0.5, np.float32))


def test_results_are_writeable_arrays_the_caller_owns_in_the_order_asked(
        client: Any) -> None:
    # Keys on different shards, one of them chunked (its value arrives in parts).
    keys = [key_on_shard(client.shard_map, s, "own") for s in (3, 1, 2, 0)]
    values = {k: np.full((4, 5), i, np.float32) for i, k in enumerate(keys)}
    big = "own/chunked"
    values[big] = np.arange(3 * MiB, dtype=np.float32)
    client.init(values, optimizer=SUM)
    order = [big, *keys[::-1]]
    for got in (client.pull(order),
                client.push_pull({k: np.zeros_like(values[k]) for k in order})):
        assert list(got) == order
        for k in order:
            arr = got[k]
            assert arr.flags.writeable and arr.shape == values[k].shape
            assert_bits_equal(arr, values[k], k)
            arr += 100  # the caller's array: changing it changes nothing elsewhere
    again = client.pull(order)
    for k in order:
        assert_bits_equal(again[k], values[k], f"{k} after the caller changed its copies")


def test_every_push_checks_its_arrays_not_only_the_first(client: Any) -> None:
    key = "api/checked-each-time"
    client.init({key: np.zeros((3, 4), np.float32)}, optimizer=SUM)
    client.push({key: np.ones((3, 4), np.float32)})  # the call's layout is cached now
    with pytest.raises(pserver.ShapeMismatch):
        client.push({key: np.ones((4, 3), np.float32)})
    with pytest.raises(pserver.ShapeMismatch):
        client.push_pull({key: np.ones((3, 4), np.float64)})
    with pytest.raises(pserver.InvalidArgument):
        client.push({key: np.ones((3, 8), np.float32)[:, ::2]})  # not contiguous
    with pytest.raises(pserver.InvalidArgument):
        client.push({key: [[1.0] * 4] * 3})  # not an array
    assert_bits_equal(client.pull([key])[key], np.ones((3, 4), np.float32))


def test_300_pushes_in_flight_to_one_shard_are_each_applied_once(client: Any) -> None:
    # More than one drain batch of the shard's loop waits at once.
    key = "api/many-in-flight"
    client.init({key: np.zeros(4, np.float64)}, optimizer=SUM)
    one = np.ones(4, np.float64)
    futures = [client.push_async({key: one}) for _ in range(300)]
    for f in futures:
        assert f.result(timeout=60) is None
    assert_bits_equal(client.pull([key])[key], np.full(4, 300.0))


def test_settings_the_wire_cannot_carry_are_typed_errors_before_sending(client: Any) -> None:
    """Each of these once reached the server as a message it could not tie to the
    request (the client then waited out its timeout: Unavailable) or raised an
    untyped error (TypeError from msgpack, OverflowError, AttributeError)."""
    x = {"api/wire": np.zeros(3, np.float32)}
    for bad in ({"name": "sgd", 1: 0.5}, {"name": "sgd", "lr": 2**70},
                {"name": "sgd", "lr": object()}, ["sgd"]):
        with pytest.raises(pserver.InvalidArgument):
            client.init(x, optimizer=bad)  # type: ignore[arg-type]
    for kw in ({"staleness": "x"}, {"staleness": -1}, {"staleness": 2**70},
               {"mode": "eventually"}):
        with pytest.raises(pserver.InvalidArgument):
            client.init(x, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        client.init([np.zeros(3, np.float32)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        client.push([np.zeros(3, np.float32)])  # type: ignore[arg-type]
    for kw in ({"dim": "8"}, {"dim": 0}, {"dim": 2**70}, {"init": 5},
               {"init": ("uniform", object(), 1)}, {"dtype": 5}):
        with pytest.raises(pserver.InvalidArgument):
            client.create_table("api/wire-table", **{"dim": 8, **kw})  # type: ignore[arg-type]
    with pytest.raises(pserver.KeyNotFound):
        client.pull(["api/wire"])


def test_numpy_scalars_and_names_are_accepted_as_settings(client: Any) -> None:
    """Hyperparameters computed with numpy, an optimizer given by name and a table's
    init given as a bare name work as their plain Python equivalents."""
    client.init({"api/np-hp": np.ones(4, np.float32)},
                optimizer={"name": "sgd", "lr": np.float32(0.5)}, staleness=np.int64(0))
    client.push({"api/np-hp": np.full(4, 2.0, np.float32)})
    np.testing.assert_array_equal(client.pull(["api/np-hp"])["api/np-hp"],
                                  np.zeros(4, np.float32))
    client.init({"api/by-name": np.ones(4, np.float32)}, optimizer="sum")
    client.push({"api/by-name": np.ones(4, np.float32)})
    np.testing.assert_array_equal(client.pull(["api/by-name"])["api/by-name"],
                                  np.full(4, 2.0, np.float32))
    assert client.create_table("api/np-table", np.int64(4), init="zeros",
                               dtype=np.float32, optimizer={"name": "sgd", "lr": np.float64(1)})
    ids = np.array([3, 9], np.uint64)
    client.push_rows("api/np-table", ids, np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(client.pull_rows("api/np-table", ids),
                                  np.full((2, 4), -1.0, np.float32))
