"""A clean stop saves every shard's state in the data dir; the next start loads it."""

from __future__ import annotations

import signal
from typing import Any

import numpy as np
import pytest

import pserver
from pserver.kernels import reference

pytestmark = pytest.mark.integration


def test_a_clean_restart_recovers_keys_optimizer_state_tables_and_sessions(
        cluster_factory: Any) -> None:
    rng = np.random.default_rng(3)
    start = rng.standard_normal(6 * 2**20 // 4).astype(np.float32)  # two parts
    g1, g2 = (rng.standard_normal(start.size).astype(np.float32) for _ in range(2))
    first = cluster_factory("--shards", "2")
    with pserver.connect(first.address) as c:
        c.init({"w": start}, optimizer={"name": "adam", "lr": 0.01})
        c.init({"h": np.zeros(16, np.float32)}, optimizer={"name": "sum"},
               compression="float16")
        c.push({"w": g1})
        c.create_table("emb", 8, init=("normal", 0.1))
        ids = np.arange(1000, dtype=np.uint64)
        c.push_rows("emb", ids, np.ones((1000, 8), np.float32))
        rows = c.pull_rows("emb", ids)
        fresh_row = c.pull_rows("emb", np.array([10**12], np.uint64))
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0

    second = cluster_factory("--shards", "2")
    with pserver.connect(second.address) as c:
        c.push({"w": g2})  # adam continues from the saved moments and step count
        want = start.copy()
        m, v = np.zeros_like(want), np.zeros_like(want)
        for step, g in enumerate((g1, g2), start=1):
            reference.adam_step(want, g, m, v, None, step=step, lr=0.01, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
        np.testing.assert_allclose(c.pull(["w"])["w"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(c.pull_rows("emb", ids), rows)
        np.testing.assert_array_equal(c.pull_rows("emb", np.array([10**12], np.uint64)),
                                      fresh_row)
        c.push({"h": np.ones(16, np.float32)})  # the compression setting came back too
        np.testing.assert_array_equal(c.pull(["h"])["h"], np.ones(16, np.float32))
        assert c.status()["keys"] == 2
