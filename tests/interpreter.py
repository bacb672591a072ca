"""Whether this host's Triton interpreter can run our kernels on the CPU (tests that run CPU paths in a
subprocess on a GPU host ask first: the GPU image pairs Triton 3.6 with NumPy 2.4, whose interpreter
fails on a loop bound that depends on the program id, as the movers' prefix counts use)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count_up(out):
    n = 0
    for _ in range(0, tl.program_id(0) + 1):
        n += 1
    tl.store(out + tl.program_id(0), n)
out = torch.zeros(2, dtype=torch.int32)
count_up[(2,)](out)
assert out.tolist() == [1, 2], out.tolist()
"""


@functools.cache
def interpreter_problem() -> str | None:
    """Why the interpreter cannot run the kernels here (its last error line), or None if it can."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["no output"])[-1]


def skip_if_cpu_path_cannot_run_here() -> None:
    """On a GPU host whose interpreter is broken, skip (CPU CI runs the test); elsewhere do nothing."""
    if torch.cuda.is_available() and (problem := interpreter_problem()):
        pytest.skip(f"this host's Triton interpreter cannot run the kernels on the CPU ({problem}); "
                    "the CPU test run covers this test")
