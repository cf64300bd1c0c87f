"""Export a cluster's dense keys to a file loadable without pserver, and back.

Owns the file formats of ``pserver export`` and ``pserver serve --restore``:
safetensors, numpy ``.npz`` and torch (``torch.save`` of a dict of tensors,
needs torch). Keys keep their names, shapes and dtypes; the file does not depend
on the shard count. Optimizer state and sparse tables are not exported. A file
is written under a temporary name and renamed into place, so a failed export
leaves no partial file. ``read`` tells the format from the file's suffix, or from
its first bytes when the suffix is none of the usual ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .wal import fsync_dir

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "npz", "torch")
Array = np.ndarray[Any, Any]


def write(arrays: dict[str, Array], path: Path, fmt: str) -> None:
    """Write ``arrays`` to ``path`` in format ``fmt`` (raises OSError when it cannot be
    written, ValueError for an unknown format or torch missing)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError("--format torch needs torch installed") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:  # an OSError here if the directory is missing
            if fmt == "npz":
                _write_npz(arrays, fh)
            elif fmt == "torch":
                torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, fh)
        if fmt == "safetensors":  # streamed to the file by the library
            from safetensors.numpy import save_file

            save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_npz(arrays: dict[str, Array], fh: Any) -> None:
    """What ``np.savez`` writes (one ``KEY.npy`` member per key), for any key name:
    ``np.savez(fh, **arrays)`` takes a key named ``file`` or ``allow_pickle`` for its
    own argument."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def sniff(path: Path) -> str:
    """The format of a file ``write`` made: from its suffix (``.safetensors``,
    ``.npz``, ``.pt``/``.pth``), else from its first bytes."""
    by_suffix = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch",
                 ".pth": "torch"}
    if path.suffix in by_suffix:
        return by_suffix[path.suffix]
    with open(path, "rb") as fh:
        head = fh.read(9)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
    elif len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, JSON
        return "safetensors"
    raise ValueError(f"cannot tell the format of {path}: not a safetensors, npz or torch "
                     "file that pserver export wrote")


def read(path: Path) -> dict[str, Array]:
    """The arrays of a file ``write`` made."""
    fmt = sniff(path)
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is a torch file: reading it needs torch installed") from None
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
