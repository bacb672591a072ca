"""``dms_perf`` runs its Triton kernels on the CPU whatever was imported first (triton itself, or kvpress,
which imports it), with TRITON_INTERPRET unset: the interpreter flag is set on import of dms_perf and
triton's own library functions are rebuilt for the interpreter if triton was imported without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interpreter import skip_if_cpu_path_cannot_run_here

REPO = Path(__file__).resolve().parents[1]

KERNEL_CALLS = """
import torch
import dms_perf
from dms_perf import build_model, compact_by_bool, tiny_config
x = torch.randn(1, 2, 64, 32)
keep = torch.rand(1, 2, 64) > 0.5
values, offsets, positions = compact_by_bool(x, keep)   # tl.sum inside a @triton.jit helper
assert torch.equal(values, x[keep])
model = build_model(tiny_config(), backend="triton")    # prefill and decode kernels (tl.max, tl.cumsum, ...)
out = model.generate(torch.randint(0, 512, (1, 48)), max_new_tokens=3, do_sample=False)
assert out.shape == (1, 51), out.shape
print("kernels ran")
"""


@pytest.mark.parametrize("first", ["", "import triton", "import triton.language as tl", "import kvpress"])
def test_kernels_run_on_the_cpu_in_any_import_order(first):
    skip_if_cpu_path_cannot_run_here()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path on any host
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", first + "\n" + KERNEL_CALLS], capture_output=True, text=True,
                            env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels ran" in result.stdout
