"""pserver.keras on the TensorFlow backend, through real clusters: ``PSOptimizer``
learns scikit-learn's digits (at least 90 %, checkpoint included), ``PSEmbedding``
pulls rows and pushes their gradients (and graph mode is refused clearly), and
MovieLens-100K matrix factorisation with ``PSOptimizer`` for the dense head reaches
a test RMSE of at most 0.95.

A process's Keras backend is fixed once keras is imported, and the torch tests
import it in this one; so each case of ``keras_cases.py`` runs here as a child
process with ``KERAS_BACKEND=tensorflow`` against a cluster this test started,
within a deadline, under the warning filters of the test configuration (warnings
are errors). The child prints its result as one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CASES = Path(__file__).with_name("keras_cases.py")
WARNINGS = ["-W", "error",  # as pyproject's filterwarnings, which bind pytest's process only
            "-W", "ignore:__array__ implementation doesn't accept a copy keyword"
                  ":DeprecationWarning"]


def on_tensorflow(case: str, address: str, tmp: Path, timeout: float = 180.0
                  ) -> dict[str, Any]:
    """Run ``case`` in a TensorFlow-backend child (killed after ``timeout`` s) and
    return its result; fail with its output if it fails."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        proc = subprocess.run([sys.executable, *WARNINGS, str(CASES), case, address,
                               str(tmp)], capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired as exc:  # the child is killed; show what it said
        said = [(b or b"").decode(errors="replace")[-4000:] for b in (exc.stdout, exc.stderr)]
        raise AssertionError(f"{case} on tensorflow: no result within {timeout} s:\n"
                             + "\n".join(said)) from None
    assert proc.returncode == 0, (f"{case} on tensorflow exited {proc.returncode}:\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, proc.stdout
    result: dict[str, Any] = json.loads(results[0].removeprefix("RESULT "))
    assert result["backend"] == "tensorflow"
    return result


def test_model_fit_on_tensorflow_learns_digits(cluster_factory: Any, tmp_path: Path) -> None:
    c = cluster_factory("--shards", "2", "--replicas", "3")
    result = on_tensorflow("fit_digits", c.address, tmp_path)
    assert result["accuracy"] >= 0.9
    assert (tmp_path / "epoch-5.safetensors").is_file()


def test_ps_embedding_on_tensorflow_pulls_rows_and_pushes_their_gradients(
        cluster_factory: Any, tmp_path: Path) -> None:
    c = cluster_factory("--shards", "2")
    result = on_tensorflow("embedding_rows", c.address, tmp_path)
    assert result["rows"] == [-1.0, -0.5, -0.5, 0.0]


def test_ps_embedding_on_tensorflow_factorises_movielens(cluster_factory: Any,
                                                         tmp_path: Path) -> None:
    c = cluster_factory("--shards", "2", "--replicas", "3")
    result = on_tensorflow("movielens", c.address, tmp_path)
    assert result["rmse"] <= 0.95
    assert result["keys"]  # the dense head went through PSOptimizer
