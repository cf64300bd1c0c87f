"""Export a cluster's dense keys to a file loadable without pserver, and back.

Owns the file formats of ``pserver export`` and ``pserver serve --restore``:
safetensors (``.safetensors``), numpy (``.npz``) and torch (``.pt``, needs
torch). Keys keep their names, shapes and dtypes; the file does not depend on
the shard count. Optimizer state and sparse tables are not exported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "npz", "torch")
Array = np.ndarray[Any, Any]


def write(arrays: dict[str, Array], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(path))
    elif fmt == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
    elif fmt == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError("--format torch needs torch installed") from None
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


def read(path: Path) -> dict[str, Array]:
    """The arrays of a file ``write`` made (format chosen by the file's suffix)."""
    suffix = path.suffix
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix in (".pt", ".pth"):
        import torch

        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    raise ValueError(f"cannot tell the format of {path}: use .safetensors, .npz or .pt")
