"""Row index: batch lookup-or-insert of 1M random uint64 ids, the Cython ``RowIndex``
against a Python dict loop (the issue's target: at least 20x).

Two scenarios, each with its dict baseline in the same ``benchmark.group``:
``fresh`` inserts 1M new ids into an empty index (default size, so growth is
included); ``existing`` looks up the same 1M ids once they are all present. The
speedup (best dict round / best index round, both measured in this run) goes to
``extra_info["speedup_vs_dict"]`` and is printed.

Run with ``pytest bench/test_rowindex.py`` (add ``--benchmark-json FILE`` to keep it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pserver import kernels

N = 1_000_000
INDEX_ROUNDS = 15
DICT_ROUNDS = 5
Array = np.ndarray[Any, Any]


def dict_lookup_or_insert(table: dict[int, int], ids: Array) -> Array:
    """The baseline: one dict operation per id, new ids numbered in first-appearance
    order (a list comprehension over ``tolist()``, the fastest plain-Python form)."""
    setdefault = table.setdefault
    return np.array([setdefault(i, len(table)) for i in ids.tolist()], dtype=np.int64)


@pytest.fixture(scope="module")
def ids() -> Array:
    return np.random.default_rng(20261127).integers(0, 2**64, N, dtype=np.uint64,
                                                    endpoint=False)


def _round(kind: str, scenario: str, ids: Array) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(setup, step) for one benchmark round: setup builds the table, step is timed."""
    out = np.empty(N, dtype=np.int64)
    created = np.empty(N, dtype=np.int64)
    state: dict[str, Any] = {}

    def setup() -> None:
        if kind == "dict":
            state["table"] = {}
            if scenario == "existing":
                dict_lookup_or_insert(state["table"], ids)
        else:
            state["table"] = kernels.new_row_index()
            if scenario == "existing":
                state["table"].lookup_or_insert(ids, out, created)

    def step() -> Any:
        if kind == "dict":
            return dict_lookup_or_insert(state["table"], ids)
        return state["table"].lookup_or_insert(ids, out, created)

    return setup, step


def _best_seconds(kind: str, scenario: str, ids: Array, rounds: int) -> float:
    setup, step = _round(kind, scenario, ids)
    best = float("inf")
    for _ in range(rounds):
        setup()
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def dict_best() -> dict[str, float]:
    """Best dict-loop seconds per scenario, filled by the dict benchmarks."""
    return {}


@pytest.mark.parametrize("scenario", ["fresh", "existing"])
@pytest.mark.parametrize("kind", ["dict", "rowindex"])
def test_lookup_or_insert_1m(benchmark: Any, ids: Array, dict_best: dict[str, float],
                             capsys: pytest.CaptureFixture[str], kind: str,
                             scenario: str) -> None:
    setup, step = _round(kind, scenario, ids)
    benchmark.group = f"row index lookup_or_insert 1M random ids, {scenario}"
    benchmark.extra_info.update(kind=kind, scenario=scenario, ids=N)
    rounds = DICT_ROUNDS if kind == "dict" else INDEX_ROUNDS
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    best = benchmark.stats.stats.min
    benchmark.extra_info["best_s"] = best
    benchmark.extra_info["ns_per_id"] = best / N * 1e9
    if kind == "dict":
        dict_best[scenario] = best
        return
    if scenario not in dict_best:  # run alone: measure the baseline here
        dict_best[scenario] = _best_seconds("dict", scenario, ids, DICT_ROUNDS)
    speedup = dict_best[scenario] / best
    benchmark.extra_info["dict_best_s"] = dict_best[scenario]
    benchmark.extra_info["speedup_vs_dict"] = speedup
    with capsys.disabled():
        print(f"\nrow index {scenario}: {best * 1e3:.1f} ms ({best / N * 1e9:.1f} ns/id), "
              f"dict loop {dict_best[scenario] * 1e3:.1f} ms: {speedup:.1f}x (target 20x)")
