"""The numba-CUDA kernels in numba's CUDA simulator, against the numpy reference.

``NUMBA_ENABLE_CUDASIM=1`` only works when set before numba is imported, and
this test process imports numba already, so every simulated kernel runs in one
subprocess (``cuda_cases.py --plan sim``: sizes 0, 1, 7, 300 and 1000, float32
and float64, every optimizer variant, plus float16 gradients, host arrays, 2-D
params, grid-stride loops, argument errors and the lazy import). The parent
reads its JSON report once and asserts case by case. Without the simulator and
without a GPU, the ``cuda`` backend raises ``BackendUnavailable``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pserver.kernels import KernelError, default_backend

CASES_PATH = Path(__file__).with_name("cuda_cases.py")


def _load_cases() -> Any:
    spec = importlib.util.spec_from_file_location("pserver_cuda_cases", CASES_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _load_cases()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "PSERVER_KERNELS")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def sim_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every simulator case once, in a fresh process, and read its report."""
    out = tmp_path_factory.mktemp("cudasim") / "report.json"
    proc = subprocess.run([sys.executable, str(CASES_PATH), "--plan", "sim", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, check=False,
                          env=_env(NUMBA_ENABLE_CUDASIM="1"))
    if not out.exists():
        pytest.fail(f"the simulator run wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["simulated"], "the subprocess did not run in the CUDA simulator"
    return report


@pytest.mark.parametrize("case", cases.case_ids("sim"))
def test_simulated_kernel_matches_the_reference(case: str, sim_report: dict[str, Any]) -> None:
    assert case in sim_report["cases"], f"{case} did not run"
    result = sim_report["cases"][case]
    assert result["ok"], result["detail"]


def test_the_report_has_no_unexpected_cases(sim_report: dict[str, Any]) -> None:
    assert sorted(sim_report["cases"]) == sorted(cases.case_ids("sim"))


_NO_GPU = textwrap.dedent("""
    import json
    import numpy as np
    from pserver import kernels
    from pserver.kernels import BackendUnavailable
    out = {}
    for how in ("argument", "env"):
        try:
            if how == "argument":
                kernels.sgd(np.ones(3), np.ones(3), lr=0.1, backend="cuda")
            else:
                kernels.adam(np.ones(3), np.ones(3), np.zeros(3), np.zeros(3), step=1, lr=0.1)
        except BackendUnavailable as exc:
            out[how] = str(exc)
    print(json.dumps(out))
""")


def test_cuda_without_a_gpu_raises_backend_unavailable() -> None:
    """No simulator, and no visible GPU (``CUDA_VISIBLE_DEVICES`` empty hides one
    where present): asking for ``cuda`` raises, whether by argument or by
    ``PSERVER_KERNELS``."""
    proc = subprocess.run([sys.executable, "-c", _NO_GPU], capture_output=True, text=True,
                          timeout=120, check=True,
                          env=_env(CUDA_VISIBLE_DEVICES="", PSERVER_KERNELS="cuda"))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "argument" in out, out
    assert "env" in out, out
    assert "is_available() is False" in out["argument"]
    assert "NUMBA_ENABLE_CUDASIM" in out["argument"]


def test_pserver_kernels_env_selects_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSERVER_KERNELS", "cuda")
    assert default_backend() == "cuda"
    monkeypatch.setenv("PSERVER_KERNELS", "tpu")
    with pytest.raises(KernelError):
        default_backend()
