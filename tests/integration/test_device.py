"""`pserver serve --device cuda`: values and optimizer state live on the GPU.

On this machine the GPU is numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 in the
shard processes), so tensors stay small (each CUDA thread is a Python thread)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pserver
from pserver.kernels import reference

from .test_supervisor import clean_env, pserver_cmd

pytestmark = pytest.mark.integration


def test_a_cuda_shard_trains_like_a_cpu_one(cluster_factory: Any) -> None:
    cluster = cluster_factory("--shards", "2", "--device", "cuda",
                              env={"NUMBA_ENABLE_CUDASIM": "1"})
    rng = np.random.default_rng(4)
    start = rng.standard_normal(300).astype(np.float32)
    want = start.copy()
    m, v = np.zeros_like(want), np.zeros_like(want)
    with pserver.connect(cluster.address, timeout=60.0) as c:
        c.init({"w": start}, optimizer={"name": "adam", "lr": 0.05})
        for step in range(1, 4):
            g = rng.standard_normal(300).astype(np.float32)
            c.push({"w": g})
            reference.adam_step(want, g, m, v, None, step=step, lr=0.05, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
        np.testing.assert_allclose(c.pull(["w"])["w"], want, rtol=1e-5, atol=1e-6)
        c.init({"s": np.zeros(8, np.float32)}, optimizer={"name": "sgd", "lr": 0.5})
        np.testing.assert_array_equal(c.push_pull({"s": np.ones(8, np.float32)})["s"],
                                      np.full(8, -0.5, np.float32))


def test_cuda_without_a_gpu_fails_with_a_clear_message(cluster_factory: Any) -> None:
    with pytest.raises(RuntimeError) as info:
        cluster_factory("--shards", "1", "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "CUDA GPU" in str(info.value)


@pytest.mark.timeout(120)
def test_cuda_without_a_gpu_is_one_line_before_any_replica_starts(tmp_path: Path) -> None:
    """The supervisor checks the device once: one error line, exit 1, and no replica
    started (each would have printed the same error)."""
    env = {k: v for k, v in clean_env().items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    data = tmp_path / "data"
    res = subprocess.run(pserver_cmd("serve", "--device", "cuda", "--shards", "2",
                                     "--replicas", "3", "--port", "0", "--data-dir", str(data)),
                         capture_output=True, text=True, env=env, timeout=100, check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: --device cuda: ") and "CUDA GPU" in lines[0]
    assert not data.exists()  # nothing was started, so nothing was written
