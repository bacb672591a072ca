"""The benchmark files run once in smoke mode (``--benchmark-disable``) as part of the test run, so
they cannot rot on machines without a GPU: every case executes its code path once, untimed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Every benchmark file, one smoke run each (``-k test_decode_step`` runs one file's).
BENCHMARK_FILES = sorted(path.name for path in (REPO / "benchmarks").glob("test_*.py"))


@pytest.mark.parametrize("name", BENCHMARK_FILES, ids=lambda name: name.removesuffix(".py"))
def test_benchmarks_run_in_smoke_mode(name):
    contexts = "64,256" if not torch.cuda.is_available() else "4096"
    cmd = [sys.executable, "-m", "pytest", f"benchmarks/{name}", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    cmd += ["--benchmark-disable", f"--context-lengths={contexts}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) > 0, tail
    assert not re.search(r"\d+ (failed|error)", result.stdout), tail


def test_host_bound_marks_follow_the_rules():
    """Which cases `dms-perf ci run` leaves out of the absolute gate (see README, "Which gate to trust")."""
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-m", "host_bound", "--context-lengths=64,256"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    marked = {line for line in result.stdout.splitlines() if "::" in line}
    assert "benchmarks/test_kernels.py::test_kernel[ctx256-compact_by_bool-loop-8]" in marked
    assert "benchmarks/test_kernels.py::test_kernel[ctx256-scatter_by_index-triton-1]" in marked
    assert "benchmarks/test_kernels.py::test_kernel[ctx256-scatter_by_index-triton-8]" not in marked
    assert "benchmarks/test_kernels.py::test_kernel[ctx256-scatter_by_index-triton-graph-1]" not in marked
    assert any("test_model.py::test_decode" in m for m in marked)
    assert not any("test_model.py::test_prefill" in m or "test_prefill_attention" in m for m in marked)
    assert any("test_end_to_end.py" in m for m in marked)
