"""`pserver export` writes a file loadable without pserver; `serve --restore` starts
from it, whatever the shard count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pserver

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_then_restore_into_a_cluster_of_another_size(
        cluster_factory: Any, tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(5)
    arrays = {
        "layer.weight": rng.standard_normal((1024, 1536)).astype(np.float32),  # chunked
        "layer.bias": rng.standard_normal(1536).astype(np.float64),
        "steps": np.arange(7, dtype=np.int64),
        "scale": np.array(0.25, np.float32),  # 0-d: stays 0-d
    }
    first = cluster_factory("--shards", "3")
    with pserver.connect(first.address) as c:
        c.init(arrays)
        assert set(c.keys()) == set(arrays)
    out = tmp_path / f"model.{fmt}"
    done = subprocess.run([sys.executable, "-m", "pserver", "export", "--address",
                           first.address, "--format", fmt, str(out)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported 4 keys" in done.stdout
    if fmt == "safetensors":  # readable without pserver
        from safetensors.numpy import load_file

        loaded = load_file(str(out))
    else:
        with np.load(out) as data:
            loaded = {k: data[k] for k in data.files}
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        np.testing.assert_array_equal(loaded[k], v)
    second = cluster_factory("--shards", "2", "--restore", str(out))
    with pserver.connect(second.address) as c:
        got = c.pull(list(arrays))
    for k, v in arrays.items():
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)


def test_restore_of_an_unreadable_file_fails_clearly(cluster_factory: Any,
                                                     tmp_path: Path) -> None:
    bad = tmp_path / "model.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(RuntimeError, match="restore"):
        cluster_factory("--shards", "1", "--restore", str(bad))
