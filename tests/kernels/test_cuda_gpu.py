"""The numba-CUDA kernels on a real GPU, against the numpy reference.

The same cases as ``test_cuda_sim.py`` (``cuda_cases.py``), with arrays of 7,
4099 and 1,000,003 elements and up to 100-step trajectories, run in one fresh
process with the simulator switched off. Marked ``gpu``: ``conftest.py``
deselects these tests where no GPU is present (``pytest -m gpu tests/kernels``
on a GPU machine, or ``python bench/gpu.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

CASES_PATH = Path(__file__).with_name("cuda_cases.py")


def _load_cases() -> Any:
    spec = importlib.util.spec_from_file_location("pserver_cuda_cases", CASES_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _load_cases()


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every GPU case once, in a fresh process, and read its report."""
    out = tmp_path_factory.mktemp("cudagpu") / "report.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "PSERVER_KERNELS")}
    proc = subprocess.run([sys.executable, str(CASES_PATH), "--plan", "gpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    if not out.exists():
        pytest.fail(f"the GPU run wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")
    report: dict[str, Any] = json.loads(out.read_text())
    assert not report["simulated"], "the GPU run used the simulator"
    return report


@pytest.mark.parametrize("case", cases.case_ids("gpu"))
def test_gpu_kernel_matches_the_reference(case: str, gpu_report: dict[str, Any]) -> None:
    assert case in gpu_report["cases"], f"{case} did not run"
    result = gpu_report["cases"][case]
    assert result["ok"], result["detail"]
