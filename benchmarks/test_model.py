"""Qwen3-DMS prefill and decode vs vanilla Qwen3: seconds per prefill, decode tok/s, KV bytes.

GPU: random Qwen3-8B shape in bf16; the DMS model's eviction is calibrated to 8x on a random prompt
(docs/DMS.md, "Random weights"; the achieved marked fraction is in every case's extra_info). CPU
smoke (``--benchmark-disable``): the tiny config, each path run once.

* prefill: ``model(prompt, fresh cache, logits_to_keep=1)``, cache construction (DMS compaction) included;
* decode: ``DECODE_STEPS`` greedy steps per timed call on the cache of that prompt, each fed the previous
  step's argmax at the next position, launched back to back as ``generate_once`` does (single steps
  timed one by one disagreed with whole generations for vanilla: benchmarks/NOTES.md);
  ``decode_step_s = median / DECODE_STEPS``, ``decode_tok_s`` its inverse.

The DMS model is shared by the "dms-hub", "dms-triton", "dms-triton-eager" and "dense-triton" (no
eviction) cases (``set_dms_backend``, ``Method.prepare``): same weights, same calibration. "dms-triton"
and "dense-triton" replay their steps from CUDA graphs (dms_perf.model.graph; the first step on a cache
and each re-size step run eagerly, and a capture follows them), "dms-triton-eager" runs them eagerly
like vanilla. ``peak_vram_bytes`` = this model's weights + the peak allocated above what was
allocated before the case's prefill (both models stay resident during the run, so the absolute
device peak would count the other model too).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.floors import bandwidth_floor, decode_step_read_bytes, weight_bytes
from dms_perf.bench.methods import resolve_method
from dms_perf.bench.timing import bench
from dms_perf.model.cache import kv_cache_bytes
from dms_perf.model.calibrate import calibrate_dms
from dms_perf.model.fused import apply_engine_fusions
from dms_perf.model.qwen3_dms import build_model, qwen3_8b_config, tiny_config

METHODS = ("vanilla", "dms-hub", "dms-triton", "dms-triton-eager", "dense-triton")  # dms_perf.bench.methods names
PREFILL_METHODS = ("vanilla", "dms-hub", "dms-triton", "dense-triton")  # -eager: same prefill as dms-triton
TARGET_CR = 8
DECODE_STEPS = 8 if HAS_CUDA else 1
CALIBRATION_TOKENS = 4096 if HAS_CUDA else 256


@functools.cache
def _models():
    """(vanilla model, DMS model, DMS model with Liger's fused kernels, calibration), built once per
    session on the benchmark device, with the same weights."""
    config = qwen3_8b_config() if HAS_CUDA else tiny_config()
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    device = "cuda" if HAS_CUDA else "cpu"
    vanilla = build_model(config, backend=None, dtype=dtype, device=device)
    dms = build_model(config, backend="triton", dtype=dtype, device=device)
    calibration = calibrate_dms(dms, target_cr=TARGET_CR, num_tokens=CALIBRATION_TOKENS)
    fused = build_model(config, backend="triton", dtype=dtype, device=device)
    fused.config.dms_initial_alpha_offset = calibration.alpha_offset
    apply_engine_fusions(fused)
    return vanilla, dms, fused, calibration


def _model_for(name):
    """The model of method ``name`` (the registry's ``fused`` flag picks the one with the engine's fusions)."""
    vanilla, dms, fused, calibration = _models()
    method = resolve_method(name)
    if method.backend is None:
        return vanilla, None
    model = fused if method.family.fused else dms
    model.set_dms_backend(method.backend)
    method.prepare(model)
    return model, calibration if method.evicts else None


def _prefill(model, ids):
    cache = model.make_dms_cache() if hasattr(model, "make_dms_cache") else None
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out


def _describe(benchmark, model, method, tokens, calibration, cache):
    """extra_info shared by prefill and decode; ``tokens``: tokens the cache has seen."""
    config = model.config
    dense = config.num_hidden_layers * 2 * config.num_key_value_heads * tokens * config.head_dim
    dense *= next(model.parameters()).element_size()
    info = benchmark.extra_info
    info.update(method=method, model="qwen3-8b" if HAS_CUDA else "tiny")
    info["fused_kernels"] = getattr(model, "dms_fused_kernels", False)
    info["fused_projections"] = getattr(model, "dms_fused_projections", False)
    info["kv_pool"] = getattr(cache, "pool", None) is not None
    info["kv_cache_bytes"] = kv_cache_bytes(cache)
    info["kv_bytes_vs_dense"] = info["kv_cache_bytes"] / dense
    if calibration is not None:
        info.update(
            weights="random, DMS eviction calibrated", target_cr=TARGET_CR,
            calibrated_marked_fraction=calibration.marked_fraction,
            calibrated_compression_ratio=calibration.compression_ratio,
            dms_initial_alpha_offset=calibration.alpha_offset,
        )
    else:
        info["weights"] = "random"


def _track_peak(benchmark, model, fn, base: int | None = None):
    """Run ``fn`` once more with the peak-memory counter reset and record ``peak_vram_bytes``.

    ``base``: memory allocated before this case's state existed (default: now), so that a decode
    step's peak counts the KV cache its prefill left behind.
    """
    if not HAS_CUDA:
        return fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if base is None else base
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_vram_bytes"] = weight_bytes(model) + torch.cuda.max_memory_allocated() - base
    return result


def _greedy_steps(model, cache, token, context_length):
    """A call running ``DECODE_STEPS`` greedy steps on ``cache`` from ``token`` ``[B, 1]``, each fed the
    previous step's argmax at the next position, launched back to back as ``generate_once`` does."""
    position = torch.full((token.shape[0], 1), context_length, device=token.device)

    def steps():
        nonlocal token
        for _ in range(DECODE_STEPS):
            result = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
            token = result.logits[:, -1:].argmax(-1)
            position.add_(1)
        return result

    return steps


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_prefill(benchmark, method, context_length):
    model, calibration = _model_for(method)
    ids = torch.randint(0, model.config.vocab_size, (1, context_length), device=model.device)
    with torch.inference_mode():
        median = bench(benchmark, lambda: _prefill(model, ids), rounds=3)
        out = _track_peak(benchmark, model, lambda: _prefill(model, ids))
    _describe(benchmark, model, method, context_length, calibration, out.past_key_values)
    benchmark.extra_info["context_length"] = context_length
    if median is not None:
        benchmark.extra_info["prefill_s"] = median
        benchmark.extra_info["prefill_tok_s"] = context_length / median


# A decode step is Python in transformers' layer loop and small launches: tens of ms of host time.
@pytest.mark.host_bound
@pytest.mark.parametrize("method", METHODS)
def test_decode_steps(benchmark, method, context_length):
    model, calibration = _model_for(method)
    ids = torch.randint(0, model.config.vocab_size, (1, context_length), device=model.device)
    base = torch.cuda.memory_allocated() if HAS_CUDA else None
    with torch.inference_mode():
        out = _prefill(model, ids)
        cache = out.past_key_values
        steps = _greedy_steps(model, cache, out.logits[:, -1:].argmax(-1), context_length)
        median = bench(benchmark, steps, rounds=10)
        _track_peak(benchmark, model, steps, base)
    _describe(benchmark, model, method, cache.get_seq_length(), calibration, cache)
    benchmark.extra_info.update(context_length=context_length, cache_tokens_seen=cache.get_seq_length())
    benchmark.extra_info["decode_steps_per_call"] = DECODE_STEPS
    if median is not None:
        benchmark.extra_info["decode_step_s"] = median / DECODE_STEPS
        benchmark.extra_info["decode_tok_s"] = DECODE_STEPS / median


# --- batched decode: the serving regime, where the KV cache is a large part of a step's reads ---------

DECODE_BATCHES = (1, 8, 32) if HAS_CUDA else (1, 2)
BATCH_CONTEXTS = (8192, 32768)  # on the GPU; every CPU smoke context
BATCH_METHODS = ("dms-triton", "dense-triton")


def _pool_for(model, template, batch: int, steps: int):
    """The engine's paged KV pool for a case: the pages ``batch`` copies of the prefilled ``template`` may
    hold within ``steps`` decode steps (``batch_search.batch_pages``), so the pool is the case's KV memory."""
    from dms_perf.bench.batch_search import batch_pages
    from dms_perf.bench.generation import engine_pool

    return engine_pool(model, max_seqs=batch, pages=batch_pages(model, template, batch, steps))


@pytest.mark.parametrize("batch", DECODE_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("method", BATCH_METHODS)
def test_decode_batch(benchmark, method, batch, context_length):
    """``DECODE_STEPS`` greedy steps of a batch of ``batch`` sequences of ``context_length`` tokens on the
    decode engine (a KV pool sized for the batch, its CUDA graph captured once and replayed). One prompt
    is prefilled and its cache copied into every slot (``DMSCache.stacked``): each sequence holds the same
    cache, so every step reads the same bytes as B distinct prompts of that length would. Floor: the
    weights a step reads plus the kept K/V, read once per step (``dms_perf.bench.floors.decode_step_read_bytes``:
    all weights but the embedding table's unused rows), at the measured copy bandwidth."""
    if HAS_CUDA and context_length not in BATCH_CONTEXTS:
        pytest.skip(f"batched decode runs at {BATCH_CONTEXTS} tokens")
    from dms_perf.model.cache import DMSCache

    model, calibration = _model_for(method)
    ids = torch.randint(0, model.config.vocab_size, (1, context_length), device=model.device)
    rounds = 10
    try:
        with torch.inference_mode():
            # Pages for every step the case takes (warm-ups, the cross-check, the rounds).
            steps_taken = DECODE_STEPS * (rounds + 60) if HAS_CUDA else DECODE_STEPS * 4
            out = model(input_ids=ids, past_key_values=model.make_dms_cache(pooled=False),
                        use_cache=True, logits_to_keep=1)
            _pool_for(model, out.past_key_values, batch, steps_taken)
            cache = DMSCache.stacked([out.past_key_values] * batch, pool=model.dms_pool)
            steps = _greedy_steps(model, cache, out.logits[:, -1:].argmax(-1).repeat(batch, 1), context_length)
            del out
            median = bench(benchmark, steps, rounds=rounds)
    except torch.OutOfMemoryError as exc:
        model.use_kv_pool(None)
        pytest.skip(f"OOM at batch {batch} x {context_length} tokens ({method}): {str(exc).splitlines()[0][:120]}")
    _describe(benchmark, model, method, cache.get_seq_length(), calibration, cache)
    read_bytes = decode_step_read_bytes(model, batch, cache)
    benchmark.extra_info.update(
        context_length=context_length, batch=batch, decode_steps_per_call=DECODE_STEPS,
        batch_fill="one prefill copied into every slot", step_read_bytes=read_bytes,
        graph_captures=model._pool_graphs.captures if model._pool_graphs else 0,
    )
    model.use_kv_pool(None)
    if median is not None:
        step_s = median / DECODE_STEPS
        floor = bandwidth_floor(read_bytes, step_s)
        benchmark.extra_info.update(
            decode_step_ms=step_s * 1e3, decode_tok_s=batch / step_s, decode_tok_s_per_sequence=1 / step_s,
            floor_ms=floor["floor_ms"], floor_fraction=floor["floor_fraction"],
        )


GENERATION_TOKENS = 128 if HAS_CUDA else 6
REUSE_CONTEXT = 32768  # on the GPU; every CPU smoke context


@pytest.mark.parametrize("method", BATCH_METHODS)
def test_generation_on_the_engine(benchmark, method, context_length):
    """Whole greedy generations of ``GENERATION_TOKENS`` tokens (prefill, then the decode steps) on one KV
    pool, each a new cache: the first captures the decode graph, every later one replays it from its
    first step. Records each generation's decode tok/s and the steady rate inside it (steps 32 to the
    end, graph replays on a warm cache), so that a generation's rate is compared with the steady one."""
    if HAS_CUDA and context_length != REUSE_CONTEXT:
        pytest.skip(f"generations on the engine run at {REUSE_CONTEXT} tokens")
    model, calibration = _model_for(method)
    steps = GENERATION_TOKENS - 1
    ids = torch.randint(0, model.config.vocab_size, (1, context_length), device=model.device)
    records = []

    def generation():
        cache = model.make_dms_cache(capacity_step=GENERATION_TOKENS)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        position = torch.full((1, 1), context_length, device=token.device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if HAS_CUDA else []
        for i in range(steps):
            if marks and i in (0, 32):
                marks[0 if i == 0 else 1].record()
            token = model(input_ids=token, past_key_values=cache, position_ids=position,
                          use_cache=True).logits[:, -1:].argmax(-1)
            position.add_(1)
        if marks:
            marks[2].record()
            torch.cuda.synchronize()
            decode_s = marks[0].elapsed_time(marks[2]) / 1e3
            records.append((decode_s, marks[1].elapsed_time(marks[2]) / 1e3 / (steps - 32)))
        return cache

    with torch.inference_mode():
        owned = model.make_dms_cache(pooled=False)
        sizing = model(input_ids=ids, past_key_values=owned, use_cache=True, logits_to_keep=1).past_key_values
        _pool_for(model, sizing, 1, GENERATION_TOKENS)
        del sizing
        bench(benchmark, generation, rounds=3)
        cache = generation()
    _describe(benchmark, model, method, cache.get_seq_length(), calibration, cache)
    benchmark.extra_info.update(context_length=context_length, batch=1, generated_tokens=GENERATION_TOKENS,
                                graph_captures=model._pool_graphs.captures if model._pool_graphs else 0)
    model.use_kv_pool(None)
    if records:
        decode_tok_s = [steps / decode_s for decode_s, _ in records]
        steady_tok_s = [1 / step_s for _, step_s in records]
        benchmark.extra_info.update(
            first_generation_decode_tok_s=decode_tok_s[0],
            later_generations_decode_tok_s=decode_tok_s[1:],
            steady_decode_tok_s=steady_tok_s[1:],
            later_vs_steady=[a / b for a, b in zip(decode_tok_s[1:], steady_tok_s[1:], strict=True)],
        )
