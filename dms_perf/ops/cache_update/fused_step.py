"""A Qwen3-DMS decode step's work between the q/k/v projection and decode attention, in one launch.

From the fused projection's output row ``qkv`` ``[B, (Hq + 2 Hkv) * D]`` of each sequence, program
``(b, h)`` (one per KV head) does for its KV head and the ``G`` query heads of its group:

1. the q and k RMSNorms over ``D`` (fp32 statistics, normalized value cast to the model dtype, then
   times the weight, as transformers' ``Qwen3RMSNorm``);
2. the DMS decision from the normalized, un-rotated borrowed channel (channel ``D - 1`` of the group's
   first query head; ``a * alpha_scale > alpha_offset``), and, unless ``zero_borrowed`` is off, that
   channel set to 0 before and after RoPE (docs/DMS.md, "Decisions");
3. RoPE (``x * cos + rotate_half(x) * sin``) of q and k, from the model's ``cos`` / ``sin`` ``[B, D]``;
4. the cache update of ``dms_perf.ops.cache_update.kernel`` (ring, slot reuse, K/V rows written to a
   contiguous segment or through a block table);

and writes the rotated query ``[B, Hq, D]`` for decode attention. In the unfused step these are about
eight launches per layer (two norms, the channel copy and zeroing, RoPE, the update), each costing
more than its bytes on a step of an 8B model (benchmarks/NOTES.md, "Session of 2026-12-01 (2)").

``fused_step_reference`` (``naive.py``) is the readable fp64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf.ops.cache_update.kernel import cache_addressing, cache_row, ring_step, store_row


@triton.jit
def _fused_step_kernel(
    QKV, stride_xb, QOUT, stride_ob, stride_oh, QW, KW, COS, SIN, stride_cb,
    KC, VC, stride_kcn, stride_vcn,
    STARTS, TABLE, stride_tb, stride_th, stride_tp, max_pages, LENGTHS, RING_SLOT, RING_FLAG, STEP,
    num_kv_heads, w1, alpha_scale, alpha_offset, eps,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, ZERO_BORROWED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    r = tl.program_id(0)
    b = (r // num_kv_heads).to(tl.int64)
    h = (r % num_kv_heads).to(tl.int64)
    dtype = QOUT.dtype.element_ty
    offs = tl.arange(0, HALF)
    row = QKV + b * stride_xb
    num_q_heads = num_kv_heads * G

    cos1 = tl.load(COS + b * stride_cb + offs).to(tl.float32)
    cos2 = tl.load(COS + b * stride_cb + HALF + offs).to(tl.float32)
    sin1 = tl.load(SIN + b * stride_cb + offs).to(tl.float32)
    sin2 = tl.load(SIN + b * stride_cb + HALF + offs).to(tl.float32)

    # K: norm, RoPE.
    k_row = row + (num_q_heads + h) * D
    k1 = tl.load(k_row + offs).to(tl.float32)
    k2 = tl.load(k_row + HALF + offs).to(tl.float32)
    k_rstd = 1.0 / tl.sqrt((tl.sum(k1 * k1, 0) + tl.sum(k2 * k2, 0)) / D + eps)
    k1 = ((k1 * k_rstd).to(dtype) * tl.load(KW + offs)).to(tl.float32)
    k2 = ((k2 * k_rstd).to(dtype) * tl.load(KW + HALF + offs)).to(tl.float32)
    k_rot1 = (k1 * cos1 - k2 * sin1).to(dtype)
    k_rot2 = (k2 * cos2 + k1 * sin2).to(dtype)

    # Q: the group's G heads as a [G_PAD, HALF] tile per half.
    g = tl.arange(0, G_PAD)
    g_mask = g < G
    q_rows = row + (h * G + g).to(tl.int64)[:, None] * D
    q1 = tl.load(q_rows + offs[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + offs[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q_rstd = 1.0 / tl.sqrt((tl.sum(q1 * q1, 1) + tl.sum(q2 * q2, 1)) / D + eps)
    q1 = ((q1 * q_rstd[:, None]).to(dtype) * tl.load(QW + offs)[None, :]).to(tl.float32)
    q2 = ((q2 * q_rstd[:, None]).to(dtype) * tl.load(QW + HALF + offs)[None, :]).to(tl.float32)
    borrowed = (g == 0)[:, None] & (offs == HALF - 1)[None, :]  # channel D - 1 of the group's first head
    a = tl.sum(tl.sum(tl.where(borrowed, q2, 0.0), 1), 0)
    # A comparison, not `a * scale - offset > 0`: the compiler may fuse that into one rounding.
    marked = a * alpha_scale > alpha_offset
    if ZERO_BORROWED:
        q2 = tl.where(borrowed, 0.0, q2)
    q_rot1 = q1 * cos1[None, :] - q2 * sin1[None, :]
    q_rot2 = q2 * cos2[None, :] + q1 * sin2[None, :]
    if ZERO_BORROWED:
        q_rot2 = tl.where(borrowed, 0.0, q_rot2)
    out_rows = QOUT + b * stride_ob + (h * G + g).to(tl.int64)[:, None] * stride_oh
    tl.store(out_rows + offs[None, :], q_rot1.to(dtype), mask=g_mask[:, None])
    tl.store(out_rows + HALF + offs[None, :], q_rot2.to(dtype), mask=g_mask[:, None])

    # The cache update (dms_perf.ops.cache_update.kernel.ring_step): STEP[r] is the new token's index.
    slot = ring_step(r, marked, STEP, LENGTHS, RING_SLOT, RING_FLAG, w1)
    dest = cache_row(r, b, h, slot, STARTS, TABLE, stride_tb, stride_th, stride_tp, max_pages, PAGED, PAGE_ROWS)
    store_row(KC, dest, stride_kcn, offs, k_rot1, PAGED)
    store_row(KC, dest, stride_kcn, HALF + offs, k_rot2, PAGED)
    d = tl.arange(0, D)
    v_row = row + (num_q_heads + num_kv_heads + h) * D
    store_row(VC, dest, stride_vcn, d, tl.load(v_row + d), PAGED)


def fused_decode_step(
    qkv, q_norm_weight, k_norm_weight, eps: float, cos, sin,
    ring_slot, ring_flag, lengths, starts, k_cache, v_cache, step: torch.Tensor,
    alpha_scale: float, alpha_offset: float, *, zero_borrowed: bool = True,
    block_table: torch.Tensor | None = None, page_rows: int | None = None,
) -> torch.Tensor:
    """One decode token per sequence: returns the rotated query ``[B, Hq, D]`` and updates the cache.

    ``qkv``: ``[B, (Hq + 2 Hkv) * D]`` (or ``[B, 1, ...]``), the fused q/k/v projection of the new
    tokens, rows contiguous; ``q_norm_weight`` / ``k_norm_weight``: ``[D]``; ``cos`` / ``sin``: ``[B, D]``
    (or ``[B, 1, D]``; a batch of 1 serves every sequence) of the new positions, from the model's rotary
    embedding. The cache arguments are those of ``decode_update`` (``DMSCacheLayer``'s ring, lengths,
    starts, K/V buffers and step counter), paged addressing included: ``block_table`` and ``page_rows``
    with ``starts=None``, a ``NO_PAGE`` slot not stored. One Triton launch, no host synchronization,
    every argument fixed for the cache's life but the data: the launch can be captured in a CUDA graph.
    """
    batch, num_kv_heads, w1 = ring_slot.shape
    head_dim = k_cache.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(f"fused_decode_step needs a power-of-two head_dim, got {head_dim}")
    qkv = qkv.reshape(batch, -1)
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    heads = qkv.shape[1] // head_dim
    num_q_heads = heads - 2 * num_kv_heads
    if qkv.shape[1] % head_dim or num_q_heads < num_kv_heads or num_q_heads % num_kv_heads:
        raise ValueError(
            f"qkv [B, (Hq + 2 Hkv) * D] with Hkv={num_kv_heads}, D={head_dim} expected, got {tuple(qkv.shape)}"
        )
    for name, x in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"fused_decode_step needs {name} with stride 1 along its last dim")
    if cos.shape[0] not in (1, batch) or cos.shape[1] != head_dim or sin.shape != cos.shape or \
            cos.stride() != sin.stride():
        raise ValueError(
            f"cos and sin must be [B, D] or [1, D] (one position for all), B={batch}, D={head_dim}; got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    cos_stride = cos.stride(0) if cos.shape[0] == batch else 0
    if q_norm_weight.shape != (head_dim,) or k_norm_weight.shape != (head_dim,):
        raise ValueError(f"norm weights must be [{head_dim}]")
    if step.dtype != torch.int64 or step.shape != (batch * num_kv_heads,):
        rows = batch * num_kv_heads
        raise TypeError(f"step must be int64 [B * Hkv] = [{rows}], got {step.dtype} {tuple(step.shape)}")
    addressing, paging = cache_addressing("fused_decode_step", starts, block_table, page_rows, batch,
                                          num_kv_heads, k_cache, v_cache)
    group = num_q_heads // num_kv_heads
    q = torch.empty((batch, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _fused_step_kernel[(batch * num_kv_heads,)](
        qkv, qkv.stride(0), q, q.stride(0), q.stride(1), q_norm_weight, k_norm_weight, cos, sin, cos_stride,
        k_cache, v_cache, k_cache.stride(0), v_cache.stride(0),
        *addressing, lengths, ring_slot, ring_flag.view(torch.uint8), step,
        num_kv_heads, w1, float(alpha_scale), float(alpha_offset), float(eps),
        G=group, G_PAD=max(2, triton.next_power_of_2(group)), D=head_dim, ZERO_BORROWED=zero_borrowed,
        **paging, num_warps=4,
    )
    return q
