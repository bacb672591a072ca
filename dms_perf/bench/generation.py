"""End-to-end generation runs (``dms-perf bench``, ``benchmarks/test_end_to_end.py``): timed greedy
generations, KV-cache accounting, and one row per (context, method) cell with failures classified."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.timing import synchronize

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


def generate_once(model, input_ids: torch.Tensor, *, new_tokens: int, press=None,
                  press_on_engine: bool = False) -> GenerationRun:
    """Greedy generation with explicit positions (a compressed cache is shorter than the prompt).

    ``press``: a kvpress press active during the whole generation (None for vanilla and DMS models,
    whose cache is created by the model). ``press_on_engine``: the press is active during the prefill
    only, run by a Qwen3-DMS model in passthrough (transformers' attention); its compressed cache is then
    handed to the DMS engine (``DMSCache.from_dense``, the conversion timed with the prefill) and decoded
    there with eviction off. Synchronizes the device around each timed phase.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    length = input_ids.shape[-1]
    positions = torch.arange(length, length + new_tokens, device=device).view(1, -1)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    tokens = []
    whole_run_press = press if press is not None and not press_on_engine else None
    with torch.inference_mode(), whole_run_press(model) if whole_run_press is not None else contextlib.nullcontext():
        synchronize()
        start = time.perf_counter()
        if press_on_engine:
            out, cache = _prefill_for_the_engine(model, input_ids, press)
        else:
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        synchronize()
        prefilled = time.perf_counter()
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


def _prefill_for_the_engine(model, input_ids, press):
    """The press's prefill in transformers' attention, its cache converted for the DMS engine."""
    from transformers.cache_utils import DynamicCache

    from dms_perf.model.cache import DMSCache

    with model.passthrough(), press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    cache = DMSCache.from_dense(out.past_key_values, model.config.dms_window_size, model.dms_capacity_step)
    return out, cache


def kv_cache_stats(model, cache, *, seen_tokens: int) -> tuple[int, int, int]:
    """(bytes held, slots attended to, slots of a dense cache) for a DMSCache or a transformers cache.

    Slots count (layer, batch, KV head, token). A DMSCache holds per-head lengths (synchronizes);
    kvpress presses that shrink the cache shorten the tensors; DMSPress instead hides keys, listed per
    layer in ``self_attn.masked_key_indices``.
    """
    from dms_perf.model.cache import DMSCache, kv_cache_bytes

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


def failure_status(exc: BaseException) -> str:
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

    ``workload``: a ``dms_perf.bench.workloads.Workload``; ``method``: a ``dms_perf.bench.methods.Method`` (its
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
        on_engine = method.family.press_on_engine
        for _ in range(warmup):
            generate_once(model, input_ids, new_tokens=new_tokens, press=press, press_on_engine=on_engine)
            release_memory()
        runs = []
        for _ in range(repeats):
            runs.append(generate_once(model, input_ids, new_tokens=new_tokens, press=press, press_on_engine=on_engine))
            release_memory()
        retrieval = workload.retrieval(runs[-1].generated_ids, real_weights=real_weights)
        row.update(summarize_runs(runs, context_length=workload.context_length, retrieval=retrieval))
    except Exception as exc:  # one failing cell must not stop the matrix
        row["status"] = failure_status(exc)
    release_memory()
    return row
