"""Decode attention over the compacted DMS KV cache (one query token per sequence).

The cache (``dms_perf.model.cache``, docs/DMS.md "Cache and decode") holds, per (batch, KV head), the
kept tokens plus the last ``window + 1`` tokens. Slot order is irrelevant because RoPE is applied
before caching. Every occupied slot is visible to the new query (the cache update already dropped the
evicted tokens), so decode attention is plain softmax attention over each head's occupied rows
``0 .. lengths[b, h] - 1``. Those logical rows are addressed in one of two ways:

* contiguous (``starts``): head ``(b, h)`` occupies rows ``starts[b, h] ..`` of a flat ``[S, D]`` buffer
  (its segment may have spare rows after them);
* paged (``block_table``, ``page_rows``): logical row ``r`` lives at physical row
  ``block_table[b, h, r // page_rows] * page_rows + r % page_rows`` of the pages viewed as
  ``[num_pages * page_rows, D]`` (``dms_perf.model.paged``). A row whose entry is ``NO_PAGE`` (-1), or
  past the table, is never read: it counts as masked, like a row past the length.

Kernel layout: a split program attends one query token's ``G`` query heads of a KV head (one K/V read
serves all of them) over a range of that head's key blocks; a second small kernel merges the splits of
each head by log-sum-exp (with one split a head the split program writes the output, and there is no
merge). Two schedulers cut the key blocks into splits (``SCHEDULE``):

* ``"per_head"``: each head's own length is cut into ``num_splits`` splits, grid ``(B * Hkv,
  num_splits)``. The longest head sets the time: with the same rows spread unevenly over the heads,
  its programs do most of the work while the others' have little;
* ``"balanced"``: all heads' key blocks are cut into chunks of one size, ``C = cdiv(total blocks,
  num_splits * B * Hkv)`` blocks, so every program has about the same work whatever the spread. The
  grid is fixed at ``num_splits * B * Hkv + B * Hkv`` programs (the most chunks there can be: each head's
  last chunk may be short); each split program finds its (head, chunk) from the prefix sum of the chunks
  per head, and the ones past the last chunk exit. Computed on the device from host-known sizes only, so
  no host sync and a CUDA graph can capture it. Below ``PLAN_HEADS`` heads every split program reads all
  ``B * Hkv`` lengths (from L2, ``HEAD_BLOCK`` at a time) to sum them; from there on, a cost that grows with
  the square of the heads, one small launch (the plan) writes where each head's chunks start, and a split
  program counts the heads that start at or before it. The merge reads those starts (written by the plan,
  or by the split program of each head's first chunk), not the lengths, since it has ``G * D /
  MERGE_COLUMNS`` programs a head. A head that holds many
  chunks is merged in ``cdiv(its chunks, MERGE_TILE)`` dependent steps, so the merge takes wide tiles,
  and splits the head dim over programs (``MERGE_COLUMNS``) so that a tile fits in registers
  (benchmarks/NOTES.md, "Session of 2026-12-06 (7)", has the sweep); from ``MERGE_WIDE_HEADS`` heads on,
  where a head holds a chunk or two, a program takes every column and fewer chunks a step.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dms_perf._runtime import HAS_CUDA
from dms_perf.ops._common import (
    MAX_GRID_AXIS_0,
    attention_dot_precision,
    check_cache_addressing,
    check_grid_rows,
    next_power_of_2,
    sm_count,
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch geometry, read at every call: programs per SM the splits aim for, keys per block, warps per
# split program (benchmarks/NOTES.md, "Session of 2026-12-01 (2)", has the sweep).
PROGRAMS_PER_SM = 2
BLOCK_N = 64
NUM_WARPS = 4
# How the key blocks are cut into splits (module docstring), read at every call; ``schedule=`` overrides.
SCHEDULES = ("per_head", "balanced")
SCHEDULE = "balanced"
# Balanced scheduling: lengths a program reads per step while it locates its chunk; chunk partials the
# merge combines per step (one head may hold most chunks: its merge takes cdiv(its chunks, MERGE_TILE)
# dependent steps, the serial part of a step with uneven heads); head-dim columns per merge program
# (smaller: more programs, and a tile of MERGE_TILE chunks that still fits in registers). Both powers of
# two; chosen by `benchmarks/tune_decode_merge.py` on an H200 (one sequence, 4.5x-uneven heads: 1.16x the
# even time at 16 x 128, 1.03x at 128 x 32).
HEAD_BLOCK = 1024
MERGE_TILE = 128
MERGE_COLUMNS = 32
# Balanced scheduling at ``B * Hkv >= PLAN_HEADS`` heads: one small launch finds where each head's chunks
# start, once, for the split programs to read (``_decode_balanced_plan_kernel``); below it each split
# program scans the lengths itself. Measured at 1,152 heads only (H100: 0.4-0.6 % faster than the scans,
# benchmarks/NOTES.md, "Session of 2026-12-07 (10)"); 512, where a scan takes half a HEAD_BLOCK, is a guess.
PLAN_HEADS = 512
# Balanced merge at ``B * Hkv >= MERGE_WIDE_HEADS`` heads: a program merges all ``D`` columns of a query head
# (``merge_geometry``). Many heads hold a few chunks each, and a merge program's time is its dependent loads,
# not its bytes: at 1,136 heads the narrow merge took 40 us a layer, ~20x its bytes over the card's rate (H100,
# benchmarks/NOTES.md, "Session of 2026-12-07 (10)"). The merge sweep (H200, "Session of 2026-12-06 (7)") had
# the wide geometries (16 or 64 x 128) as fast as 128 x 32 or faster from 8 sequences (64 heads) on, even or
# uneven; at one sequence (8 heads) the narrow one wins on uneven heads.
MERGE_WIDE_HEADS = 64


@triton.jit
def _attend(
    q, k_ptr, v_ptr, first, table_ptr, stride_tp, max_pages, start, end, stride_kn, stride_vn, scale_log2,
    G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of ``q`` ``[G_PAD, D]`` over a head's logical rows ``start .. end - 1`` (``start`` a
    multiple of BLOCK_N): returns the running max ``m``, sum ``l`` (log2 domain) and unnormalized output.

    Contiguous: the rows from ``first``. Paged: through the head's table row ``table_ptr``. When a page
    holds whole tiles (``PAGE_ROWS % BLOCK_N == 0``), a tile never crosses a page and its page number is
    one scalar load; smaller pages take one table entry per row (a gather). Rows of a ``NO_PAGE`` entry
    are masked, and since a whole tile may be, the softmax then guards its max against -inf."""
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    if not PAGED:
        k_base = k_ptr + first * stride_kn
        v_base = v_ptr + first * stride_vn
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        if PAGED:
            if PAGE_ROWS % BLOCK_N == 0:
                page_index = n0 // PAGE_ROWS
                page = tl.load(table_ptr + page_index * stride_tp, mask=page_index < max_pages, other=-1)
                rows = page.to(tl.int64) * PAGE_ROWS + (n0 % PAGE_ROWS) + offs_n
                n_mask = n < tl.where(page >= 0, end, n0)  # the whole tile or none of it
            else:
                page_index = n // PAGE_ROWS
                page = tl.load(table_ptr + page_index * stride_tp, mask=n_mask & (page_index < max_pages), other=-1)
                rows = page.to(tl.int64) * PAGE_ROWS + n % PAGE_ROWS
                n_mask = n_mask & (page >= 0)
            k_rows = k_ptr + rows[:, None] * stride_kn
            v_rows = v_ptr + rows[:, None] * stride_vn
        else:
            k_rows = k_base + n.to(tl.int64)[:, None] * stride_kn
            v_rows = v_base + n.to(tl.int64)[:, None] * stride_vn
        k = tl.load(k_rows + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if PAGED:
            # No key yet (a fully masked tile): exponents against 0 give exp2(-inf) = 0, not exp2(NaN);
            # the running max itself stays -inf until a key comes.
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_partial(part_out_ptr, part_lse_ptr, row, m_i, l_i, acc, G: tl.constexpr, G_PAD: tl.constexpr,
                   D: tl.constexpr):
    """One split's normalized output and log2-sum-exp at partial rows ``row`` ``[G_PAD]``, of the ``G`` real
    query heads only (the merge reads no padding row); a split without keys reports out = 0, lse = -inf
    and contributes nothing to the merge."""
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    real = tl.arange(0, G_PAD) < G
    tl.store(part_out_ptr + row[:, None] * D + tl.arange(0, D)[None, :], out, mask=real[:, None])
    tl.store(part_lse_ptr + row, lse2, mask=real)


@triton.jit
def _store_output(out_ptr, b, h, stride_ob, stride_oh, l_i, acc, G: tl.constexpr, G_PAD: tl.constexpr,
                  D: tl.constexpr):
    """The attention output of query heads ``h * G ..`` of sequence ``b`` from one program that read all of
    the head's rows (no merge); a head without keys gives zeros."""
    offs_g = tl.arange(0, G_PAD)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    rows = out_ptr + b * stride_ob + (h * G + offs_g).to(tl.int64)[:, None] * stride_oh + tl.arange(0, D)[None, :]
    tl.store(rows, out.to(out_ptr.dtype.element_ty), mask=(offs_g < G)[:, None])


@triton.jit
def _load_query(q_ptr, b, h, stride_qb, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    offs_g = tl.arange(0, G_PAD)
    q_rows = q_ptr + b * stride_qb + (h * G + offs_g).to(tl.int64)[:, None] * stride_qh + tl.arange(0, D)[None, :]
    return tl.load(q_rows, mask=(offs_g < G)[:, None], other=0.0)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, table_ptr, len_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_kn, stride_vn, stride_tb, stride_th, stride_tp, max_pages,
    stride_ob, stride_oh, num_kv_heads, num_splits, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):
    """The per-head scheduler: program (head, split). ``DIRECT`` (one split a head): the program reads the
    whole head and writes the output itself; there is nothing to merge."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = pid_bh % num_kv_heads
    q = _load_query(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D)

    # Each head's own length is cut into num_splits splits of whole key blocks: the work of a head is
    # spread over all its programs whatever its length, and no host-known length enters the launch
    # but the number of splits (so a captured launch stays right as the heads grow).
    length = tl.load(len_ptr + pid_bh)
    split_size = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_size
    end = tl.minimum(start + split_size, length)

    if PAGED:
        first = 0
        table_row = table_ptr + b * stride_tb + h * stride_th
    else:
        first = tl.load(start_ptr + pid_bh).to(tl.int64)
        table_row = table_ptr
    m_i, l_i, acc = _attend(
        q, k_ptr, v_ptr, first, table_row, stride_tp, max_pages, start, end, stride_kn, stride_vn, scale_log2,
        G_PAD, D, BLOCK_N, PAGED, PAGE_ROWS, DOT_PRECISION,
    )
    if DIRECT:
        _store_output(out_ptr, b, h, stride_ob, stride_oh, l_i, acc, G, G_PAD, D)
    else:
        row = (pid_bh.to(tl.int64) * G_PAD + tl.arange(0, G_PAD)) * num_splits + pid_s
        _store_partial(part_out_ptr, part_lse_ptr, row, m_i, l_i, acc, G, G_PAD, D)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
    num_kv_heads, num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    g = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = pid_bh % num_kv_heads
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    row = (pid_bh.to(tl.int64) * G_PAD + g) * num_splits + offs_s
    lse2 = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse2, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # no split with keys: exp2(-inf - 0) = 0, not exp2(NaN)
    w = tl.where(s_mask & (lse2 > float("-inf")), tl.exp2(lse2 - m), 0.0)
    part = tl.load(part_out_ptr + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    # A head of length 0 has no split with keys: its output is defined as zeros (not 0 / 0).
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_row = b * stride_ob + (h * G + g).to(tl.int64) * stride_oh
    tl.store(out_ptr + o_row + offs_d, out.to(out_ptr.dtype.element_ty))


# --- the balanced scheduler ---------------------------------------------------------------------------


# The balanced kernels round up with `(x + y - 1) // y` rather than tl.cdiv in their scans over the
# heads: the same arithmetic, without a jit call per use, which the CPU interpreter charges milliseconds.


@triton.jit
def _chunk_blocks(len_ptr, num_heads, num_chunks, BLOCK_N: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    """Key blocks per chunk: ``cdiv(total key blocks of all heads, num_chunks)``, at least 1 (int64)."""
    total = tl.full([], 0, tl.int64)
    for h0 in range(0, num_heads, HEAD_BLOCK):
        heads = h0 + tl.arange(0, HEAD_BLOCK)
        lengths = tl.load(len_ptr + heads, mask=heads < num_heads, other=0)
        total += tl.sum(((lengths + BLOCK_N - 1) // BLOCK_N).to(tl.int64), 0)
    return tl.maximum((total + num_chunks - 1) // num_chunks, 1)


@triton.jit
def _head_chunks(len_ptr, heads, num_heads, chunk_blocks, BLOCK_N: tl.constexpr):
    """Chunks of ``chunk_blocks`` key blocks that heads ``heads`` (a tile or one index) hold, 0 past
    ``num_heads`` (int32): one rule for the plan, the split and the merge, which must agree on it."""
    blocks = (tl.load(len_ptr + heads, mask=heads < num_heads, other=0) + BLOCK_N - 1) // BLOCK_N
    return ((blocks + chunk_blocks - 1) // chunk_blocks).to(tl.int32)


@triton.jit
def _decode_balanced_plan_kernel(len_ptr, first_ptr, num_heads, num_chunks, BLOCK_N: tl.constexpr,
                                 HEAD_BLOCK: tl.constexpr):
    """One program: where each head's chunks start, ``first[r] = before[r]``, then the key blocks a chunk
    takes at ``first[num_heads]`` and the number of chunks at ``first[num_heads + 1]``; the split reads
    them instead of scanning the lengths in every program (``PLAN_HEADS``)."""
    chunk_blocks = _chunk_blocks(len_ptr, num_heads, num_chunks, BLOCK_N, HEAD_BLOCK)
    before = tl.full([], 0, tl.int32)
    for h0 in range(0, num_heads, HEAD_BLOCK):
        heads = h0 + tl.arange(0, HEAD_BLOCK)
        chunks = _head_chunks(len_ptr, heads, num_heads, chunk_blocks, BLOCK_N)
        tl.store(first_ptr + heads, before + tl.cumsum(chunks, 0) - chunks, mask=heads < num_heads)
        before += tl.sum(chunks, 0)
    tl.store(first_ptr + num_heads, chunk_blocks.to(tl.int32))
    tl.store(first_ptr + num_heads + 1, before)


@triton.jit
def _decode_balanced_split_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, table_ptr, len_ptr, part_out_ptr, part_lse_ptr, first_ptr,
    stride_qb, stride_qh, stride_kn, stride_vn, stride_tb, stride_th, stride_tp, max_pages,
    num_kv_heads, num_heads, num_chunks, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_BLOCK: tl.constexpr,
    PLANNED: tl.constexpr,
):
    """The balanced scheduler: program ``pid`` takes chunk ``pid`` of the heads' chunks in head order
    (head r's chunks are programs ``before[r] .. before[r] + chunks[r] - 1``); partial rows by program.

    ``PLANNED``: the plan launch wrote ``first`` (``_decode_balanced_plan_kernel``); a program past the last
    chunk exits after one load, the others find their head as the number of heads starting at or before
    ``pid``, less one (a head without chunks starts where the next one does, so the count skips it).
    Else each program scans the lengths twice (their sum, then the chunks before each head), and for the
    merge the program of a head's first chunk writes ``first[r]``, program 0 the key blocks a chunk takes
    at ``first[num_heads]``."""
    pid = tl.program_id(0)
    head = tl.full([], -1, tl.int32)
    chunk = tl.full([], 0, tl.int32)
    if PLANNED:
        chunk_blocks = tl.load(first_ptr + num_heads).to(tl.int64)
        if pid < tl.load(first_ptr + num_heads + 1):
            for h0 in range(0, num_heads, HEAD_BLOCK):
                heads = h0 + tl.arange(0, HEAD_BLOCK)
                starts = tl.load(first_ptr + heads, mask=heads < num_heads, other=2147483647)
                head += tl.sum((starts <= pid).to(tl.int32), 0)
            chunk = pid - tl.load(first_ptr + head)
    else:
        chunk_blocks = _chunk_blocks(len_ptr, num_heads, num_chunks, BLOCK_N, HEAD_BLOCK)
        if pid == 0:
            tl.store(first_ptr + num_heads, chunk_blocks.to(tl.int32))
        # Find the one head whose chunks cover pid (none past the last chunk): head stays -1 then.
        before_block = tl.full([], 0, tl.int32)
        for h0 in range(0, num_heads, HEAD_BLOCK):
            heads = h0 + tl.arange(0, HEAD_BLOCK)
            chunks = _head_chunks(len_ptr, heads, num_heads, chunk_blocks, BLOCK_N)
            through = before_block + tl.cumsum(chunks, 0)
            mine = (through - chunks <= pid) & (pid < through)
            head += tl.sum(tl.where(mine, heads + 1, 0), 0)
            chunk += tl.sum(tl.where(mine, pid - (through - chunks), 0), 0)
            before_block += tl.sum(chunks, 0)
        if head >= 0:
            if chunk == 0:
                tl.store(first_ptr + head, pid)
    if head >= 0:
        b = (head // num_kv_heads).to(tl.int64)
        h = head % num_kv_heads
        q = _load_query(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D)
        length = tl.load(len_ptr + head)
        start = (chunk * chunk_blocks * BLOCK_N).to(tl.int32)  # below length: int32 as the per-head ranges
        end = tl.minimum(start + chunk_blocks * BLOCK_N, length).to(tl.int32)
        if PAGED:
            first = 0
            table_row = table_ptr + b * stride_tb + h * stride_th
        else:
            first = tl.load(start_ptr + head).to(tl.int64)
            table_row = table_ptr
        m_i, l_i, acc = _attend(
            q, k_ptr, v_ptr, first, table_row, stride_tp, max_pages, start, end, stride_kn, stride_vn,
            scale_log2, G_PAD, D, BLOCK_N, PAGED, PAGE_ROWS, DOT_PRECISION,
        )
        # Programs past the last chunk write nothing: the merge reads each head's own chunks only.
        _store_partial(part_out_ptr, part_lse_ptr, pid.to(tl.int64) * G_PAD + tl.arange(0, G_PAD), m_i, l_i, acc,
                       G, G_PAD, D)


@triton.jit
def _decode_balanced_merge_kernel(
    part_out_ptr, part_lse_ptr, len_ptr, first_ptr, out_ptr, stride_ob, stride_oh,
    num_kv_heads, num_heads,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE_TILE: tl.constexpr, COLUMNS: tl.constexpr,
):
    """Columns ``pid_c * COLUMNS ..`` of query head ``h * G + g`` of head ``pid_bh``: the log-sum-exp merge
    of that head's chunks, read ``MERGE_TILE`` at a time (one head may hold all ``num_chunks``). Where its
    chunks start and how many key blocks a chunk takes, the split wrote (``first``); a head without
    keys has no chunk, and its entry is never read."""
    pid_bh = tl.program_id(0)
    g = tl.program_id(1)
    pid_c = tl.program_id(2)
    chunk_blocks = tl.load(first_ptr + num_heads)
    count = _head_chunks(len_ptr, pid_bh, num_heads, chunk_blocks, BLOCK_N)
    first = tl.load(first_ptr + pid_bh, mask=count > 0, other=0)

    offs_t = tl.arange(0, MERGE_TILE)
    offs_d = pid_c * COLUMNS + tl.arange(0, COLUMNS)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([COLUMNS], tl.float32)
    for t0 in range(0, count, MERGE_TILE):
        t_mask = t0 + offs_t < count
        row = (first + t0 + offs_t).to(tl.int64) * G_PAD + g
        lse2 = tl.load(part_lse_ptr + row, mask=t_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse2, 0))
        # No chunk with keys yet (paged, all rows masked): weights against 0 are 0, not NaN; m stays -inf.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        w = tl.where(lse2 > float("-inf"), tl.exp2(lse2 - m_ref), 0.0)
        part = tl.load(part_out_ptr + row[:, None] * D + offs_d[None, :], mask=t_mask[:, None], other=0.0)
        rescale = tl.exp2(m - m_ref)
        acc = acc * rescale + tl.sum(part * w[:, None], 0)
        total = total * rescale + tl.sum(w, 0)
        m = m_new
    # A head of length 0 has no chunk: its output is defined as zeros (not 0 / 0).
    out = acc / tl.where(total > 0, total, 1.0)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = pid_bh % num_kv_heads
    o_row = b * stride_ob + (h * G + g).to(tl.int64) * stride_oh
    tl.store(out_ptr + o_row + offs_d, out.to(out_ptr.dtype.element_ty))


# --- the launcher ---------------------------------------------------------------------------------------


def _check_inputs(q, k_cache, v_cache, starts, lengths, max_length, block_table, page_rows):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32)")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32:
        raise TypeError(f"lengths must be an int32 tensor, got {getattr(lengths, 'dtype', type(lengths))}")
    if q.dim() != 3 or k_cache.dim() != 2 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k_cache = v_cache [S, D]; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share a dtype: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    B, Hq, D = q.shape
    if k_cache.shape[1] != D:
        raise ValueError(f"head_dim mismatch: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if lengths.dim() != 2 or lengths.shape[0] != B or Hq % max(lengths.shape[1], 1) or lengths.shape[1] == 0:
        raise ValueError(
            f"lengths must be [B, Hkv] with B={B} and Hq={Hq} a multiple of Hkv; got {tuple(lengths.shape)}"
        )
    check_cache_addressing(
        "dms_decode_attention", starts, block_table, page_rows, tuple(lengths.shape), k_cache.shape[0], q.device
    )
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int (the expected longest head), got {max_length!r}")
    devices = {q.device, k_cache.device, v_cache.device, lengths.device}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def merge_geometry(heads: int, head_dim: int) -> tuple[int, int]:
    """``(chunks a step, head-dim columns a program)`` of the balanced merge for ``heads`` (``B * Hkv``) heads:
    ``MERGE_TILE`` x ``MERGE_COLUMNS`` below ``MERGE_WIDE_HEADS``; from there on every column in one program,
    and as many fewer chunks a step, so that a tile holds as many elements (both powers of two)."""
    columns = min(MERGE_COLUMNS, head_dim)  # both powers of two: columns divides head_dim
    if heads < MERGE_WIDE_HEADS:
        return MERGE_TILE, columns
    return max(1, MERGE_TILE * columns // head_dim), head_dim


def default_num_splits(batch_kv_heads: int, max_length: int, block_n: int) -> int:
    """Enough splits for ``PROGRAMS_PER_SM`` programs per SM, never more than the longest head has key blocks."""
    blocks = max(1, math.ceil(max_length / block_n))
    if HAS_CUDA:
        wanted = math.ceil(PROGRAMS_PER_SM * sm_count(torch.cuda.current_device()) / max(batch_kv_heads, 1))
    else:
        wanted = 4
    return max(1, min(wanted, blocks))


def dms_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    max_length: int,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_table: torch.Tensor | None = None,
    page_rows: int | None = None,
    schedule: str | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over the compacted DMS cache (Triton).

    Args:
        q: ``[B, Hq, D]`` query of the new token (RoPE applied, borrowed channel zeroed).
        k_cache, v_cache: ``[S, D]``, same dtype as ``q``, stride 1 along ``D``: all heads' rows (paged:
            the pages viewed as ``[num_pages * page_rows, D]``).
        starts: ``[B, Hkv]`` int64, first row of each head's segment (contiguous cache), or None with
            ``block_table``. Exactly one of the two is given.
        lengths: ``[B, Hkv]`` int32, occupied rows per head (``>= 0``); rows past them are never read.
        max_length: a host-known estimate of the longest head, ``>= 1``. It only caps the number of
            splits over the key length (never more than its key blocks), never the result: each head's
            own length is cut into the splits on the device, also past ``max_length``. An upper bound of
            ``lengths`` (the cache's ``longest_bound``, or a power of two above it) is the fast choice.
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: programs per (batch, KV head) along the key length, ``<= 65535`` (a grid axis) with
            the per-head scheduler; on average with the balanced one (``num_splits * B * Hkv`` chunks of
            equal size in all). Default from the SM count.
        block_n: keys per tile (a power of two >= 16), default ``BLOCK_N``.
        block_table: ``[B, Hkv, max_pages]`` int32 (a view is fine: its strides are passed), the paged
            cache's table (``dms_perf.model.paged``): entry ``j`` of head ``(b, h)`` is the page of its
            logical rows ``j * page_rows ..``, ``NO_PAGE`` (-1) where it has none. Logical rows in a
            ``NO_PAGE`` page or past the table are masked (never read).
        page_rows: rows per page, a power of two; given exactly with ``block_table``. With ``page_rows``
            a multiple of the tile (``block_n``) a tile never crosses a page: one table entry is read per
            tile (a scalar load); smaller pages read one entry per key row (a gather).
        schedule: ``"per_head"`` or ``"balanced"`` (module docstring); default ``SCHEDULE`` as it is at
            this call.
    Returns:
        ``[B, Hq, D]`` in ``q.dtype``; query head ``h * G + g`` attends to KV head ``h``
        (G = Hq / Hkv), over exactly the occupied rows (docs/DMS.md, "Cache and decode"). A head of
        length 0 (or all of whose rows are masked) has nothing to attend to: its query heads' outputs
        are zeros.
    Reads ``starts``, ``block_table`` and ``lengths`` on the device only: no host synchronization, and
    the launches depend on host-known sizes only (a CUDA graph can capture them).
    """
    _check_inputs(q, k_cache, v_cache, starts, lengths, max_length, block_table, page_rows)
    B, Hq, D = q.shape
    Hkv = lengths.shape[1]
    G = Hq // Hkv
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need stride 1 along head_dim")
    scale = D**-0.5 if scale is None else float(scale)
    block_n = BLOCK_N if block_n is None else block_n
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n!r}")
    schedule = SCHEDULE if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_splits is None:
        num_splits = default_num_splits(B * Hkv, max_length, block_n)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    paged = block_table is not None
    lengths = lengths.contiguous()
    if paged:
        # Unused stand-ins for the addressing arguments the other layout reads.
        starts, table_strides, max_pages, page = lengths, block_table.stride(), block_table.shape[2], page_rows
    else:
        starts, block_table, table_strides, max_pages, page = starts.contiguous(), lengths, (0, 0, 0), 0, 1
    g_pad = max(16, next_power_of_2(G))
    geometry = dict(G=G, G_PAD=g_pad, D=D, BLOCK_N=block_n, PAGED=paged, PAGE_ROWS=page,
                    DOT_PRECISION=attention_dot_precision(q.dtype))
    addressing = (q.stride(0), q.stride(1), k_cache.stride(0), v_cache.stride(0), *table_strides, max_pages)
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if schedule == "per_head":
        # The splits are the grid's second axis; its first, B * Hkv, may take up to 2**31 - 1.
        check_grid_rows("num_splits", num_splits)
        direct = num_splits == 1
        if direct:  # unused stand-ins: the split programs write the output
            part_out = part_lse = out
        else:
            part_out = torch.empty((B * Hkv * g_pad * num_splits, D), device=q.device, dtype=torch.float32)
            part_lse = torch.empty((B * Hkv * g_pad * num_splits,), device=q.device, dtype=torch.float32)
        _decode_split_kernel[(B * Hkv, num_splits)](
            q, k_cache, v_cache, starts, block_table, lengths, part_out, part_lse, out, *addressing,
            out.stride(0), out.stride(1), Hkv, num_splits, scale * math.log2(math.e), **geometry, DIRECT=direct,
            num_warps=NUM_WARPS,
        )
        if not direct:
            _decode_merge_kernel[(B * Hkv, G)](
                part_out, part_lse, out, out.stride(0), out.stride(1),
                Hkv, num_splits,
                G=G, G_PAD=g_pad, D=D, S_PAD=next_power_of_2(num_splits),
                num_warps=4,
            )
        return out
    num_chunks = num_splits * B * Hkv
    programs = num_chunks + B * Hkv  # at most one short last chunk per head beyond num_chunks full ones
    if programs > MAX_GRID_AXIS_0:
        raise ValueError(
            f"balanced schedule: {programs} programs (num_splits + 1 = {num_splits + 1} per head, B * Hkv = "
            f"{B * Hkv}) exceed the {MAX_GRID_AXIS_0} of a grid axis"
        )
    head_block = min(HEAD_BLOCK, max(16, next_power_of_2(B * Hkv)))
    part_out = torch.empty((programs * g_pad, D), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((programs * g_pad,), device=q.device, dtype=torch.float32)
    first = torch.empty((B * Hkv + 2,), device=q.device, dtype=torch.int32)
    planned = B * Hkv >= PLAN_HEADS
    if planned:
        _decode_balanced_plan_kernel[(1,)](lengths, first, B * Hkv, num_chunks, BLOCK_N=block_n,
                                           HEAD_BLOCK=head_block, num_warps=4)
    _decode_balanced_split_kernel[(programs,)](
        q, k_cache, v_cache, starts, block_table, lengths, part_out, part_lse, first, *addressing,
        Hkv, B * Hkv, num_chunks, scale * math.log2(math.e), **geometry, HEAD_BLOCK=head_block,
        PLANNED=planned, num_warps=NUM_WARPS,
    )
    tile, columns = merge_geometry(B * Hkv, D)
    _decode_balanced_merge_kernel[(B * Hkv, G, D // columns)](
        part_out, part_lse, lengths, first, out, out.stride(0), out.stride(1),
        Hkv, B * Hkv,
        G=G, G_PAD=g_pad, D=D, BLOCK_N=block_n, MERGE_TILE=tile,
        COLUMNS=columns, num_warps=4,
    )
    return out
