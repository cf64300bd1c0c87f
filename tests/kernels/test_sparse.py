"""Row-sparse kernels (numba) against the row-by-row numpy reference, and the
deterministic row initializers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pserver.kernels import KernelError, sparse

DIMS = [1, 3, 16]


def _setup(rng: np.random.Generator, rows: int, dim: int, dtype: Any) -> dict[str, Any]:
    values = rng.standard_normal((rows, dim)).astype(dtype)
    return {b: values.copy() for b in ("cpu", "numpy")}


def _rounds(rng: np.random.Generator, rows: int, dim: int, dtype: Any) -> list[tuple[Any, Any]]:
    out = []
    for _ in range(20):
        slots = rng.choice(rows, size=rng.integers(0, rows + 1), replace=False).astype(np.int64)
        out.append((slots, rng.standard_normal((slots.size, dim)).astype(dtype)))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", ["sum", "sgd", "momentum", "adam", "adamw", "adagrad"])
def test_row_updates_match_the_reference(name: str, dim: int, dtype: Any) -> None:
    rng = np.random.default_rng(dim)
    rows = 40
    values = _setup(rng, rows, dim, dtype)
    state = {b: {k: np.zeros((rows, dim), dtype) for k in ("a", "b")} for b in values}
    steps = {b: np.zeros(rows, np.int64) for b in values}
    for slots, grads in _rounds(rng, rows, dim, dtype):
        for b in values:
            steps[b][slots] += 1
            v, st = values[b], state[b]
            if name == "sum":
                sparse.accumulate_rows(v, slots, grads, backend=b)
            elif name in ("sgd", "momentum"):
                sparse.sgd_rows(v, slots, grads, steps[b], lr=0.05, weight_decay=0.01,
                                momentum=0.9 if name == "momentum" else 0.0,
                                momentum_buffer=st["a"], backend=b)
            elif name in ("adam", "adamw"):
                sparse.adam_rows(v, slots, grads, steps[b], st["a"], st["b"], lr=0.01,
                                 weight_decay=0.01, decoupled=name == "adamw", backend=b)
            else:
                sparse.adagrad_rows(v, slots, grads, steps[b], st["a"], lr=0.1, lr_decay=0.01,
                                    backend=b)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-13}
    np.testing.assert_allclose(values["cpu"], values["numpy"], **tol)
    for k in ("a", "b"):
        np.testing.assert_allclose(state["cpu"][k], state["numpy"][k], **tol)


def _update(name: str, v: Any, st: dict[str, Any], slots: Any, grads: Any, steps: Any,
            backend: str) -> None:
    if name == "sum":
        sparse.accumulate_rows(v, slots, grads, backend=backend)
    elif name == "momentum":
        sparse.sgd_rows(v, slots, grads, steps, lr=0.05, momentum=0.9, nesterov=True,
                        momentum_buffer=st["a"], backend=backend)
    elif name == "adam":
        sparse.adam_rows(v, slots, grads, steps, st["a"], st["b"], lr=0.01, backend=backend)
    else:
        sparse.adagrad_rows(v, slots, grads, steps, st["a"], lr=0.1, lr_decay=0.01,
                            backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("name", ["sum", "momentum", "adam", "adagrad"])
def test_gradients_in_blocks_update_as_the_whole_array(name: str, backend: str) -> None:
    """Blocks of consecutive rows (a message's frames) give the bits of one array,
    per-row factors included (each block takes its own rows' step counts)."""
    rng = np.random.default_rng(5)
    rows, dim = 64, 5
    start = rng.standard_normal((rows, dim)).astype(np.float32)
    rounds = [(rng.permutation(rows)[:40].astype(np.int64),
               rng.standard_normal((40, dim)).astype(np.float32)) for _ in range(4)]
    ends = []
    for blocked in (False, True):
        v = start.copy()
        st = {k: np.zeros((rows, dim), np.float32) for k in ("a", "b")}
        steps = np.zeros(rows, np.int64)
        for slots, grads in rounds:
            steps[slots] += 1
            parts = [grads[a:b] for a, b in ((0, 0), (0, 7), (7, 8), (8, 40))]
            _update(name, v, st, slots, parts if blocked else grads, steps, backend)
        ends.append((v, st["a"], st["b"]))
    for whole, parts in zip(ends[0], ends[1], strict=True):
        np.testing.assert_array_equal(whole, parts)
    assert not np.array_equal(ends[0][0], start)


def test_blocks_that_do_not_match_the_slots_raise_kernel_error() -> None:
    v = np.zeros((5, 2), np.float32)
    slots = np.array([0, 1, 2], np.int64)
    for blocks in ([np.ones((2, 2), np.float32)],
                   [np.ones((2, 2), np.float32), np.ones((1, 3), np.float32)],
                   [np.ones((4, 2), np.float32)]):
        with pytest.raises(KernelError):
            sparse.accumulate_rows(v, slots, blocks)
    assert not v.any()


def test_only_the_named_rows_change() -> None:
    v = np.zeros((5, 2), np.float32)
    sparse.accumulate_rows(v, np.array([3, 1], np.int64), np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(v.sum(axis=1), [0, 2, 0, 2, 0])


@pytest.mark.parametrize("call", [
    pytest.param(lambda v: sparse.accumulate_rows(v, np.array([5], np.int64),
                                                  np.ones((1, 2), np.float32)), id="slot-out"),
    pytest.param(lambda v: sparse.accumulate_rows(v, np.array([0], np.int64),
                                                  np.ones((1, 3), np.float32)), id="dim"),
    pytest.param(lambda v: sparse.accumulate_rows(v, np.array([0], np.int32),
                                                  np.ones((1, 2), np.float32)), id="slot-dtype"),
    pytest.param(lambda v: sparse.adagrad_rows(v, np.array([0], np.int64),
                                               np.ones((1, 2), np.float32), np.ones(5, np.int64),
                                               np.zeros((4, 2), np.float32), lr=0.1),
                 id="state-shape"),
])
def test_bad_row_arguments_raise_kernel_error(call: Any) -> None:
    v = np.zeros((5, 2), np.float32)
    with pytest.raises(KernelError):
        call(v)
    assert not v.any()


@pytest.mark.parametrize("init", [("zeros",), ("uniform", -0.5, 0.5), ("normal", 0.1)],
                         ids=lambda i: i[0])
def test_initial_rows_depend_only_on_seed_and_id(init: tuple[Any, ...]) -> None:
    ids = np.array([0, 1, 2**64 - 1, 12345], np.uint64)
    a = np.empty((4, 7), np.float32)
    b = np.empty((4, 7), np.float32)
    sparse.init_rows(a, ids, init, seed=99)
    sparse.init_rows(b, ids[::-1].copy(), init, seed=99)
    np.testing.assert_array_equal(a, b[::-1])
    c = np.empty((4, 7), np.float32)
    sparse.init_rows(c, ids, init, seed=100)
    assert (init[0] == "zeros") == np.array_equal(a, c)


def test_initial_values_have_the_asked_distribution() -> None:
    ids = np.arange(20_000, dtype=np.uint64)
    u = np.empty((ids.size, 4))
    sparse.init_rows(u, ids, ("uniform", -1.0, 3.0), seed=1)
    assert u.min() >= -1.0 and u.max() < 3.0
    assert abs(u.mean() - 1.0) < 0.03
    n = np.empty((ids.size, 4))
    sparse.init_rows(n, ids, ("normal", 0.5), seed=1)
    assert abs(n.mean()) < 0.01
    assert abs(n.std() - 0.5) < 0.01
