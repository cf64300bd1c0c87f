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
    second = cluster_factory("--shards", "2", "--restore", str(out),
                             "--data-dir", str(tmp_path / "restored"))
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


def _export(address: str, fmt: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pserver", "export", "--address", address,
                           "--format", fmt, str(out)],
                          check=False, capture_output=True, text=True, timeout=120)


def test_export_keeps_every_key_name_and_restore_reads_any_file_name(
        cluster_factory: Any, tmp_path: Path) -> None:
    """Keys named like np.savez's own arguments are written under their names; a
    file exported under a name with no known suffix is restored by its content;
    an unwritable OUT is one line, no traceback, and leaves no file."""
    arrays = {"file": np.arange(4, dtype=np.float32),
              "allow_pickle": np.full(3, 2.5, np.float64), "w": np.ones(2, np.float32)}
    first = cluster_factory("--shards", "2")
    with pserver.connect(first.address) as c:
        c.init(arrays)
    for fmt in ("npz", "safetensors", "torch"):
        out = tmp_path / f"{fmt}-checkpoint.bin"
        done = _export(first.address, fmt, out)
        assert done.returncode == 0, done.stderr
        assert "exported 3 keys" in done.stdout
        restored = cluster_factory("--shards", "1", "--data-dir", str(tmp_path / fmt),
                                   "--restore", str(out))
        with pserver.connect(restored.address) as c:
            got = c.pull(list(arrays))
        restored.stop()
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), (fmt, k)
    with np.load(tmp_path / "npz-checkpoint.bin") as data:
        assert sorted(data.files) == sorted(arrays)
    missing = tmp_path / "no-such-dir" / "m.npz"
    done = _export(first.address, "npz", missing)
    assert done.returncode == 1
    assert f"cannot write {missing}" in done.stderr and "Traceback" not in done.stderr
    assert not missing.parent.exists()


def test_restore_into_a_data_dir_that_holds_keys_is_refused(
        cluster_factory: Any, tmp_path: Path) -> None:
    """The file's values would not replace the keys the data dir holds (init keeps
    an existing key), so the restore refuses and says why instead of serving them."""
    data = tmp_path / "held"
    first = cluster_factory("--replicas", "1", "--data-dir", str(data))
    with pserver.connect(first.address) as c:
        c.init({"w": np.zeros(4, np.float32)})
    assert first.stop() == 0
    ckpt = tmp_path / "ckpt.npz"
    np.savez(ckpt, w=np.full(4, 7.0, np.float32))
    with pytest.raises(RuntimeError, match="already holds 1 keys"):
        cluster_factory("--replicas", "1", "--data-dir", str(data), "--restore", str(ckpt))
    again = cluster_factory("--replicas", "1", "--data-dir", str(data))
    with pserver.connect(again.address) as c:  # what the data dir held is untouched
        assert c.pull(["w"])["w"].tolist() == [0.0] * 4
