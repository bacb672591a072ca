"""The benchmark files run once in smoke mode (``--benchmark-disable``) as part of the test run, so
they cannot rot on machines without a GPU: every case executes its code path once, untimed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_benchmarks_run_in_smoke_mode():
    contexts = "64,256" if not torch.cuda.is_available() else "4096"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    cmd += ["--benchmark-disable", f"--context-lengths={contexts}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) > 0, tail
    assert not re.search(r"\d+ (failed|error)", result.stdout), tail
