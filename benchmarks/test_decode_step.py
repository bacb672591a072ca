"""The decode step's kernels one at a time, at the Qwen3-8B shape, each against its floor.

GPU: bf16, ``qwen3_8b_config()`` (32 query / 8 KV heads, head dim 128, hidden 4096, intermediate 12288).

* ``test_decode_attention``: ``dms_decode_attention`` over a compacted cache holding ``context_length``
  rows in every head (8K and 32K of ``--context-lengths``), batch 1 / 8 / 32 (``spread`` ``even``).
* ``test_decode_attention_uneven``: the same number of rows in all, so the same floor, spread unevenly as
  DMS evicts: ``heads`` (in each sequence one KV head holds ``LONG_HEAD_RATIO`` times the mean, the others
  share the rest, none under a window) or ``batch`` (half the sequences long, half short; batch >= 2).
  Lengths come from a seeded generator, so every run measures one layout; the group is the even case's.
  Both record ``spread``, ``longest_head`` and ``max_over_mean`` (longest head over the mean length), and
  ``layout`` ``contiguous`` and ``schedule`` (the kernel's default scheduler, ``SCHEDULE``).
* ``test_decode_attention_many_heads``: 144 sequences of 2,048 rows a head (a 1K + 16K DMS generation's
  capacity regime), paged, spread ``even`` and ``trained``, under both schedulers, the balanced one with
  and without its plan launch (``MANY_HEADS_CASES``).
* ``test_decode_attention_stream``: the request stream's heads in its steady state (1K prompt, outputs
  2K-16K; dms-triton's 264 sequences and dense's 56, as the H100's pool held them), paged, both schedulers,
  the per-head one in slot order and longest first, the balanced one with its merge narrow and wide
  (``STREAM_CASES``).
* ``test_decode_attention_layouts``: the same three spreads at the same rows, with the other layout and
  scheduler pairs: ``contiguous`` with the ``balanced`` scheduler, and ``paged`` (pages of
  ``PAGE_ROWS`` rows handed out in shuffled order, one block table per head) with ``per_head`` and
  ``balanced``. Same group as the contiguous cases, so each layout and scheduler compares with them.
* ``test_fused_decode_step``: ``fused_decode_step`` (norms, decision, RoPE, cache update), batch 1 / 8 / 32.
  Every decision marks its token, so each step reuses the slot its window frees and the cache keeps its
  length whatever the number of calls; a step's work does not depend on the cache length.
* ``test_projection``: each projection as ``decode_linear`` issues it, at 1 / 8 / 32 rows, ``impl``
  ``skinny`` (``skinny_linear``) or ``cublas`` (``torch_linear``, ``decode_linear``'s other path:
  ``F.linear``; ``addmm_`` into the residual for down; ``F.linear`` then ``silu_mul`` for gate/up); plus
  the LM head, which the model runs on cuBLAS. Skinny cases also record ``cublas_ms`` and
  ``speedup_vs_cublas``, the cuBLAS call on the same shape timed by the case itself.
* ``test_projection_batch``: each projection on cuBLAS at a decode batch's rows (``BATCH_ROWS``: the stream's
  56-288 sequences), against the larger of its bytes' and its FLOPs' floors (``roofline_floor``).
* ``test_silu_mul``: ``silu_mul`` (``triton``) and ``silu(gate) * up`` in torch (``torch``), 1 / 8 / 32 rows.

Timing: ``bench`` replaying CUDA graphs of ``CALLS_PER_GRAPH`` back-to-back calls, timed per call (the
engine replays its steps from graphs, and these kernels take a few microseconds: an eager launch or a
replay's fixed cost would be most of the figure); input sets rotated past L2 (``rotating``).
``extra_info``: ``bytes`` (what the call must read and write, each once), ``floor_ms`` (``bytes`` at
``copy_bandwidth_bytes_per_s()``), ``floor_fraction`` (floor over the measured time) and ``gbps``.
Compare within a shape: ``--benchmark-group-by=group``.

CPU smoke mode (``--benchmark-disable``): ``tiny_config()`` shapes, one call each; fp32 for attention and
the fused step, fp16 for the projections and ``silu_mul`` (``skinny_linear`` serves 16-bit dtypes, and the
interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.floors import bandwidth_floor, roofline_floor
from dms_perf.bench.timing import bench, median_call_ms, rotating
from dms_perf.model.cache import DMSCache
from dms_perf.model.qwen3_dms import qwen3_8b_config, tiny_config
from dms_perf.ops.activation import silu_mul
from dms_perf.ops.cache_update import fused_decode_step
from dms_perf.ops.decode import dms_decode_attention
from dms_perf.ops.decode import kernel as decode_kernel
from dms_perf.ops.linear import skinny_linear, torch_linear

CONFIG = qwen3_8b_config() if HAS_CUDA else tiny_config()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
LINEAR_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
HQ, HKV, D = CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.head_dim
HIDDEN, INTERMEDIATE, VOCAB = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.vocab_size
WINDOW = CONFIG.dms_window_size
CALLS_PER_GRAPH = 8
BATCHES = (1, 8, 32) if HAS_CUDA else (1, 2)
ROWS = (1, 8, 32)
ATTENTION_CONTEXTS = (8192, 32768)  # on the GPU; every CPU smoke context
# Many short heads, as a 1K + 16K DMS generation holds them at its capacity in an H100's whole memory
# (142 sequences whose heads end with ~2.6K rows, ~1.7K on average over the generation): (batch, rows a head).
MANY_HEADS = (144, 2048) if HAS_CUDA else (4, 64)
# Uneven layouts: the long head's length over the mean (capped so every other head keeps a window), a
# short sequence's share of the mean (never under a window), and the seed of their draws.
LONG_HEAD_RATIO = 4.5
SHORT_SEQUENCE_SHARE = 0.25
SPREAD_SEED = 0
# The "trained" spread: the kept fractions per (layer, KV head) a retrofitted 8x model recorded
# (``python -m benchmarks.eviction_pattern``), cycled over the heads, at the even case's total rows.
TRAINED_PATTERN = Path(__file__).parent / "eviction_patterns" / "qwen3-synth-mid-dms-8x.json"
# Paged decode attention: rows per page (one 64-row key tile), the seed of the shuffled page order, and
# the (layout, scheduler) pairs measured beside the contiguous cases of the default scheduler.
PAGE_ROWS = 64
PAGE_ORDER_SEED = 1
LAYOUT_CASES = (("contiguous", "balanced"), ("paged", "per_head"), ("paged", "balanced"))
# Bytes of one head's cache bookkeeping in a step: step counter and length read and written, start read,
# the leaving ring slot read and written, three ring flags (the previous token's, the leaving one's twice).
RING_STEP_BYTES = 8 + 8 + 4 + 4 + 8 + 8 + 8 + 3

# name: (N, K, epilogue) of each projection as decode_linear issues it (o_proj's residual add is
# Liger's fused add + RMSNorm, not the GEMM's); the LM head for comparison.
PROJECTION_SHAPES = {
    "qkv": ((HQ + 2 * HKV) * D, HIDDEN, "plain"),
    "o": (HIDDEN, HQ * D, "plain"),
    "gate_up": (2 * INTERMEDIATE, HIDDEN, "silu_mul"),
    "down": (HIDDEN, INTERMEDIATE, "residual"),
    "lm_head": (VOCAB, HIDDEN, "plain"),
}


def _floor(benchmark, moved: int, call_s: float | None) -> None:
    """``bytes``, and from this case's own median: ``floor_ms``, ``floor_fraction``, ``gbps``."""
    benchmark.extra_info["bytes"] = moved
    if call_s is None:
        return
    benchmark.extra_info.update(bandwidth_floor(moved, call_s))


def _timed(benchmark, next_call: Callable[[], Callable[[], object]]) -> float | None:
    """``bench`` of the call of the next input set, replayed from graphs of ``CALLS_PER_GRAPH`` calls."""
    return bench(benchmark, lambda: next_call()(), cuda_graph=True, calls_per_graph=CALLS_PER_GRAPH)


# --- decode attention -------------------------------------------------------------------------------


def _kept_lengths(spread: str, batch: int, kept: int) -> torch.Tensor:
    """``[batch, Hkv]`` int32 rows per head, ``batch * Hkv * kept`` in all whatever the spread (CPU)."""
    total = batch * HKV * kept
    lengths = torch.full((batch, HKV), kept, dtype=torch.int64)
    generator = torch.Generator().manual_seed(SPREAD_SEED)
    if spread == "heads":
        for b in range(batch):
            long = min(round(LONG_HEAD_RATIO * kept), HKV * kept - (HKV - 1) * WINDOW)
            spare = HKV * kept - long - (HKV - 1) * WINDOW
            weights = torch.rand(HKV - 1, generator=generator)
            shares = (spare * weights / weights.sum()).floor().long()
            shares[0] += spare - shares.sum()
            others = WINDOW + shares
            lengths[b] = torch.cat([others, torch.tensor([long])])[torch.randperm(HKV, generator=generator)]
    elif spread == "batch":
        short = max(WINDOW, round(SHORT_SEQUENCE_SHARE * kept))
        lengths[: batch // 2] = short
        lengths[batch // 2 :] = (total - batch // 2 * HKV * short) // ((batch - batch // 2) * HKV)
        lengths = lengths[torch.randperm(batch, generator=generator)]
    elif spread == "trained":
        fractions = [f for layer in json.loads(TRAINED_PATTERN.read_text())["kept_fraction"] for f in layer]
        for b in range(batch):
            weights = torch.tensor([fractions[(b * HKV + h) % len(fractions)] for h in range(HKV)], dtype=torch.float64)
            row = (HKV * kept * weights / weights.sum()).floor().long().clamp(min=min(kept, WINDOW))
            row[row.argmax()] += HKV * kept - row.sum()
            lengths[b] = row
    elif spread != "even":
        raise ValueError(f"spread must be even, heads, batch or trained, got {spread!r}")
    assert int(lengths.sum()) == total, (spread, lengths.tolist(), total)
    assert int(lengths.min()) >= min(kept, WINDOW), (spread, lengths.tolist())
    return lengths.to(torch.int32)


def _page_table(lengths: torch.Tensor) -> torch.Tensor:
    """``[batch, Hkv, max_pages]`` int32: each head the ``ceil(length / PAGE_ROWS)`` pages its rows fill,
    taken from a seeded random permutation of all pages (a pool's free list after sequences came and
    went), ``NO_PAGE`` (-1) past them (CPU)."""
    pages = (lengths.long() + PAGE_ROWS - 1) // PAGE_ROWS
    held = torch.arange(int(pages.max())) < pages[..., None]
    table = torch.full(held.shape, -1, dtype=torch.int32)
    table[held] = torch.randperm(int(pages.sum()), generator=torch.Generator().manual_seed(PAGE_ORDER_SEED)).int()
    return table


def _attention_inputs(lengths: torch.Tensor, layout: str = "contiguous", schedule: str | None = None):
    """A cache of ``lengths[b, h]`` rows per head: ``contiguous``, segments back to back in one ``[S, D]``
    buffer; ``paged``, pages of ``PAGE_ROWS`` rows through ``_page_table``. ``max_length`` is the longest
    head, the host-known bound the model would pass; ``schedule`` None is the kernel's default."""
    batch = lengths.shape[0]
    q = torch.randn(batch, HQ, D, device=DEVICE, dtype=DTYPE)
    longest = int(lengths.max())
    if layout == "paged":
        table = _page_table(lengths)
        rows = int((table >= 0).sum()) * PAGE_ROWS
        addressing = dict(starts=None, block_table=table.to(DEVICE), page_rows=PAGE_ROWS)
    else:
        rows = int(lengths.sum())
        flat = lengths.flatten().long()
        addressing = dict(starts=(flat.cumsum(0) - flat).view(lengths.shape).to(DEVICE))
    k_cache = torch.randn(rows, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(rows, D, device=DEVICE, dtype=DTYPE)
    lengths = lengths.to(DEVICE)
    return lambda: dms_decode_attention(q, k_cache, v_cache, lengths=lengths, max_length=longest,
                                        schedule=schedule, **addressing)


def attention_bytes(lengths: torch.Tensor, layout: str = "contiguous") -> tuple[int, int, int]:
    """(K and V bytes of the kept rows, bytes the call must move, pages) of decode attention over ``lengths``
    (``_decode_attention_case``'s floor; ``pages`` as ``_page_table`` hands them out)."""
    batch = lengths.shape[0]
    e = DTYPE.itemsize
    kv_bytes = 2 * int(lengths.sum()) * D * e
    pages = int(((lengths.long() + PAGE_ROWS - 1) // PAGE_ROWS).sum())
    addressing = 12 * batch * HKV if layout == "contiguous" else 4 * batch * HKV + 4 * pages
    return kv_bytes, kv_bytes + 2 * batch * HQ * D * e + addressing, pages


def _decode_attention_case(benchmark, spread: str, batch: int, context_length: int, layout: str = "contiguous",
                           schedule: str | None = None, *, any_length: bool = False) -> None:
    """Floor: K and V of every kept row, the query read and the output written, and the addressing read:
    starts and lengths (contiguous) or lengths and one block-table entry per page (paged):
    ``2 B Hkv L D e + 2 B Hq D e + 12 B Hkv`` or ``... + 4 B Hkv + 4 pages`` bytes (``e`` bytes an element;
    ``B Hkv L`` rows in all, whatever the spread; rows past a head's length in its last page are not read)."""
    if HAS_CUDA and not any_length and context_length not in ATTENTION_CONTEXTS:
        pytest.skip(f"decode attention runs at {ATTENTION_CONTEXTS} kept rows per head")
    lengths = _kept_lengths(spread, batch, context_length)
    benchmark.group = f"decode-attention-ctx{context_length}-b{batch}"
    benchmark.extra_info["kept_per_head"] = context_length
    kv_bytes = _measure_attention(benchmark, lengths, spread, layout, schedule)
    assert kv_bytes == 2 * batch * HKV * context_length * D * DTYPE.itemsize


def _measure_attention(benchmark, lengths: torch.Tensor, spread: str, layout: str, schedule: str | None) -> int:
    """Time decode attention over ``lengths`` (``[batch, Hkv]``) in ``layout`` under ``schedule`` (None: the
    kernel's default), record the shape and the floor (``_decode_attention_case``'s) in ``extra_info``, and
    return the K and V bytes of the kept rows; an OOM skips the case."""
    kv_bytes, moved, pages = attention_bytes(lengths, layout)
    batch, mean = lengths.shape[0], float(lengths.float().mean())
    benchmark.extra_info.update(batch=batch, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=str(DTYPE),
                                spread=spread, longest_head=int(lengths.max()),
                                max_over_mean=float(lengths.max()) / mean, layout=layout,
                                schedule=schedule or decode_kernel.SCHEDULE)
    if layout == "paged":
        benchmark.extra_info.update(page_rows=PAGE_ROWS, pages=pages)
    try:
        call_s = _timed(benchmark, rotating(lambda: _attention_inputs(lengths, layout, schedule), kv_bytes))
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"OOM at batch {batch} x {mean:.0f} rows a head: {str(exc).splitlines()[0][:120]}")
    _floor(benchmark, moved, call_s)
    return kv_bytes


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_decode_attention(benchmark, batch, context_length):
    """Every head ``context_length`` rows (spread ``even``); floor as ``_decode_attention_case``."""
    _decode_attention_case(benchmark, "even", batch, context_length)


@pytest.mark.parametrize("spread", ["heads", "batch", "trained"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_decode_attention_uneven(benchmark, batch, context_length, spread):
    """The even case's rows and floor, spread unevenly over heads or sequences, or as a retrofitted model's
    heads keep them (``_kept_lengths``)."""
    if spread == "batch" and batch < 2:
        pytest.skip("a batch spread needs two sequences or more")
    if spread == "trained" and not TRAINED_PATTERN.exists():
        pytest.skip(f"no recorded eviction pattern: {TRAINED_PATTERN.name} (python -m benchmarks.eviction_pattern)")
    _decode_attention_case(benchmark, spread, batch, context_length)


@pytest.mark.parametrize("layout,schedule", LAYOUT_CASES, ids=[f"{lay}-{sch}" for lay, sch in LAYOUT_CASES])
@pytest.mark.parametrize("spread", ["even", "heads", "batch"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_decode_attention_layouts(benchmark, batch, context_length, spread, layout, schedule):
    """The rows and spreads of ``test_decode_attention`` / ``_uneven`` in another layout or under another
    scheduler; floor as ``_decode_attention_case`` (paged: the block table's entries instead of starts)."""
    if spread == "batch" and batch < 2:
        pytest.skip("a batch spread needs two sequences or more")
    _decode_attention_case(benchmark, spread, batch, context_length, layout, schedule)


# The many-heads cases: the per-head scheduler, and the balanced one with each program scanning the lengths
# to find its chunk or reading the plan launch's chunk starts (``decode_kernel.PLAN_HEADS``).
MANY_HEADS_CASES = [("per_head", None), ("balanced", "scan"), ("balanced", "plan")]


@pytest.mark.parametrize("schedule,finding", MANY_HEADS_CASES,
                         ids=[s if f is None else f"{s}-{f}" for s, f in MANY_HEADS_CASES])
@pytest.mark.parametrize("spread", ["even", "trained"])
def test_decode_attention_many_heads(benchmark, spread, schedule, finding, monkeypatch):
    """``MANY_HEADS``: many sequences of short heads on pages, under both schedulers. Without the plan launch
    the balanced scheduler's split programs each scan every head's length to find their chunk, work that
    grows with the square of the heads; floor as ``_decode_attention_case``."""
    if spread == "trained" and not TRAINED_PATTERN.exists():
        pytest.skip(f"no recorded eviction pattern: {TRAINED_PATTERN.name} (python -m benchmarks.eviction_pattern)")
    if finding is not None:
        monkeypatch.setattr(decode_kernel, "PLAN_HEADS", 0 if finding == "plan" else 2**31 - 1)
        benchmark.extra_info["finding"] = finding
    batch, rows = MANY_HEADS
    _decode_attention_case(benchmark, spread, batch, rows, "paged", schedule, any_length=True)


# The request stream's heads in its steady state (benchmarks/NOTES.md, "Session of 2026-12-07 (15)"): a
# 1K prompt and outputs uniform in 2K-16K, each running request at a position drawn as a steady stream holds
# it (``steady_progress``); dms-triton keeps ``WINDOW + (p - WINDOW) / 8`` rows a head at position p, dense
# p. Per method: (sequences running, as the H100's 50.6 GiB pool held them; compression).
STREAM_PROMPT, STREAM_OUTPUTS = (1024, (2048, 16384)) if HAS_CUDA else (48, (16, 96))
STREAM_BATCHES = {"dms": (264, 8), "dense": (56, 1)} if HAS_CUDA else {"dms": (4, 8), "dense": (2, 1)}
STREAM_SEED = 0


def stream_lengths(method: str) -> torch.Tensor:
    """``[batch, Hkv]`` int32 rows a head of ``method``'s running sequences in the stream's steady state
    (every head of a sequence at its position's rows; seeded, so every run measures one layout)."""
    from dms_perf.bench.stream import steady_progress

    batch, compression = STREAM_BATCHES[method]
    progress = steady_progress(batch, STREAM_OUTPUTS, torch.Generator().manual_seed(STREAM_SEED))
    positions = torch.tensor([STREAM_PROMPT + done + 1 for _, done in progress], dtype=torch.int64)
    rows = positions if compression == 1 else WINDOW + (positions - WINDOW + compression - 1) // compression
    return rows[:, None].expand(batch, HKV).to(torch.int32).contiguous()


# The stream cases: the per-head scheduler over the sequences in slot order (as the stream holds them) or
# longest first (what ordering its programs by length would give: the longest heads start first and no long
# one is left to run alone at the end), and the balanced one with its merge narrow (``MERGE_COLUMNS`` columns
# a program) or wide (every column: ``decode_kernel.MERGE_WIDE_HEADS``).
STREAM_CASES = [("per_head", "slot-order"), ("per_head", "longest-first"), ("balanced", "narrow"), ("balanced", "wide")]


@pytest.mark.parametrize("schedule,variant", STREAM_CASES, ids=[f"{s}-{v}" for s, v in STREAM_CASES])
@pytest.mark.parametrize("method", list(STREAM_BATCHES))
def test_decode_attention_stream(benchmark, method, schedule, variant, monkeypatch):
    """Paged decode attention over the request stream's heads (``stream_lengths``) under each scheduler: the
    rule (``decode_schedule``) picks one by the heads' number and spread, recorded as ``max_over_mean``; the
    per-head one in two orders of the sequences, the balanced one with each merge geometry. Floor as
    ``_decode_attention_case``, over these lengths (the same in every case of a method)."""
    lengths = stream_lengths(method)
    if schedule == "balanced":
        monkeypatch.setattr(decode_kernel, "MERGE_WIDE_HEADS", 0 if variant == "wide" else 2**31 - 1)
    elif variant == "longest-first":
        lengths = lengths[lengths[:, 0].argsort(descending=True, stable=True)]
    benchmark.group = f"decode-attention-stream-{method}"
    benchmark.extra_info.update(variant=variant, mean_rows=float(lengths.float().mean()))
    _measure_attention(benchmark, lengths, "stream", "paged", schedule)


# --- the fused step between the q/k/v projection and attention --------------------------------------


def _fused_step_inputs(batch: int) -> Callable[[], object]:
    """A cache of one window of tokens, all marked, and the new token's projection row, norm weights and
    RoPE tables; the call always marks its token (``0 * a > -1``), so every step reuses a freed slot."""
    cache = DMSCache(num_layers=1, window=WINDOW)
    keys = torch.randn(batch, HKV, WINDOW + 1, D, device=DEVICE, dtype=DTYPE)
    cache.append(0, keys, torch.randn_like(keys), torch.ones(keys.shape[:3], dtype=torch.bool, device=DEVICE))
    layer = cache.layers[0]
    state = (layer.ring_slot, layer.ring_flag, layer.lengths, layer.starts, layer.keys, layer.values,
             layer.step_index)
    qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device=DEVICE, dtype=DTYPE)
    q_weight, k_weight = (1 + 0.1 * torch.randn(2, D, device=DEVICE)).to(DTYPE)
    angles = torch.rand(batch, D, device=DEVICE) * 6.3
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    eps = CONFIG.rms_norm_eps
    return lambda: fused_decode_step(qkv, q_weight, k_weight, eps, cos, sin, *state, 0.0, -1.0)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_fused_decode_step(benchmark, batch):
    """Floor: the projection row read, cos and sin, the norm weights, the rotated query written, K and V
    written, and each head's ring bookkeeping: ``B (Hq + 2 Hkv) D e + 2 B D e + 2 D e + B Hq D e +
    2 B Hkv D e + 51 B Hkv`` bytes."""
    e = DTYPE.itemsize
    moved = (batch * (HQ + 2 * HKV) * D * e + 2 * batch * D * e + 2 * D * e + batch * HQ * D * e
             + 2 * batch * HKV * D * e + RING_STEP_BYTES * batch * HKV)
    benchmark.group = f"fused-decode-step-b{batch}"
    benchmark.extra_info.update(batch=batch, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, window=WINDOW,
                                dtype=str(DTYPE))
    _floor(benchmark, moved, _timed(benchmark, rotating(lambda: _fused_step_inputs(batch), moved)))


# --- the projections: skinny_linear beside cuBLAS ----------------------------------------------------


def _projection_inputs(impl: str, rows: int, n: int, k: int, epilogue: str) -> Callable[[], object]:
    """The projection of ``rows`` tokens (``[rows, 1, K]``, as the model's hidden states) by impl."""
    x = torch.randn(rows, 1, k, device=DEVICE).to(LINEAR_DTYPE)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(LINEAR_DTYPE)
    silu = epilogue == "silu_mul"
    residual = torch.randn(rows, 1, n, device=DEVICE).to(LINEAR_DTYPE) if epilogue == "residual" else None
    if impl == "skinny":
        return lambda: skinny_linear(x, weight, residual=residual, silu_mul=silu)
    return lambda: torch_linear(x, weight, residual=residual, silu_mul=silu, residual_in_place=True)


def projection_bytes(projection: str, rows: int) -> int:
    """What a projection of ``rows`` tokens must move: the weight, the input rows, the output rows written
    (``N / 2`` wide after SiLU), and the residual read."""
    n, k, epilogue = PROJECTION_SHAPES[projection]
    e = LINEAR_DTYPE.itemsize
    width = n // 2 if epilogue == "silu_mul" else n
    return n * k * e + rows * k * e + rows * width * e + (rows * n * e if epilogue == "residual" else 0)


@pytest.mark.parametrize("impl", ["skinny", "cublas"])
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("projection", list(PROJECTION_SHAPES))
def test_projection(benchmark, projection, rows, impl):
    """Floor: the weight, the input rows, the output rows written (``N / 2`` wide after SiLU), and the
    residual read: ``N K e + rows K e + rows N_out e (+ rows N e)`` bytes."""
    n, k, epilogue = PROJECTION_SHAPES[projection]
    e, moved = LINEAR_DTYPE.itemsize, projection_bytes(projection, rows)
    benchmark.group = f"linear-{projection}-{rows}rows"
    benchmark.extra_info.update(projection=projection, rows=rows, n=n, k=k, epilogue=epilogue,
                                dtype=str(LINEAR_DTYPE))
    call_s = _timed(benchmark, rotating(lambda: _projection_inputs(impl, rows, n, k, epilogue), n * k * e))
    _floor(benchmark, moved, call_s)
    if call_s is not None and impl == "skinny":
        # cuBLAS on the same shape, timed by this case as bench times a case (-k and --shard change nothing).
        next_cublas = rotating(lambda: _projection_inputs("cublas", rows, n, k, epilogue), n * k * e)
        cublas_ms = median_call_ms(lambda: next_cublas()(), cuda_graph=True, calls_per_graph=CALLS_PER_GRAPH)
        benchmark.extra_info.update(cublas_ms=cublas_ms, speedup_vs_cublas=cublas_ms / (call_s * 1e3))


# The stream's batches (``STREAM_BATCHES``: dense's 56 sequences, DMS's 256-288) and 128: where cuBLAS's row
# tiles may round a batch up (257 rows computed as 384 by 128-row tiles).
BATCH_ROWS = (56, 128, 256, 264, 288) if HAS_CUDA else (2, 3)


@pytest.mark.parametrize("rows", BATCH_ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("projection", list(PROJECTION_SHAPES))
def test_projection_batch(benchmark, projection, rows):
    """Each projection on cuBLAS as ``decode_linear`` issues it (``torch_linear``) at a decode batch's rows,
    where its multiplies, not its weight, may set the time. Floor: the larger of ``test_projection``'s bytes at
    the copy rate and its ``2 rows N K`` FLOPs at the measured matmul rate (``roofline_floor``)."""
    n, k, epilogue = PROJECTION_SHAPES[projection]
    e, moved = LINEAR_DTYPE.itemsize, projection_bytes(projection, rows)
    benchmark.group = f"linear-batch-{projection}"
    benchmark.extra_info.update(projection=projection, rows=rows, n=n, k=k, epilogue=epilogue,
                                dtype=str(LINEAR_DTYPE), bytes=moved, flops=2 * rows * n * k)
    call_s = _timed(benchmark, rotating(lambda: _projection_inputs("cublas", rows, n, k, epilogue), n * k * e))
    if call_s is not None:
        benchmark.extra_info.update(roofline_floor(moved, 2 * rows * n * k, call_s))


# --- SwiGLU's activation on its own (the cuBLAS path's second launch) ---------------------------------


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
def test_silu_mul(benchmark, rows, impl):
    """Floor: the gate/up rows read, the activation written: ``3 rows I e`` bytes."""
    e = LINEAR_DTYPE.itemsize
    moved = 3 * rows * INTERMEDIATE * e
    benchmark.group = f"silu-mul-{rows}rows"
    benchmark.extra_info.update(rows=rows, intermediate=INTERMEDIATE, dtype=str(LINEAR_DTYPE))

    def make():
        gate_up = torch.randn(rows, 1, 2 * INTERMEDIATE, device=DEVICE).to(LINEAR_DTYPE)
        if impl == "triton":
            return lambda: silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return lambda: torch.nn.functional.silu(gate) * up

    _floor(benchmark, moved, _timed(benchmark, rotating(make, moved)))
