"""Fused DMS prefill attention in Triton (issue 3; the rule is shared/DMS.md, "Who is visible").

The readable reference is the ``"math"`` implementation, ``dms_perf.dms.prefill.math_attention``;
the public entry point is ``dms_perf.dms_prefill_attention(..., impl="triton")``, which validates its
inputs and calls ``triton_prefill_attention`` here.

Why it does less work than dense causal attention: a program owns query positions
``[m0, m0 + BLOCK_M)`` of all G query heads of one KV head (stacked as ``ROWS = G * BLOCK_M`` rows, so
every K/V tile is loaded once for the whole group). Every key at position ``j < m0 - window`` is more
than ``window`` behind all of those queries, so it is visible to all of them iff it is kept: those keys
are read from a compacted copy of the kept keys, with no mask at all. Only the band
``[m0 - window, m0 + BLOCK_M)`` of the original K/V needs the element-wise rule. The two loops are
disjoint by position and share one online softmax (exp2, fp32 accumulation), so no N x N mask or score
matrix ever exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf._runtime import INTERPRET
from dms_perf.dms.rule import evict_flags
from dms_perf.kernels.compact import compact_by_bool

LOG2E = 1.4426950408889634
# Running max before any key: finite, so that rows whose first tiles are all masked give
# exp2(-inf - NEG_BIG) = 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


def _configs():
    if INTERPRET:
        # The interpreter's cost is per operation, not per element: few, small tiles.
        return [triton.Config({"ROWS": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        # The autotuner's picks at the Qwen3-8B shape on an H100 (benchmarks/NOTES.md).
        triton.Config({"ROWS": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"ROWS": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"ROWS": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


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
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _band_tiles(
    acc, m_i, l_i, q, k_base, v_base, keep_base, pos, cols, d, lo, hi, band_hi, window,
    stride_kn, stride_vn, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Band tiles starting in [lo, hi) over the original K/V; ``MASKED`` applies the DMS rule
    (shared/DMS.md: ``j <= i`` and (``i - j <= window`` or key j kept)) and ``j < band_hi``."""
    for start in range(lo, hi, BLOCK_N):
        j = start + cols
        col_ok = j < band_hi
        visible = col_ok[None, :]
        if MASKED:
            kept = tl.load(keep_base + j, mask=col_ok, other=0) != 0
            dist = pos[:, None] - j[None, :]
            visible = (dist >= 0) & ((dist <= window) | kept[None, :]) & col_ok[None, :]
        k_ptrs = k_base + j.to(tl.int64)[:, None] * stride_kn + d[None, :]
        v_ptrs = v_base + j.to(tl.int64)[:, None] * stride_vn + d[None, :]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, col_ok, visible,
                                     qk_scale, MASKED, DOT_PRECISION)
    return acc, m_i, l_i


# Keyed on N rounded up to a power of two: a new prompt length reuses its bucket's config instead of
# re-running the autotuner (host syncs, hundreds of ms) inside a model's prefill.
@triton.autotune(configs=_configs(), key=["N_BUCKET", "HEAD_DIM", "GROUP"])
@triton.jit
def _dms_prefill_kernel(
    Q, K, V, KC, VC, SEG, KEPT_UPTO, KEEP, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    N, N_BUCKET, num_kv_heads, window, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS // GROUP_P2
    # Latest query blocks have the most keys: launch them first for a better tail.
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    m_block = num_m_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)  # b * Hkv + kv head
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

    # Loop 1: kept keys at positions < m0 - window, compacted; visible to every row, no mask.
    band_lo = tl.maximum(m0 - window, 0)
    seg_start = tl.load(SEG + bh).to(tl.int64)
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

    # Loop 2: every key in [band_lo, m0 + BLOCK_M) from the original K/V, under the DMS rule. Tiles
    # starting at or after m0 + BLOCK_M - 1 - window are in every row's window, and tiles ending at
    # or before m0 are causal for every row: those run unmasked, the head and tail tiles masked.
    band_hi = tl.minimum(m0 + BLOCK_M, N)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    keep_base = KEEP + bh.to(tl.int64) * N
    in_all_windows = m0 + BLOCK_M - 1 - window
    mid_lo = band_lo + tl.cdiv(tl.maximum(in_all_windows - band_lo, 0), BLOCK_N) * BLOCK_N
    mid_hi = mid_lo + (tl.maximum(tl.minimum(m0 + 1, band_hi) - mid_lo, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, keep_base, pos, cols, d,
                                band_lo, tl.minimum(mid_lo, band_hi), band_hi, window,
                                stride_kn, stride_vn, qk_scale, BLOCK_N, True, DOT_PRECISION)
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, keep_base, pos, cols, d,
                                mid_lo, mid_hi, band_hi, window,
                                stride_kn, stride_vn, qk_scale, BLOCK_N, False, DOT_PRECISION)
    acc, m_i, l_i = _band_tiles(acc, m_i, l_i, q, k_base, v_base, keep_base, pos, cols, d,
                                mid_hi, band_hi, band_hi, window,
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
    batch, num_q_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    keep = ~evict_flags(decisions.contiguous())  # compact_by_bool needs a contiguous mask
    kept_upto = torch.cumsum(keep, dim=-1, dtype=torch.int32)
    # Capacity, not the exact kept count: knowing that would take a host sync, which left the GPU idle
    # while the rest of the call launched (about 0.5 ms measured at 4K on an H100, benchmarks/NOTES.md).
    # The rows past the kept count stay unwritten and the kernel reads only within ``segments``.
    capacity = keep.numel()
    k_kept, segments, _ = compact_by_bool(k, keep, total=capacity)
    v_kept, _, _ = compact_by_bool(v, keep, total=capacity)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, n), dtype=torch.float32, device=q.device) if return_lse else out
    group_p2 = triton.next_power_of_2(group)

    def grid(meta):
        return (triton.cdiv(n, meta["ROWS"] // group_p2), batch * num_kv_heads)

    _dms_prefill_kernel[grid](
        q, k, v, k_kept, v_kept, segments, kept_upto, keep.view(torch.uint8),
        out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, triton.next_power_of_2(n), num_kv_heads, window, scale * LOG2E,
        HEAD_DIM=head_dim, GROUP=group, GROUP_P2=group_p2,
        RETURN_LSE=return_lse,
        # fp32 inputs: three tf32 products per dot (near-fp32 accuracy, still on the tensor cores).
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
    )
    return out, (lse if return_lse else None)


