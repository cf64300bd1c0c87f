"""Where a shard keeps its tensors: host memory or a CUDA GPU.

Owns the moves between host and device for a ``Memory`` of kind ``cpu`` (numpy
arrays, every call a no-op) or ``cuda`` (numba device arrays: values and
optimizer state stay on the GPU, gradients are copied up per push, values are
copied down per pull). The update kernels pick the CUDA backend by themselves
for device arrays (``dispatch``). Creating a ``cuda`` memory where no GPU (nor
numba's simulator) is available raises ``BackendUnavailable``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dispatch import _cuda
from .errors import KernelError

DEVICES = ("cpu", "cuda")


class Memory:
    """Host (``cpu``) or GPU (``cuda``) storage for a shard's tensors."""

    def __init__(self, device: str = "cpu") -> None:
        if device not in DEVICES:
            raise KernelError(f"device must be one of {DEVICES}, not {device!r}")
        self.device = device
        self._cuda = _cuda() if device == "cuda" else None

    def adopt(self, host: np.ndarray[Any, Any]) -> Any:
        """Where a new value lives: ``host`` itself, or a device copy of it."""
        return host if self._cuda is None else self._cuda.to_device(host)

    def adopt_all(self, arrays: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        return {k: self.adopt(v) for k, v in arrays.items()}

    def gradient(self, host: np.ndarray[Any, Any]) -> Any:
        """A gradient slice where the kernels can read it (a device copy on cuda)."""
        return host if self._cuda is None else self._cuda.to_device(host)

    def read(self, value: Any) -> np.ndarray[Any, Any]:
        """A value as a host array: the array itself on cpu, a fresh copy on cuda."""
        if self._cuda is None:
            return value  # type: ignore[no-any-return]
        out: np.ndarray[Any, Any] = value.copy_to_host()
        return out

    def copy(self, value: Any) -> Any:
        """A private copy of a value where it lives (for copy-on-write)."""
        return value.copy() if self._cuda is None else self._cuda.to_device(value.copy_to_host())
