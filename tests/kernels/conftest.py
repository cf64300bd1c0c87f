"""``gpu``-marked tests are deselected (not skipped) where no CUDA GPU is present.

A skipped test would read as "fine" in a summary although nothing ran; a
deselected one is reported as deselected. Only when gpu items were collected is
the GPU looked for: a machine without an NVIDIA device node is decided without
importing numba; otherwise ``numba.cuda.is_available()`` decides (the simulator,
``NUMBA_ENABLE_CUDASIM=1``, does not count as a GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


def gpu_present() -> bool:
    """Whether a real CUDA GPU can run kernels here."""
    if not any(Path(node).exists() for node in _DEVICE_NODES):
        return False
    from numba import config, cuda

    return bool(not config.ENABLE_CUDASIM and cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the gpu items when there is no GPU to run them on."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or gpu_present():
        return
    deselected = set(gpu_items)
    items[:] = [item for item in items if item not in deselected]
    config.hook.pytest_deselected(items=gpu_items)
