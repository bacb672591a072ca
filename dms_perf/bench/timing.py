"""The one timing helper used by benchmarks/, the CLI and CI.

GPU timing: ``cuda_sync_timer`` synchronizes the device before reading the host clock, so a
pytest-benchmark round of ``iterations`` back-to-back launches measures device time (launch
latency hides behind the queue). A case's figure is pytest-benchmark's median over such rounds
(``bench``); a reference that a case compares itself with is timed the same way (``median_call_ms``).
``do_bench_ms`` is triton.testing.do_bench's median: a cross-check beside the figure, never the figure.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
import warnings
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


@functools.cache
def matmul_flops_per_s() -> float:
    """Measured bf16 matrix-multiply rate, FLOP/s: one 8192 x 8192 x 8192 product (cuBLAS), the compute
    floors' rate as ``copy_bandwidth_bytes_per_s`` is the memory floors'."""
    if not HAS_CUDA:
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in "ab")
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench_ms(lambda: torch.mm(a, b, out=out), warmup_ms=50, rep_ms=300)
    return 2 * n**3 / (ms * 1e-3)


def rotating(make_inputs: Callable[[], Sequence[Any]], l2_bytes_each: int, min_total: int = 256 * 2**20):
    """An endless cycle over enough input sets (``make_inputs()`` each) to defeat a 50 MB L2 cache.

    Returns a zero-argument callable giving the next input set.
    """
    count = max(1, min(8, math.ceil(min_total / max(l2_bytes_each, 1))))
    sets = [make_inputs() for _ in range(count)]
    return itertools.cycle(sets).__next__


class DeviceSpans:
    """Device time of spans of a loop that must not wait for the device (a decode loop whose host runs ahead):
    ``begin()`` and ``end()`` record CUDA events in stream order, read only by ``elapsed_ms()`` once the loop is
    over. A span's time is the device's between its two events: its kernels' time when the host kept the queue
    full, plus any gap the host left. On a device without CUDA it records nothing (``elapsed_ms()`` is empty)."""

    def __init__(self, device: torch.device):
        self.enabled = torch.device(device).type == "cuda"
        self._pairs: list = []
        self._open = None

    def begin(self) -> None:
        if self.enabled:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()

    def end(self) -> None:
        if self.enabled and self._open is not None:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
            self._pairs.append((self._open, done))
            self._open = None

    def elapsed_ms(self) -> list[float]:
        """Each closed span's device time in ms, in order (synchronizes once)."""
        if self._pairs:
            self._pairs[-1][1].synchronize()
        return [start.elapsed_time(done) for start, done in self._pairs]


SLOW_CALL_MS = 500.0


class TimerDisagreement(UserWarning):
    """pytest-benchmark's median and do_bench's differ by more than 10 %."""


def graph_replays(fn: Callable[[], Any], count: int = 8, calls_per_graph: int = 1) -> Callable[[], Any]:
    """Capture ``count`` CUDA graphs of ``calls_per_graph`` back-to-back ``fn()`` calls each and return a
    callable replaying them in turn.

    Each captured call consumes the next input set of a ``rotating`` ``fn``, so replays still rotate
    inputs. Replays launch from C++ (a few microseconds), so the timing is the kernels' device time
    without Python launch overhead. A replay also has a fixed device-side cost (about 3.7 us on an
    H100, benchmarks/NOTES.md) that ``calls_per_graph > 1`` shares among its calls: their time per
    call is the steady-state rate of calls issued back to back, as the copy bandwidth is measured.
    ``fn`` must not synchronize the host (capture raises if it does).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(count * calls_per_graph):  # warm-up off the capture: compilation, autotuning, allocator
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for _ in range(count):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
        graphs.append(graph)
    next_graph = itertools.cycle(graphs).__next__
    return lambda: next_graph().replay()


def _calls_per_round(fn: Callable[[], Any], target_round_ms: float) -> tuple[int, float]:
    """Warm ``fn`` up (compilation, autotuning), then time a burst of calls: the calls that fill a round of
    ``target_round_ms``, and the time of one call in ms."""
    fn()
    burst = 1
    while True:
        synchronize()
        start = time.perf_counter()
        for _ in range(burst):
            fn()
        synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        # Bursts of up to 100 calls: one eager call alone is mostly its launch and the sync.
        if elapsed_ms >= 1.0 or burst >= 100:
            once_ms = elapsed_ms / burst
            return max(1, math.ceil(target_round_ms / max(once_ms, 1e-4))), once_ms
        burst *= 10


def median_call_ms(fn: Callable[[], Any], *, cuda_graph: bool = False, calls_per_graph: int = 1,
                   rounds: int = 15, target_round_ms: float = 5.0) -> float:
    """Median time of one ``fn()`` call in ms, measured as ``bench`` measures a case: rounds of
    back-to-back calls between device syncs, two warm-up rounds where a call is under ``SLOW_CALL_MS``,
    the median over ``rounds``; outside pytest-benchmark. For the references a case compares itself with
    (speedups), so that both sides of a ratio are the same statistic. ``cuda_graph``, ``calls_per_graph``:
    time replays of CUDA graphs of ``fn`` as ``bench`` does (``graph_replays``), per call.
    """
    if calls_per_graph > 1 and not cuda_graph:
        raise ValueError("calls_per_graph > 1 needs cuda_graph=True (the calls are captured into one graph)")
    if cuda_graph:
        fn = graph_replays(fn, calls_per_graph=calls_per_graph)
    iterations, once_ms = _calls_per_round(fn, target_round_ms)
    warmup_rounds = 2 if once_ms < SLOW_CALL_MS else 0
    times = []
    for round_index in range(warmup_rounds + rounds):
        synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        synchronize()
        if round_index >= warmup_rounds:
            times.append((time.perf_counter() - start) / iterations)
    return statistics.median(times) * 1e3 / calls_per_graph


def bench(
    benchmark,
    fn: Callable[[], Any],
    *,
    cuda_graph: bool = False,
    calls_per_graph: int = 1,
    target_round_ms: float = 5.0,
    rounds: int = 15,
) -> float | None:
    """Time ``fn`` with pytest-benchmark; returns the median time of one call in seconds (None when
    benchmarking is disabled, e.g. the CPU smoke run).

    The figure is pytest-benchmark's median, not do_bench's: it is the statistic that the JSON stores and
    that ``--benchmark-compare`` and the CI gate compare, so a speedup or a floor fraction derived from it
    agrees with the number gated. do_bench times each call alone with CUDA events after an L2 flush, which
    measures a different thing (a cold call with its launch gap) and, for small kernels, reads slower
    than calls issued back to back as a model issues them. It stays as a cross-check only:
    ``extra_info["do_bench_median_ms"]`` and ``extra_info["timer_agreement"]`` (our median over
    do_bench's; a ``TimerDisagreement`` warning outside 10 %).

    On CUDA the benchmark timer is ``cuda_sync_timer`` (set in conftest.py); each round runs enough
    back-to-back calls to last ``target_round_ms``. ``cuda_graph=True`` times replays of captured CUDA
    graphs of ``fn`` (device time without Python launch cost; ``extra_info["timing"]`` says which);
    ``calls_per_graph`` back-to-back calls per graph (``graph_replays``): the stored pytest-benchmark
    statistics are then per replay, and ``extra_info["median_ms"]`` (the same median), the cross-check
    and the return value per call. Derived figures use the return value (or ``median_ms``), and
    references are timed with ``median_call_ms``.
    """
    if calls_per_graph > 1 and not cuda_graph:
        raise ValueError("calls_per_graph > 1 needs cuda_graph=True (the calls are captured into one graph)")
    if not HAS_CUDA or getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return None
    if cuda_graph:
        fn = graph_replays(fn, calls_per_graph=calls_per_graph)
    iterations, once_ms = _calls_per_round(fn, target_round_ms)
    benchmark.extra_info["timing"] = (
        "eager launches" if not cuda_graph
        else "cuda-graph replay" if calls_per_graph == 1
        else f"cuda-graph replay of {calls_per_graph} back-to-back calls (statistics per replay)"
    )
    benchmark.extra_info["calls_per_replay"] = calls_per_graph
    # do_bench alone calls fn 5 times to size its run: cross-check only what is not seconds long.
    cross_check = once_ms < SLOW_CALL_MS
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=2 if cross_check else 0)
    call_s = benchmark.stats.stats.median / calls_per_graph
    benchmark.extra_info["median_ms"] = call_s * 1e3
    if cross_check:
        do_bench_call_ms = do_bench_ms(fn) / calls_per_graph
        agreement = call_s * 1e3 / do_bench_call_ms
        benchmark.extra_info["do_bench_median_ms"] = do_bench_call_ms
        benchmark.extra_info["timer_agreement"] = agreement
        if not 0.9 <= agreement <= 1.1:
            warnings.warn(
                f"{benchmark.name}: pytest-benchmark median {call_s * 1e3:.4g} ms vs do_bench "
                f"{do_bench_call_ms:.4g} ms per call (ratio {agreement:.2f}, outside 10 %): host-bound launches "
                "or a call that changes its own state",
                TimerDisagreement,
                stacklevel=2,
            )
    return call_s
