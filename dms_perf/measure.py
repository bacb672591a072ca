"""The one timing / device-info helper used by benchmarks/, the CLI and CI.

GPU timing: ``cuda_sync_timer`` synchronizes the device before reading the host clock, so a
pytest-benchmark round of ``iterations`` back-to-back launches measures device time (launch
latency hides behind the queue). ``do_bench_ms`` is triton.testing.do_bench's median, recorded
beside every pytest-benchmark median as a cross-check.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA


def cuda_sync_timer() -> float:
    """Host clock read after the device queue drained (pytest-benchmark ``--benchmark-timer``)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (baseline folder per GPU model)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def device_info() -> dict[str, Any]:
    """GPU name, slug, driver, CUDA, torch and triton versions (or a CPU description)."""
    import triton

    info: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__}
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
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def do_bench_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of ``fn`` in ms (triton.testing.do_bench: CUDA events, L2 flushed per call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


@functools.cache
def copy_bandwidth_bytes_per_s() -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written (1 GiB copy)."""
    if not HAS_CUDA:
        return float("nan")
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src), warmup_ms=50, rep_ms=300)
    return 2 * 2**30 / (ms * 1e-3)


def rotating(make_inputs: Callable[[], Sequence[Any]], l2_bytes_each: int, min_total: int = 256 * 2**20):
    """An endless cycle over enough input sets (``make_inputs()`` each) to defeat a 50 MB L2 cache.

    Returns a zero-argument callable giving the next input set.
    """
    count = max(1, min(8, math.ceil(min_total / max(l2_bytes_each, 1))))
    sets = [make_inputs() for _ in range(count)]
    return itertools.cycle(sets).__next__


def bench(benchmark, fn: Callable[[], Any], *, target_round_ms: float = 5.0, rounds: int = 15) -> float | None:
    """Time ``fn`` with pytest-benchmark; on CUDA also record do_bench's median in ``extra_info``.

    On CUDA the benchmark timer must be ``cuda_sync_timer`` (benchmarks/conftest.py sets it); each
    round runs enough back-to-back calls to last ``target_round_ms``. Returns the pytest-benchmark
    median in seconds (None when benchmarking is disabled, e.g. the CPU smoke run).
    """
    if not HAS_CUDA or getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return None
    fn()
    torch.cuda.synchronize()
    ref_ms = do_bench_ms(fn)
    iterations = max(1, math.ceil(target_round_ms / max(ref_ms, 1e-4)))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=2)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["do_bench_median_ms"] = ref_ms
    benchmark.extra_info["timer_agreement"] = (median_s * 1e3) / ref_ms
    return median_s
