"""What machine a figure was measured on: GPU name and slug (the baseline folder), driver, versions."""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (baseline folder per GPU model)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def device_info() -> dict[str, Any]:
    """GPU name, slug, driver, CUDA, torch and triton versions (or a CPU description)."""
    import transformers
    import triton

    info: dict[str, Any] = {
        "commit": source_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }
    if not HAS_CUDA:
        info.update(gpu="none", gpu_slug="cpu", cuda=None, driver=None)
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=props.name,
        gpu_slug=gpu_slug(props.name),
        cuda=torch.version.cuda,
        driver=_driver_version(),
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
    )
    return info


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        pass
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def source_commit() -> str | None:
    """The commit of the code that runs: ``DMS_PERF_COMMIT`` where the tree was copied without its git
    metadata (a GPU host given a working tree), else ``git rev-parse --short HEAD`` of the package's
    checkout, with ``-dirty`` when tracked files differ from it; None outside a checkout."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("DMS_PERF_COMMIT"):
        return os.environ["DMS_PERF_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return None
    return f"{head}-dirty" if dirty else head
