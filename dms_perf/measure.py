"""The one timing / device-info helper used by benchmarks/, the CLI and CI.

GPU timing: ``cuda_sync_timer`` synchronizes the device before reading the host clock, so a
pytest-benchmark round of ``iterations`` back-to-back launches measures device time (launch
latency hides behind the queue). ``do_bench_ms`` is triton.testing.do_bench's median, recorded
beside every pytest-benchmark median as a cross-check.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    import transformers
    import triton

    info: dict[str, Any] = {
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


def bench(
    benchmark,
    fn: Callable[[], Any],
    *,
    cuda_graph: bool = False,
    calls_per_graph: int = 1,
    target_round_ms: float = 5.0,
    rounds: int = 15,
) -> float | None:
    """Time ``fn`` with pytest-benchmark; on CUDA also record do_bench's median in ``extra_info``.

    On CUDA the benchmark timer is ``cuda_sync_timer`` (set in conftest.py); each round runs enough
    back-to-back calls to last ``target_round_ms``. ``cuda_graph=True`` times replays of captured CUDA
    graphs of ``fn`` (device time without Python launch cost; ``extra_info["timing"]`` says which);
    ``calls_per_graph`` back-to-back calls per graph (``graph_replays``): the stored pytest-benchmark
    statistics and ``extra_info["do_bench_median_ms"]`` are then per replay, ``extra_info["median_ms"]``
    and the return value per call.
    Returns the pytest-benchmark median in seconds (None when benchmarking is disabled, e.g. the CPU
    smoke run).
    """
    if calls_per_graph > 1 and not cuda_graph:
        raise ValueError("calls_per_graph > 1 needs cuda_graph=True (the calls are captured into one graph)")
    if not HAS_CUDA or getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return None
    if cuda_graph:
        fn = graph_replays(fn, calls_per_graph=calls_per_graph)
    fn()  # warm-up: compilation, autotuning
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    benchmark.extra_info["timing"] = (
        "eager launches" if not cuda_graph
        else "cuda-graph replay" if calls_per_graph == 1
        else f"cuda-graph replay of {calls_per_graph} back-to-back calls (statistics per replay)"
    )
    benchmark.extra_info["calls_per_replay"] = calls_per_graph
    # do_bench's estimate alone calls fn 5 times: cross-check only what is not seconds long.
    cross_check = once_ms < SLOW_CALL_MS
    ref_ms = do_bench_ms(fn) if cross_check else once_ms
    iterations = max(1, math.ceil(target_round_ms / max(ref_ms, 1e-4)))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=2 if cross_check else 0)
    median_s = benchmark.stats.stats.median
    # Derived figures (speedups, TFLOP/s) use this, per call: do_bench's median, or ours where do_bench
    # was skipped.
    benchmark.extra_info["median_ms"] = (ref_ms if cross_check else median_s * 1e3) / calls_per_graph
    if cross_check:
        agreement = (median_s * 1e3) / ref_ms
        benchmark.extra_info["do_bench_median_ms"] = ref_ms
        benchmark.extra_info["timer_agreement"] = agreement
        if not 0.9 <= agreement <= 1.1:
            warnings.warn(
                f"{benchmark.name}: pytest-benchmark median {median_s * 1e3:.4g} ms vs do_bench {ref_ms:.4g} ms "
                f"(ratio {agreement:.2f}, outside 10 %): host-bound launches or a call that changes its own state",
                TimerDisagreement,
                stacklevel=2,
            )
    return median_s / calls_per_graph


# --- end-to-end generation (dms-perf bench, benchmarks/test_end_to_end.py) -----------------------

NOT_MEASURED = None  # a figure that does not apply (no GPU for VRAM, one token for decode speed)


@dataclass
class GenerationRun:
    """One timed greedy generation: prefill (first token included), then ``new_tokens - 1`` decode steps."""

    prefill_s: float
    decode_s: float
    new_tokens: int
    generated_ids: torch.Tensor  # [new_tokens] int64 on CPU
    peak_vram_bytes: int | None
    kv_bytes: int
    kept_slots: int  # (layer, batch, KV head, token) slots the cache still attends to at the end
    dense_slots: int  # the same count for an uncompressed cache


def generate_once(model, input_ids: torch.Tensor, *, new_tokens: int, press=None) -> GenerationRun:
    """Greedy generation with explicit positions (a compressed cache is shorter than the prompt).

    ``press``: a kvpress press active during the whole generation (None for vanilla and DMS models,
    whose cache is created by the model). Synchronizes the device around each timed phase.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    length = input_ids.shape[-1]
    positions = torch.arange(length, length + new_tokens, device=device).view(1, -1)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    tokens = []
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        synchronize()
        start = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        synchronize()
        prefilled = time.perf_counter()
        cache = out.past_key_values
        tokens.append(token)
        for step in range(new_tokens - 1):
            pos = positions[:, step : step + 1]
            # Positions only: transformers >= 5.4 dropped ``cache_position`` (5.2 derives it from the cache).
            out = model(input_ids=token, past_key_values=cache, position_ids=pos, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        synchronize()
        done = time.perf_counter()
    kv_bytes, kept, dense = kv_cache_stats(model, cache, seen_tokens=length + new_tokens - 1)
    return GenerationRun(
        prefill_s=prefilled - start,
        decode_s=done - prefilled,
        new_tokens=new_tokens,
        generated_ids=torch.cat(tokens, dim=-1)[0].cpu(),
        peak_vram_bytes=torch.cuda.max_memory_allocated() if HAS_CUDA else NOT_MEASURED,
        kv_bytes=kv_bytes,
        kept_slots=kept,
        dense_slots=dense,
    )


def kv_cache_stats(model, cache, *, seen_tokens: int) -> tuple[int, int, int]:
    """(bytes held, slots attended to, slots of a dense cache) for a DMSCache or a transformers cache.

    Slots count (layer, batch, KV head, token). A DMSCache holds per-head lengths (synchronizes);
    kvpress presses that shrink the cache shorten the tensors; DMSPress instead hides keys, listed per
    layer in ``self_attn.masked_key_indices``.
    """
    from dms_perf.dms.cache import DMSCache, kv_cache_bytes

    kept = dense = 0
    for index, layer in enumerate(cache.layers):
        if isinstance(cache, DMSCache):  # flat [slots, D] buffers: heads come from the per-head lengths
            lengths = cache.head_lengths(index)
            dense += lengths.numel() * seen_tokens
            kept += int(lengths.sum())
            continue
        batch, heads = layer.keys.shape[:2]
        dense += batch * heads * seen_tokens
        masked = getattr(model.model.layers[index].self_attn, "masked_key_indices", None)
        kept += batch * heads * layer.keys.shape[2] - (len(masked[0]) if masked is not None else 0)
    return kv_cache_bytes(cache), kept, dense


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else NOT_MEASURED


def _failure(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")


def release_memory() -> None:
    """Free what a failed or finished cell left behind, so the next cell starts clean."""
    gc.collect()
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def summarize_runs(runs: list[GenerationRun], *, context_length: int, retrieval: str) -> dict[str, Any]:
    """Median figures over timed runs (one row of the results table)."""
    prefill = _median([r.prefill_s for r in runs])
    decode = _median([r.decode_s for r in runs])
    total = _median([r.prefill_s + r.decode_s for r in runs])
    last = runs[-1]
    decode_steps = last.new_tokens - 1
    return {
        "status": "ok",
        "prefill_s": prefill,
        "prefill_tok_s": context_length / prefill,
        "decode_tok_s": decode_steps / decode if decode_steps and decode > 0 else NOT_MEASURED,
        "total_s": total,
        "generated_tokens": last.new_tokens,
        "peak_vram_bytes": _median([r.peak_vram_bytes for r in runs]),
        "kv_bytes": last.kv_bytes,
        "compression": last.dense_slots / last.kept_slots if last.kept_slots else NOT_MEASURED,
        "retrieval": retrieval,
        "repeats": len(runs),
        "runs_total_s": [r.prefill_s + r.decode_s for r in runs],
    }


def measure_generation(
    model,
    workload,
    method,
    *,
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    real_weights: bool = False,
    device=None,
) -> dict[str, Any]:
    """End-to-end figures for one (context, method) cell; never raises for a failing cell.

    ``workload``: a ``dms_perf.workloads.Workload``; ``method``: a ``dms_perf.methods.Method`` (its
    press, if any, is built once on this prompt, outside the timing). ``warmup`` untimed generations
    precede ``repeats`` timed ones; figures are medians. ``real_weights``: score retrieval (else
    "n/a (random weights)"); ``device``: where the prompt goes (default: the model's). Returns a dict
    with ``status`` "ok", "OOM",
    "error: ..." or "skipped: ..." (then without figures); memory is released either way.
    """
    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0 and new_tokens >= 1, got repeats={repeats}, "
            f"warmup={warmup}, new_tokens={new_tokens}"
        )
    row: dict[str, Any] = {"context": workload.context_length, "method": method.name, "new_tokens": new_tokens}
    if workload.context_length < method.min_context:
        row["status"] = f"skipped: {method.name} needs a prompt of at least {method.min_context} tokens"
        return row
    try:
        input_ids = workload.input_ids.to(device if device is not None else next(model.parameters()).device)
        method.prepare(model)
        press = method.press_for(model, input_ids)
        for _ in range(warmup):
            generate_once(model, input_ids, new_tokens=new_tokens, press=press)
            release_memory()
        runs = []
        for _ in range(repeats):
            runs.append(generate_once(model, input_ids, new_tokens=new_tokens, press=press))
            release_memory()
        retrieval = workload.retrieval(runs[-1].generated_ids, real_weights=real_weights)
        row.update(summarize_runs(runs, context_length=workload.context_length, retrieval=retrieval))
    except Exception as exc:  # one failing cell must not stop the matrix
        row["status"] = _failure(exc)
    release_memory()
    return row
