"""``pserver bench`` refuses bad input in one line, before measuring anything:
an address where no cluster answers, an empty size list, an output path it
cannot write, and run options given with ``--report-from`` (which runs nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pserver.supervisor import free_ports

# the smallest run: only the dense section, one size, one round
MINIMAL = ("--sizes", "4K", "--rounds", "1", "--latency-count", "1", "--transport", "tcp",
           "--no-kernels", "--no-sparse", "--no-distributed", "--no-extras",
           "--failover-kills", "0", "--shards", "1", "--no-progress")


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pserver", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_error_line(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    error = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(error) == 1, res.stderr
    for n in needles:
        assert n in error[0], error[0]
    assert res.stdout == ""  # nothing was measured or printed
    return error[0]


@pytest.mark.timeout(60)
def test_an_address_without_a_cluster_is_one_line() -> None:
    port = free_ports("127.0.0.1", 1)[0]
    res = bench("--address", f"tcp://127.0.0.1:{port}", *MINIMAL, timeout=45)
    one_error_line(res, 1, "cannot reach a cluster at", str(port))


@pytest.mark.timeout(60)
def test_a_malformed_address_is_one_line() -> None:
    one_error_line(bench("--address", "not-an-address", *MINIMAL), 1, "not-an-address")


def test_an_empty_size_list_is_refused() -> None:
    one_error_line(bench("--sizes", ",", "--no-progress"), 2, "--sizes", "no size given")


@pytest.mark.timeout(60)
def test_unwritable_outputs_are_refused_before_the_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_error_line(bench(*MINIMAL, "--out", str(blocker / "run.json")), 1, "JSON report")
    one_error_line(bench(*MINIMAL, "--report", "--docs-dir", str(blocker / "docs"),
                         "--results-dir", str(tmp_path / "results")), 1, "the report")
    one_error_line(bench(*MINIMAL, "--report", "--docs-dir", str(tmp_path / "docs"),
                         "--results-dir", str(blocker / "results")), 1, "JSON report")
    assert not (tmp_path / "docs" / "benchmarks.md").exists()


def test_report_from_takes_no_run_options(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps({}))
    one_error_line(bench("--report-from", str(src), "--out", str(tmp_path / "copy.json")), 2,
                   "--report-from", "--out")
    one_error_line(bench("--report-from", str(src), "--json", "--quick"), 2, "--json", "--quick")
    assert not (tmp_path / "copy.json").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_error_line(bench("--report-from", str(src), "--docs-dir", str(blocker / "docs")), 1,
                   "the report")
