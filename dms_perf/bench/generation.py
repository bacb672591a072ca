"""End-to-end generation runs (``dms-perf bench``, ``benchmarks/test_end_to_end.py``): timed greedy
generations of one prompt or of a batch of prompts, KV-cache accounting, and one row per (context,
method, batch) cell with failures classified."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.timing import synchronize

NOT_MEASURED = None  # a figure that does not apply (no GPU for VRAM, one token for decode speed)
TRACE_POINTS = 64  # a generation's trace samples every max(TRACE_SPACING, new_tokens // TRACE_POINTS) tokens
# Fewest steps between two regular trace points: each point synchronizes the device, which a decode step
# replayed from a CUDA graph would otherwise never do (a short generation would sync at every step).
TRACE_SPACING = 8
TRACE_KEYS = ("tokens", "kv_bytes", "kept_kv_bytes", "decode_s")


@dataclass
class GenerationRun:
    """One timed greedy generation of ``batch`` sequences: prefill (first tokens included), then
    ``new_tokens - 1`` decode steps, each giving one token per sequence."""

    prefill_s: float
    decode_s: float
    new_tokens: int  # per sequence
    generated_ids: torch.Tensor  # int64 on CPU: [new_tokens] (generate_once), [batch, new_tokens] (generate_batch)
    peak_vram_bytes: int | None
    kv_bytes: int  # bytes the whole batch's cache holds, rows reserved for decoding included
    kept_slots: int  # (layer, batch, KV head, token) slots the cache still attends to at the end
    dense_slots: int  # the same count for an uncompressed cache
    batch: int = 1
    peak_pages: int | None = None  # on a paged KV pool: the most pages in use at once during the run
    kept_kv_bytes: int | None = None  # bytes of the kept slots' keys and values (kept_slots of them)
    peak_kv_bytes: int | None = None  # the most bytes the batch cache held at a trace point or at the end
    quarter_steps: int = 0  # decode steps in a quarter of the generation: max(1, steps // 4), 0 without a step
    first_quarter_s: float | None = None  # decode seconds of the first quarter_steps steps
    last_quarter_s: float | None = None  # decode seconds of the last quarter_steps steps
    trace: dict[str, list] | None = None  # TRACE_KEYS -> one value per trace point (``generate_batch``)


def generate_once(model, input_ids: torch.Tensor, *, new_tokens: int, press=None,
                  press_on_engine: bool = False, on_tokens: Callable[[int, int], None] | None = None
                  ) -> GenerationRun:
    """Greedy generation of one prompt ``input_ids`` [1, L]: ``generate_batch`` of one, its
    ``generated_ids`` [new_tokens]."""
    run = generate_batch(model, [input_ids], new_tokens=new_tokens, press=press, press_on_engine=press_on_engine,
                         on_tokens=on_tokens)
    return replace(run, generated_ids=run.generated_ids[0])


def generate_batch(model, prompts: Sequence[torch.Tensor], *, new_tokens: int, press=None,
                   press_on_engine: bool = False, on_tokens: Callable[[int, int], None] | None = None
                   ) -> GenerationRun:
    """Greedy generation of B prompts of one length, prefilled sequence by sequence, decoded together.

    ``prompts``: B tensors of ids [1, L]. Each is prefilled on its own (the activations of one sequence,
    not of B at once) and gives its first token; the B caches are then joined into one batch cache
    (``join_caches``; one cache is used as it is) and decoded together: each step feeds the B last tokens
    [B, 1] with explicit positions (a compressed cache is shorter than the prompt), greedy.

    ``press``: a kvpress press active during the whole generation (None for vanilla and DMS models,
    whose cache is created by the model). ``press_on_engine``: the press is active during the prefill
    only, run by a Qwen3-DMS model in passthrough (transformers' attention); its compressed cache is then
    handed to the DMS engine (``DMSCache.from_dense``, the conversion timed with the prefill) and decoded
    there with eviction off.

    A Qwen3-DMS model on a paged KV pool (``model.use_kv_pool``, the decode engine) decodes on the pool:
    one prompt is prefilled into it, a batch's sequences are copied into it one by one as they are
    prefilled (``join_dms_caches``), so that the peak holds the pool and one sequence; each head takes
    pages as it grows. Off a pool, a DMS cache reserves ``max(dms_capacity_step, new_tokens)`` decode rows
    per head: no re-size during the generation.

    Timed (the device synchronized around each phase): ``prefill_s`` = every prefill, first token and the
    join; ``decode_s`` = the ``new_tokens - 1`` batched steps. Peak VRAM is that of the whole run (without a
    pool, the join holds the B sequence caches and the batch cache at once). KV figures are the batch
    cache's. A batch whose press hides keys instead of removing them (kvpress DMSPress) raises ``HiddenKeys``.

    The decode is this explicit greedy loop (not transformers' ``generate``), so the trace is taken at step
    boundaries: at 1 token generated (the prefill's), every ``max(TRACE_SPACING, new_tokens // TRACE_POINTS)`` tokens,
    at the quarter boundaries and at the end, ``trace`` records per point the tokens generated per
    sequence, the KV bytes held and kept and the decode seconds so far (``trace_sample``). Only those points
    synchronize the device; the sampling itself is kept off the decode clock. ``first_quarter_s`` and
    ``last_quarter_s`` time the first and last ``quarter_steps`` decode steps on that clock;
    ``peak_kv_bytes`` is the largest KV held at a point (exact for today's caches, which only grow).
    ``on_tokens(generated, new_tokens)`` is called at every trace point (a progress line).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    prompts = list(prompts)
    if not prompts or any(p.dim() != 2 or p.shape[0] != 1 for p in prompts):
        shapes = [tuple(p.shape) for p in prompts]
        raise ValueError(f"prompts must be one or more [1, L] id tensors, got shapes {shapes}")
    if len({p.shape[1] for p in prompts}) != 1:
        raise ValueError(f"the prompts of a batch must have one length, got {[p.shape[1] for p in prompts]}")
    batch, length = len(prompts), prompts[0].shape[1]
    device = prompts[0].device
    pool = getattr(model, "dms_pool", None)
    dms = hasattr(model, "make_dms_cache")
    reserve = max(model.dms_capacity_step, new_tokens) if dms and pool is None else None
    positions = torch.arange(length, length + new_tokens, device=device).view(1, -1)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    tokens = []
    with torch.inference_mode(), press_during_run(model, press, press_on_engine=press_on_engine):
        synchronize()
        start = time.perf_counter()
        firsts = []

        def prefill(input_ids, pooled=False):
            out, cache = prefill_prompt(model, input_ids, press=press, press_on_engine=press_on_engine,
                                        capacity_step=reserve, pooled=pooled)
            if batch > 1:
                _refuse_hidden_keys(model)
            firsts.append(out.logits[:, -1:].argmax(-1))
            return cache

        if pool is not None and batch == 1 and not press_on_engine:
            cache = prefill(prompts[0], pooled=True)
        elif pool is not None:
            cache = join_dms_caches((prefill(input_ids) for input_ids in prompts), pool=pool)
        else:
            cache = join_caches([prefill(input_ids) for input_ids in prompts])
        token = torch.cat(firsts)  # [B, 1]
        synchronize()
        prefilled = time.perf_counter()
        tokens.append(token)
        steps = new_tokens - 1
        quarter = max(1, steps // 4) if steps else 0
        every = max(TRACE_SPACING, new_tokens // TRACE_POINTS)
        points = {*range(every, new_tokens + 1, every), 1, 1 + quarter, new_tokens - quarter, new_tokens}
        trace: dict[str, list] = {key: [] for key in TRACE_KEYS}
        sampling = 0.0  # seconds spent in trace_sample, kept off the decode clock

        def sample(generated: int) -> None:
            nonlocal sampling
            synchronize()  # one device sync per trace point, never per step
            now = time.perf_counter()
            held, kept = trace_sample(model, cache, seen_tokens=length + generated - 1)
            for key, value in zip(TRACE_KEYS, (generated, held, kept, now - prefilled - sampling), strict=True):
                trace[key].append(value)
            if on_tokens is not None:
                on_tokens(generated, new_tokens)
            sampling += time.perf_counter() - now

        sample(1)
        for step in range(steps):
            pos = positions[:, step : step + 1].expand(batch, 1)
            # Positions only: transformers >= 5.4 dropped ``cache_position`` (5.2 derives it from the cache).
            out = model(input_ids=token, past_key_values=cache, position_ids=pos, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            if step + 2 in points:  # tokens generated after this step
                sample(step + 2)
        synchronize()
        done = time.perf_counter()
    kv_bytes, kept, dense = kv_cache_stats(model, cache, seen_tokens=length + new_tokens - 1)
    kept_bytes = kept * kv_slot_bytes(cache)
    at = dict(zip(trace["tokens"], trace["decode_s"], strict=True))
    return GenerationRun(
        prefill_s=prefilled - start,
        decode_s=done - prefilled - sampling,
        new_tokens=new_tokens,
        generated_ids=torch.cat(tokens, dim=-1).cpu(),
        peak_vram_bytes=torch.cuda.max_memory_allocated() if HAS_CUDA else NOT_MEASURED,
        kv_bytes=kv_bytes,
        kept_slots=kept,
        dense_slots=dense,
        batch=batch,
        peak_pages=pool.peak_pages_in_use if pool is not None else None,
        kept_kv_bytes=kept_bytes,
        peak_kv_bytes=max([kv_bytes, *trace["kv_bytes"]]),
        quarter_steps=quarter,
        first_quarter_s=at[1 + quarter] - at[1] if steps else None,
        last_quarter_s=at[new_tokens] - at[new_tokens - quarter] if steps else None,
        trace=trace,
    )


def join_caches(caches: list):
    """One batch cache from single-sequence caches that have seen the same tokens: sequence i of the
    result is ``caches[i]``. One cache is returned as it is; DMSCaches join with ``join_dms_caches``,
    transformers' DynamicCaches with ``join_dense_caches``."""
    from dms_perf.model.cache import DMSCache

    if len(caches) == 1:
        return caches[0]
    if all(isinstance(c, DMSCache) for c in caches):
        return join_dms_caches(caches)
    return join_dense_caches(caches)


def join_dms_caches(caches, *, pool=None):
    """DMSCaches of single prefills joined into one batch (``DMSCache.stacked``: segments copied back to
    back); the one place a batch's DMS cache is assembled. ``pool``: into that KV pool, ``caches`` an
    iterable prefilling each when asked (each copied in and emptied before the next)."""
    from dms_perf.model.cache import DMSCache

    return DMSCache.stacked(caches, pool=pool, consume=pool is not None)


def join_dense_caches(caches: list):
    """A DynamicCache whose layer i holds every cache's layer-i keys and values concatenated along the batch
    dimension, in order.

    For transformers' DynamicCache, plain or shortened by a kvpress press (every head of a layer keeps
    as many tokens). Raises ValueError when the caches are of another kind (sliding-window layers, a
    subclass with state of its own) or differ in layers, heads, tokens, head size, dtype or device.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    kinds = {type(c).__name__ for c in caches if type(c) is not DynamicCache}
    kinds |= {type(layer).__name__ for c in caches if type(c) is DynamicCache for layer in c.layers
              if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(f"only transformers DynamicCaches of DynamicLayers join along the batch; got {sorted(kinds)}")
    if len({len(c.layers) for c in caches}) != 1:
        raise ValueError(f"the caches differ in their number of layers: {[len(c.layers) for c in caches]}")
    out = DynamicCache()
    for index in range(len(caches[0].layers)):
        parts = {"keys": [c.layers[index].keys for c in caches], "values": [c.layers[index].values for c in caches]}
        for name, tensors in parts.items():
            if any(t is None or t.dim() != 4 for t in tensors):
                raise ValueError(f"layer {index}: every cache must hold [B, H, L, D] {name}")
            if len({(t.shape[1:], t.dtype, t.device) for t in tensors}) != 1:
                raise ValueError(
                    f"layer {index}: the caches' {name} differ in heads, tokens, head size, dtype or device "
                    f"({[(tuple(t.shape), str(t.dtype).removeprefix('torch.'), str(t.device)) for t in tensors]}); "
                    "only caches holding as many tokens join into one batch")
        layer = DynamicLayer()
        keys, values = torch.cat(parts["keys"]), torch.cat(parts["values"])
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # set, not update(): update() would copy them once more
        out.layers.append(layer)
    return out


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C during a cell's timed runs after at least one had finished: ``row`` holds the finished runs'
    figures, ``"partial": True`` and the status ``interrupted after i of n repeats``."""

    def __init__(self, row: dict[str, Any]):
        super().__init__(row["status"])
        self.row = row


class HiddenKeys(ValueError):
    """A press hid keys of one sequence's prefill (kvpress ``masked_key_indices``) instead of removing them:
    that list names batch 0 and is replaced by the next sequence's prefill, so a joined batch cache would
    attend to keys it should not."""


def _refuse_hidden_keys(model) -> None:
    layers = getattr(getattr(model, "model", None), "layers", [])
    if any(getattr(layer.self_attn, "masked_key_indices", None) is not None for layer in layers):
        raise HiddenKeys("the press hides keys (kvpress masked_key_indices) instead of removing them: per-sequence "
                         "caches cannot be joined")


def press_during_run(model, press, *, press_on_engine: bool = False):
    """The context a generation runs in: a kvpress press applied to the vanilla model stays on for the whole
    run (its hooks compress at the prefill); a press prefilling for the engine, or no press, adds nothing."""
    if press is None or press_on_engine:
        return contextlib.nullcontext()
    return press(model)


def prefill_prompt(model, input_ids, *, press=None, press_on_engine: bool = False, capacity_step=None,
                   pooled: bool = False):
    """One prompt ``input_ids`` [1, L] prefilled as its method prefills it: (the model's output, with the last
    position's logits only, and the cache to decode on). A Qwen3-DMS model makes its own cache (on its pool
    when ``pooled``; ``capacity_step`` spare decode rows per head), a press for the engine prefills in
    passthrough (``prefill_for_the_engine``), any other model gets transformers' cache. Run it inside
    ``press_during_run``."""
    if press_on_engine:
        return prefill_for_the_engine(model, input_ids, press, capacity_step=capacity_step)
    dms = hasattr(model, "make_dms_cache")
    cache = model.make_dms_cache(pooled=pooled, capacity_step=capacity_step) if dms else None
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out, out.past_key_values


def prefill_for_the_engine(model, input_ids, press, *, capacity_step=None):
    """The press's prefill in transformers' attention, its cache converted for the DMS engine."""
    from transformers.cache_utils import DynamicCache

    from dms_perf.model.cache import DMSCache

    with model.passthrough(), press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    step = model.dms_capacity_step if capacity_step is None else capacity_step
    cache = DMSCache.from_dense(out.past_key_values, model.config.dms_window_size, step)
    return out, cache


def kv_cache_stats(model, cache, *, seen_tokens: int) -> tuple[int, int, int]:
    """(bytes held, slots attended to, slots of a dense cache) for a DMSCache or a transformers cache.

    Slots count (layer, batch, KV head, token): a batch cache's figures are those of all its sequences
    together. A DMSCache holds per-head lengths (one read back for all layers: synchronizes); kvpress presses
    that shrink the cache shorten the tensors; DMSPress instead hides keys, listed per layer in
    ``self_attn.masked_key_indices``.
    """
    return _kv_stats(model, cache, seen_tokens=seen_tokens)


def _kv_stats(model, cache, *, seen_tokens: int) -> tuple[int, int, int]:
    from dms_perf.model.cache import DMSCache, kv_cache_bytes

    kept = dense = 0
    if isinstance(cache, DMSCache):  # flat [slots, D] buffers: heads come from the per-head lengths
        lengths = [cache.head_lengths(index) for index in range(len(cache.layers))]
        dense = sum(t.numel() for t in lengths) * seen_tokens
        kept = int(torch.stack([t.sum() for t in lengths]).sum()) if lengths else 0
        return kv_cache_bytes(cache), kept, dense
    for index, layer in enumerate(cache.layers):
        batch, heads = layer.keys.shape[:2]
        dense += batch * heads * seen_tokens
        masked = getattr(model.model.layers[index].self_attn, "masked_key_indices", None)
        kept += batch * heads * layer.keys.shape[2] - (len(masked[0]) if masked is not None else 0)
    return kv_cache_bytes(cache), kept, dense


def trace_sample(model, cache, *, seen_tokens: int) -> tuple[int, int]:
    """(KV bytes held, KV bytes kept) of ``cache`` now, for a generation's trace (``kv_cache_stats``).

    What a sample costs: for a dense cache nothing but host arithmetic on tensor shapes; for a DMSCache one
    read back of its per-head lengths (and, on a KV pool, one per layer of its segments' rows). Hence taken
    at trace points only, after the device is synchronized, and kept off the decode clock.
    """
    held, kept, _ = _kv_stats(model, cache, seen_tokens=seen_tokens)
    return held, kept * kv_slot_bytes(cache)


def kv_slot_bytes(cache) -> int:
    """Bytes of one slot (one token's key and value in one KV head) of ``cache``: the unit of kept bytes,
    ``DMSCache.kept_kv_bytes`` for a DMSCache."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() >= 2:
            return 2 * keys.shape[-1] * keys.element_size()
    return 0


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
    """Median figures over timed runs (one row of the results table), for a batch of B sequences:
    ``prefill_tok_s`` = B * context / prefill seconds; ``decode_tok_s`` = B * steps / decode seconds (all
    sequences), ``decode_tok_s_per_seq`` = steps / decode seconds, ``ms_per_step`` = decode ms / steps, with
    steps = ``new_tokens - 1`` (None without a decode step). ``generated_tokens`` counts one sequence's.
    ``kv_bytes``: what the cache holds at the end, rows reserved for decoding included (a DMS cache
    reserves ``max(dms_capacity_step, new_tokens)`` per head, so it may hold more than a dense one);
    ``kept_kv_bytes``: the keys and values of the slots still attended to, which ``compression`` counts;
    ``peak_kv_bytes``: the most the cache held during the generation (``generate_batch``'s trace points).
    ``decode_tok_s_first_quarter`` / ``_last_quarter``: B * quarter steps / their seconds (all sequences),
    medians over the runs; ``trace``: the trace of the run with the median decode time (the lower one of an
    even count). Figures a run does not record (a run made without them) are None."""
    prefill = _median([r.prefill_s for r in runs])
    decode = _median([r.decode_s for r in runs])
    total = _median([r.prefill_s + r.decode_s for r in runs])
    last = runs[-1]
    steps = last.new_tokens - 1
    decoded = bool(steps and decode > 0)
    return {
        "status": "ok",
        "batch": last.batch,
        "prefill_s": prefill,
        "prefill_tok_s": last.batch * context_length / prefill,
        "decode_tok_s": last.batch * steps / decode if decoded else NOT_MEASURED,
        "decode_tok_s_per_seq": steps / decode if decoded else NOT_MEASURED,
        "ms_per_step": 1e3 * decode / steps if decoded else NOT_MEASURED,
        "total_s": total,
        "generated_tokens": last.new_tokens,
        "peak_vram_bytes": _median([r.peak_vram_bytes for r in runs]),
        "kv_bytes": last.kv_bytes,
        "kept_kv_bytes": last.kept_kv_bytes,
        "peak_kv_bytes": last.peak_kv_bytes,
        "decode_tok_s_first_quarter": _quarter_rate(runs, "first_quarter_s"),
        "decode_tok_s_last_quarter": _quarter_rate(runs, "last_quarter_s"),
        "compression": last.dense_slots / last.kept_slots if last.kept_slots else NOT_MEASURED,
        "retrieval": retrieval,
        "repeats": len(runs),
        "runs_total_s": [r.prefill_s + r.decode_s for r in runs],
        "trace": sorted(runs, key=lambda r: r.decode_s)[(len(runs) - 1) // 2].trace,
    }


def _quarter_rate(runs: list[GenerationRun], name: str) -> float | None:
    """Median over ``runs`` of B * quarter steps / the quarter's decode seconds (``name``)."""
    rates = [r.batch * r.quarter_steps / getattr(r, name) for r in runs
             if r.quarter_steps and getattr(r, name) is not None and getattr(r, name) > 0]
    return statistics.median(rates) if rates else NOT_MEASURED


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
    on_run: Callable[[str], None] | None = None,
    on_tokens: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """End-to-end figures for one (context, method, batch) cell; never raises for a failing cell.

    ``workload``: a ``dms_perf.bench.workloads.Workload`` (one prompt, batch 1) or ``NeedleBatch`` (B prompts
    of one length, generated together by ``generate_batch``); ``method``: a
    ``dms_perf.bench.methods.Method`` (its press, if any, is built once on the first prompt, outside the
    timing). ``warmup`` untimed generations precede ``repeats`` timed ones; figures are medians
    (``summarize_runs``). ``real_weights``: score retrieval, each sequence on its own answer (else
    "n/a (random weights)"); ``device``: where the prompts go (default: the model's). Returns a dict with
    ``status`` "ok", "OOM", "error: ..." or "skipped: ..." (then without figures; a batch whose press hides
    keys is skipped); memory is released either way.

    Families with ``fused`` run on the decode engine, a paged KV pool: the first untimed run generates on a
    pool of the largest budget the cell may need (``sizing_budget``) and measures the most pages it held;
    the other runs generate on a pool of those pages (+1 %, ``engine_pool``), the cell's KV memory, sized
    as a server with this workload would size it. With ``warmup`` 0 (a long generation run once) the timed
    runs use the sizing pool: ``kv_pool_bytes`` is then that budget, and ``peak_kv_bytes`` the pages used.
    The row adds ``kv_pool_bytes`` and ``decode_tok_s_first``, the first timed generation's rate (it
    captures the decode graph that the later ones replay).

    ``on_run``: called with "warm-up i/n" or "repeat i/n" before each generation (a progress line);
    ``on_tokens``: called with (tokens generated, new_tokens) at every trace point of each generation.
    KeyboardInterrupt during the timed runs, once one has finished, raises ``CellInterrupted`` holding the
    row of the finished ones; before that, KeyboardInterrupt itself.
    """
    from dms_perf.bench.workloads import NeedleBatch

    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0 and new_tokens >= 1, got repeats={repeats}, "
            f"warmup={warmup}, new_tokens={new_tokens}"
        )
    batch = workload if isinstance(workload, NeedleBatch) else NeedleBatch((workload,))
    row: dict[str, Any] = {"context": batch.context_length, "method": method.name, "batch": batch.batch,
                           "new_tokens": new_tokens}
    if batch.context_length < method.min_context:
        row["status"] = f"skipped: {method.name} needs a prompt of at least {method.min_context} tokens"
        return row
    try:
        where = device if device is not None else next(model.parameters()).device
        prompts = [ids.to(where) for ids in batch.prompts]
        method.prepare(model)
        press = method.press_for(model, prompts[0])
        on_engine = method.family.press_on_engine

        def generate(what: str):
            if on_run is not None:
                on_run(what)
            run = generate_batch(model, prompts, new_tokens=new_tokens, press=press, press_on_engine=on_engine,
                                 on_tokens=on_tokens)
            release_memory()
            return run

        labels = [f"warm-up {i + 1}/{warmup}" for i in range(warmup)]
        if method.family.fused:  # the decode engine: a KV pool sized by an untimed run of this cell
            model.use_kv_pool(None)
            pool = engine_pool(model, max_seqs=batch.batch,
                               budget_bytes=sizing_budget(model, batch.batch, batch.context_length + new_tokens))
            if labels:
                pages = generate(labels.pop(0)).peak_pages
                model.use_kv_pool(None)
                release_memory()
                pool = engine_pool(model, max_seqs=batch.batch, pages=pages + pages // 100 + 1)
        for label in labels:
            generate(label)
        runs = []
        try:
            for i in range(repeats):
                runs.append(generate(f"repeat {i + 1}/{repeats}"))
        except KeyboardInterrupt:
            if not runs:
                raise
            interrupted = True
        else:
            interrupted = False
        retrieval = batch.retrieval(runs[-1].generated_ids, real_weights=real_weights)
        row.update(summarize_runs(runs, context_length=batch.context_length, retrieval=retrieval))
        if interrupted:
            row.update(status=f"interrupted after {len(runs)} of {repeats} repeats", partial=True)
        if method.family.fused:
            row["kv_pool_bytes"] = pool.nbytes
            steps = new_tokens - 1
            # The first generation on a fresh pool captures the decode graph; later ones replay it.
            first = runs[0].decode_s
            row["decode_tok_s_first"] = batch.batch * steps / first if steps and first > 0 else NOT_MEASURED
    except HiddenKeys as exc:
        row["status"] = f"skipped: batch {batch.batch}: {exc}"
    except Exception as exc:  # one failing cell must not stop the matrix
        row["status"] = failure_status(exc)
    finally:
        if method.family.fused and hasattr(model, "use_kv_pool"):
            model.use_kv_pool(None)
    release_memory()
    if row.get("partial"):
        raise CellInterrupted(row)
    return row


def engine_pool(model, *, max_seqs: int, budget_bytes: int | None = None, pages: int | None = None,
                page_rows: int | None = None):
    """Give ``model`` a paged KV pool for ``max_seqs`` sequences that fits ``budget_bytes`` (or holds
    ``pages`` pages) of ``page_rows`` rows (default ``DEFAULT_PAGE_ROWS``); returns it. The one place the bench,
    capacity and the benchmarks size the engine's pool (``PagedKVPool.for_budget``)."""
    from dms_perf.model.paged import DEFAULT_PAGE_ROWS, PagedKVPool

    if (budget_bytes is None) == (pages is None):
        raise ValueError("give exactly one of budget_bytes and pages")
    page_rows = DEFAULT_PAGE_ROWS if page_rows is None else page_rows
    if budget_bytes is None:
        budget_bytes = PagedKVPool.budget_for_pages(model, pages, max_seqs=max_seqs, page_rows=page_rows)
    model.use_kv_pool(PagedKVPool.for_budget(model, budget_bytes, max_seqs=max_seqs, page_rows=page_rows))
    return model.dms_pool


# Device memory a sizing pool leaves free for the activations of a prefill and of the decode steps.
SIZING_HEADROOM = 0.1


def sizing_budget(model, batch: int, tokens: int) -> int:
    """The most a generation of ``batch`` sequences of ``tokens`` tokens (prompt + new) may hold on a
    paged pool: every token of every head kept, plus the pages reserved ahead; on a GPU at most the free
    memory less ``SIZING_HEADROOM`` of it."""
    from dms_perf.model.paged import DEFAULT_PAGE_ROWS, PagedKVPool

    config = model.config
    per_head = -(-(tokens + 2 * model.dms_capacity_step) // DEFAULT_PAGE_ROWS)
    pages = batch * config.num_hidden_layers * config.num_key_value_heads * per_head
    return min(PagedKVPool.budget_for_pages(model, pages, max_seqs=batch), device_room())


def device_room() -> int | float:
    """The most a pool may take of the card: its free memory less ``SIZING_HEADROOM`` of it (infinite
    without a GPU, where the budgets are the callers')."""
    return int(torch.cuda.mem_get_info()[0] * (1 - SIZING_HEADROOM)) if HAS_CUDA else math.inf
