"""pserver.export: the files `pserver export` writes and `serve --restore` reads,
without a cluster: every format round-trips any key name, is told by its content
when its name does not say, and a failed write leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import SafetensorError

from pserver.export import FORMATS, read, sniff, write

ARRAYS: dict[str, Any] = {
    "file": np.arange(6, dtype=np.float32).reshape(2, 3),  # np.savez's own argument names
    "allow_pickle": np.ones(3, np.float64),
    "layer.0/weight": np.full((2, 2), -1.5, np.float32),
    "steps": np.arange(4, dtype=np.int64),
    "scale": np.array(0.25, np.float32),
}


def _check(got: dict[str, Any]) -> None:
    assert set(got) == set(ARRAYS)
    for k, v in ARRAYS.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_any_key_name(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"model.{ {'torch': 'pt'}.get(fmt, fmt) }"
    write(ARRAYS, out, fmt)
    _check(read(out))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_the_npz_file_is_what_numpy_loads(tmp_path: Path) -> None:
    out = tmp_path / "m.npz"
    write(ARRAYS, out, "npz")
    with np.load(out, allow_pickle=False) as data:
        _check({k: data[k] for k in data.files})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["model.bin", "ckpt", "model.pth.tar"])
def test_a_file_whose_name_says_nothing_is_read_by_its_content(
        tmp_path: Path, fmt: str, name: str) -> None:
    out = tmp_path / name
    write(ARRAYS, out, fmt)
    assert sniff(out) == fmt
    _check(read(out))


def test_a_file_of_another_kind_is_refused_clearly(tmp_path: Path) -> None:
    for name, content in [("notes.txt", b"hello world, not a model"), ("x.bin", b""),
                          ("y.zip", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="cannot tell the format"):
            read(tmp_path / name)


def test_an_unwritable_path_raises_oserror_and_keeps_the_old_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write(ARRAYS, tmp_path / "no-such-dir" / "m.npz", "npz")
    out = tmp_path / "m.safetensors"
    write(ARRAYS, out, "safetensors")
    before = out.read_bytes()
    bad = {"w": np.zeros(2, np.float32), "o": np.array([object()])}  # safetensors refuses
    with pytest.raises(SafetensorError, match="dtype"):
        write(bad, out, "safetensors")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        write(ARRAYS, tmp_path / "m.x", "pickle")
    assert not list(tmp_path.iterdir())
