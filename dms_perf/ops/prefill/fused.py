"""Fused DMS prefill attention in Triton (the rule: docs/DMS.md, "Who is visible").

The tests check it against ``math_impl.math_attention`` (the ``"math"`` implementation); the public entry
point is ``dms_perf.dms_prefill_attention(..., impl="triton")``, which validates its inputs and calls
``triton_prefill_attention`` here.

Why it does less work than dense causal attention: a program owns query positions
``[m0, m0 + BLOCK_M)`` of all G query heads of one KV head (stacked as ``ROWS = G * BLOCK_M`` rows, so
every K/V tile is loaded once for the whole group). Every key at position ``j < m0 - window`` is more
than ``window`` behind all of those queries, so it is visible to all of them iff it is kept: those keys
are read from a compacted copy of the kept keys, with no mask at all. Only the band
``[m0 - window, m0 + BLOCK_M)`` of the original K/V needs the element-wise rule. The two loops are
disjoint by position and share one online softmax (exp2, fp32 accumulation), so no N x N mask or score
matrix ever exists.

Host cost matters at short prompts (a Triton launch costs tens of microseconds of Python on the
host): a call is two Triton launches. ``_dms_prep_kernel`` reads the decisions, compacts the kept K and
V rows of every (batch, KV head) into segments of fixed capacity N (no global prefix sum, so no host
sync and no second pass) and writes the running kept counts; ``_dms_prefill_kernel`` attends.
Its readable reference (tests only) is ``naive.prep_reference`` (``evict_flags``, boolean indexing, ``cumsum``).
With ``COMPACT`` off (the hub-triton structure), there is no prep launch: the band covers every key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf._runtime import INTERPRET
from dms_perf.ops._common import COUNT_BLOCK, attention_dot_precision, block_rows, cdiv, chunk_geometry

LOG2E = 1.4426950408889634
# Running max before any key: finite, so that rows whose first tiles are all masked give
# exp2(-inf - NEG_BIG) = 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


def _configs():
    if INTERPRET:
        # The interpreter's cost is per operation, not per element: few, small tiles.
        return [triton.Config({"ROWS": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        # The fastest three of benchmarks/tune_prefill.py's sweep at the Qwen3-8B shape on an H100
        # (benchmarks/NOTES.md): 64 query positions x 4 heads per program, 64-key tiles.
        triton.Config({"ROWS": 256, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"ROWS": 256, "BLOCK_N": 64}, num_warps=16, num_stages=3),
        triton.Config({"ROWS": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        # fp32 inputs: tiles of twice the bytes; these fit Hopper's 227 KB of shared memory at D=128.
        # Their dots run in full fp32 on the FMA units (_common.FP32_DOT_PRECISION, as in decode).
        triton.Config({"ROWS": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"ROWS": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ]


def _prune_by_element_size(configs, named_args, **kwargs):
    """2-byte inputs try the first three configs, fp32 the last two (the others run out of shared
    memory at D=128, and the autotuner would raise instead of skipping when all fail)."""
    if INTERPRET:
        return configs
    return configs[:3] if named_args["Q"].element_size() <= 2 else configs[3:]


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, col_ok, visible,
    qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a K/V tile. ``MASKED`` tiles load under ``col_ok`` and drop
    scores where ``visible`` is false; unmasked tiles are fully in range and fully visible."""
    if MASKED:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    # Raw scores; the scale (log2 e / sqrt(D)) enters through the row max and one fused multiply-add.
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _band_tiles(
    acc, m_i, l_i, q, k_base, v_base, dec_base, pos, cols, d, lo, hi, band_hi, window, N,
    stride_kn, stride_vn, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Band tiles starting in [lo, hi) over the original K/V; ``MASKED`` applies the DMS rule
    (docs/DMS.md: ``j <= i`` and (``i - j <= window`` or key j kept)) and ``j < band_hi``."""
    for start in range(lo, hi, BLOCK_N):
        j = start + cols
        col_ok = j < band_hi
        visible = col_ok[None, :]
        if MASKED:
            # Key j is kept unless token j + 1's decision marks it (the newest token has none).
            kept = tl.load(dec_base + j + 1, mask=col_ok & (j + 1 < N), other=0) == 0
            dist = pos[:, None] - j[None, :]
            visible = (dist >= 0) & ((dist <= window) | kept[None, :]) & col_ok[None, :]
        k_ptrs = k_base + j.to(tl.int64)[:, None] * stride_kn + d[None, :]
        v_ptrs = v_base + j.to(tl.int64)[:, None] * stride_vn + d[None, :]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, col_ok, visible,
                                     qk_scale, MASKED, DOT_PRECISION)
    return acc, m_i, l_i


# Keyed on N rounded up to a power of two: a new prompt length reuses its bucket's config instead of
# re-running the autotuner (host syncs, hundreds of ms) inside a model's prefill.
@triton.autotune(
    configs=_configs(), key=["N_BUCKET", "HEAD_DIM", "GROUP", "COMPACT"],
    prune_configs_by={"early_config_prune": _prune_by_element_size},
)
@triton.jit
def _dms_prefill_kernel(
    Q, K, V, KC, VC, KEPT_UPTO, DEC, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    N, N_BUCKET, num_kv_heads, window, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, COMPACT: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS // GROUP_P2
    # One grid axis over (row, query block), query blocks fastest: the order of a [blocks, rows] grid,
    # without its second axis's limit of 65535 rows (see ``prefill_grid``).
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks  # b * Hkv + kv head
    # Latest query blocks have the most keys: launch them first for a better tail.
    m_block = num_m_blocks - 1 - pid % num_m_blocks
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    m0 = m_block * BLOCK_M

    rows = tl.arange(0, ROWS)
    g = rows // BLOCK_M
    pos = m0 + rows % BLOCK_M
    row_ok = (g < GROUP) & (pos < N)
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)

    q_row = (b.to(tl.int64) * stride_qb + (h * GROUP + g).to(tl.int64) * stride_qh
             + pos.to(tl.int64) * stride_qn)
    q = tl.load(Q + q_row[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)

    # Loop 1 (COMPACT): kept keys at positions < m0 - window, compacted; visible to every row, no mask.
    # Without COMPACT the band below starts at key 0: every key under the element-wise rule.
    band_lo = tl.maximum(m0 - window, 0)
    if COMPACT:
        seg_start = bh.to(tl.int64) * N
        n_prefix = 0
        if band_lo > 0:
            n_prefix = tl.load(KEPT_UPTO + bh.to(tl.int64) * N + band_lo - 1)
        kc_ptrs = KC + (seg_start + cols)[:, None] * HEAD_DIM + d[None, :]
        vc_ptrs = VC + (seg_start + cols)[:, None] * HEAD_DIM + d[None, :]
        n_full = (n_prefix // BLOCK_N) * BLOCK_N
        for _ in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kc_ptrs, vc_ptrs, cols, cols,
                                         qk_scale, False, DOT_PRECISION)
            kc_ptrs += BLOCK_N * HEAD_DIM
            vc_ptrs += BLOCK_N * HEAD_DIM
        if n_full < n_prefix:
            tail_ok = n_full + cols < n_prefix
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kc_ptrs, vc_ptrs, tail_ok,
                                         tail_ok[None, :], qk_scale, True, DOT_PRECISION)
    else:
        band_lo = band_lo * 0

    # Loop 2: every key in [band_lo, m0 + BLOCK_M) from the original K/V, under the DMS rule. Tiles
    # starting at or after m0 + BLOCK_M - 1 - window are in every row's window, and tiles ending at
    # or before m0 are causal for every row: those run unmasked, the head and tail tiles masked.
    band_hi = tl.minimum(m0 + BLOCK_M, N)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    dec_base = DEC + bh.to(tl.int64) * N
    in_all_windows = m0 + BLOCK_M - 1 - window
    mid_lo = band_lo + tl.cdiv(tl.maximum(in_all_windows - band_lo, 0), BLOCK_N) * BLOCK_N
    mid_hi = mid_lo + (tl.maximum(tl.minimum(m0 + 1, band_hi) - mid_lo, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, dec_base, pos, cols, d,
                                band_lo, tl.minimum(mid_lo, band_hi), band_hi, window, N,
                                stride_kn, stride_vn, qk_scale, BLOCK_N, True, DOT_PRECISION)
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, dec_base, pos, cols, d,
                                mid_lo, mid_hi, band_hi, window, N,
                                stride_kn, stride_vn, qk_scale, BLOCK_N, False, DOT_PRECISION)
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, dec_base, pos, cols, d,
                                mid_hi, band_hi, band_hi, window, N,
                                stride_kn, stride_vn, qk_scale, BLOCK_N, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_row = (b.to(tl.int64) * stride_ob + (h * GROUP + g).to(tl.int64) * stride_oh
             + pos.to(tl.int64) * stride_on)
    tl.store(OUT + o_row[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        # Natural-log logsumexp of the scaled scores: (m + log2 l) * ln 2.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        lse_row = (b.to(tl.int64) * num_kv_heads * GROUP + h * GROUP + g) * N + pos
        tl.store(LSE + lse_row, lse, mask=row_ok)


@triton.jit
def _dms_prep_kernel(
    DEC, K, V, KC, VC, KEPT_UPTO,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, num_kv_heads, CHUNK, n_chunks, tiles,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, COUNT_BLOCK: tl.constexpr,
):
    """Program ``r * n_chunks + c`` handles tokens [c * CHUNK, (c + 1) * CHUNK) of row r = b * Hkv + h:
    writes ``KEPT_UPTO[r, s]`` (kept tokens among 0..s) and copies each kept token's K and V row to
    ``KC / VC[r * N + its rank among the row's kept tokens]``. Token s is kept unless ``DEC[r, s + 1]``.
    One grid axis, chunks fastest (a [chunks, rows] grid would stop at 65535 rows)."""
    pid = tl.program_id(0)
    c = pid % n_chunks
    r = pid // n_chunks
    b = (r // num_kv_heads).to(tl.int64)
    h = (r % num_kv_heads).to(tl.int64)
    row = r.to(tl.int64) * N
    start = c * CHUNK
    # Kept tokens before the chunk: tokens j < start are evicted iff DEC[j + 1] (j + 1 <= start < N).
    marked = 0
    for off in range(0, start, COUNT_BLOCK):
        j = off + tl.arange(0, COUNT_BLOCK)
        marked += tl.sum(tl.load(DEC + row + j + 1, mask=j < start, other=0).to(tl.int32), axis=0)
    next_rank = start - marked
    d = tl.arange(0, HEAD_DIM)
    end = tl.minimum(start + CHUNK, N)
    for t in range(0, tiles):
        s = start + t * BLOCK_S + tl.arange(0, BLOCK_S)
        in_chunk = s < end
        evicted = tl.load(DEC + row + s + 1, mask=in_chunk & (s + 1 < N), other=0) != 0
        kept = in_chunk & ~evicted
        upto = next_rank + tl.cumsum(kept.to(tl.int32), axis=0)
        tl.store(KEPT_UPTO + row + s, upto, mask=in_chunk)
        dest = (row + upto - 1)[:, None] * HEAD_DIM + d[None, :]
        src = s.to(tl.int64)[:, None]
        k_rows = tl.load(K + b * stride_kb + h * stride_kh + src * stride_kn + d[None, :], mask=kept[:, None])
        tl.store(KC + dest, k_rows, mask=kept[:, None])
        v_rows = tl.load(V + b * stride_vb + h * stride_vh + src * stride_vn + d[None, :], mask=kept[:, None])
        tl.store(VC + dest, v_rows, mask=kept[:, None])
        next_rank += tl.sum(kept.to(tl.int32), axis=0)


def dms_prep(k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor):
    """One launch: ``(k_kept, v_kept, kept_upto)`` for the fused kernel (see ``prep_reference``).

    k, v ``[B, Hkv, N, D]`` (last dim contiguous), decisions bool ``[B, Hkv, N]`` contiguous.
    ``k_kept`` / ``v_kept`` ``[B * Hkv * N, D]``: row r = b * Hkv + h's kept K/V rows, in order, from
    ``r * N``; the rest of each segment is left unwritten. ``kept_upto`` int32 ``[B, Hkv, N]``.
    """
    batch, num_kv_heads, n, head_dim = k.shape
    rows = batch * num_kv_heads
    k_kept = torch.empty((rows * n, head_dim), dtype=k.dtype, device=k.device)
    v_kept = torch.empty((rows * n, head_dim), dtype=v.dtype, device=v.device)
    kept_upto = torch.empty((batch, num_kv_heads, n), dtype=torch.int32, device=k.device)
    block_s = block_rows(head_dim, k.element_size())
    chunk, n_chunks, tiles = chunk_geometry(rows, n, block_s, k.device)
    # One grid axis: n_chunks * rows <= 2**31 - 1 while k holds fewer than 2**31 tiles of >= 16 rows.
    _dms_prep_kernel[(n_chunks * rows,)](
        decisions.view(torch.uint8), k, v, k_kept, v_kept, kept_upto,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        n, num_kv_heads, chunk, n_chunks, tiles,
        HEAD_DIM=head_dim, BLOCK_S=block_s, COUNT_BLOCK=COUNT_BLOCK,
    )
    return k_kept, v_kept, kept_upto


def prefill_grid(n: int, rows: int, group_p2: int):
    """The attention kernel's grid for a config (``meta``): one program per (row, query block), all on
    axis 0. CUDA's axes 1 and 2 stop at 65535, which ``B * Hkv`` passes (a [blocks, rows] grid failed
    with "invalid argument"); axis 0 goes to 2**31 - 1, which would take a q of terabytes to pass."""

    def grid(meta):
        return (cdiv(n, meta["ROWS"] // group_p2) * rows,)

    return grid


def launch_prefill_kernel(
    q, k, v, k_kept, v_kept, kept_upto, decisions, out, lse, window: int, scale: float, return_lse: bool,
    config: dict | None = None,
) -> None:
    """One launch of the attention kernel on ``dms_prep``'s output, writing ``out`` (and ``lse``).

    ``k_kept=None``: no compacted prefix; every key is read from k/v under the element-wise rule
    (``v_kept`` and ``kept_upto`` are then ignored). ``config`` (``ROWS``, ``BLOCK_N``, ``num_warps``,
    ``num_stages``) bypasses the autotuner: the config sweep of ``benchmarks/tune_prefill.py``.
    """
    compact = k_kept is not None
    if not compact:  # never read: any tensor will do for the pointers
        k_kept, v_kept, kept_upto = k, v, decisions
    batch, num_q_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)

    kernel = _dms_prefill_kernel if config is None else _dms_prefill_kernel.fn
    kernel[prefill_grid(n, batch * num_kv_heads, group_p2)](
        q, k, v, k_kept, v_kept, kept_upto, decisions.view(torch.uint8),
        out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, triton.next_power_of_2(n), num_kv_heads, window, scale * LOG2E,
        HEAD_DIM=head_dim, GROUP=group, GROUP_P2=group_p2,
        RETURN_LSE=return_lse, COMPACT=compact,
        DOT_PRECISION=attention_dot_precision(q.dtype),
        **(config or {}),
    )


def triton_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decisions: torch.Tensor,
    window: int,
    scale: float,
    return_lse: bool,
):
    """Launch the fused kernel on already-validated inputs (see ``dms_prefill_attention``).

    q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` (last dim contiguous), decisions bool ``[B, Hkv, N]``.
    Returns ``out`` like q, and ``lse`` fp32 ``[B, Hq, N]`` (natural log) or None.
    """
    batch, num_q_heads, n, _ = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    decisions = decisions.contiguous()
    # Segments of capacity N per (b, h), not the exact kept counts: knowing those would take a host
    # sync, which left the GPU idle while the rest of the call launched (benchmarks/NOTES.md).
    k_kept, v_kept, kept_upto = dms_prep(k, v, decisions)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, n), dtype=torch.float32, device=q.device) if return_lse else out
    launch_prefill_kernel(q, k, v, k_kept, v_kept, kept_upto, decisions, out, lse, window, scale, return_lse)
    return out, (lse if return_lse else None)


