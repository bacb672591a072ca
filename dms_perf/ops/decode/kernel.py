"""Decode attention over the compacted DMS KV cache (one query token per sequence).

The cache (``dms_perf.model.cache``, docs/DMS.md "Cache and decode") holds, per (batch, KV head), the
kept tokens plus the last ``window + 1`` tokens in one segment of a flat ``[S, D]`` buffer: head
``(b, h)`` occupies rows ``starts[b, h] .. starts[b, h] + lengths[b, h] - 1`` (its segment may have
spare rows after that). Slot order is irrelevant because RoPE is applied before caching. Every occupied
slot is visible to the new query (the cache update already dropped the evicted tokens), so decode
attention is plain softmax attention over each head's occupied rows.

Kernel layout: one program per (batch, KV head, split). The ``G`` query heads of a KV head are
processed together (one K/V read serves all of them) and the key range is split across programs so
that a long cache still fills the GPU; a second small kernel merges the splits by log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dms_perf._runtime import HAS_CUDA
from dms_perf.ops._common import attention_dot_precision, check_grid_rows, sm_count

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch geometry, read at every call: programs per SM the splits aim for, keys per block, warps per
# split program (benchmarks/NOTES.md, "Session of 2026-12-01 (2)", has the sweep).
PROGRAMS_PER_SM = 2
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_kn, stride_vn,
    num_kv_heads, num_splits, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = pid_bh % num_kv_heads

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G

    q_rows = q_ptr + b * stride_qb + (h * G + offs_g).to(tl.int64)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=g_mask[:, None], other=0.0)

    # Each head's own length is cut into num_splits splits of whole key blocks: the work of a head is
    # spread over all its programs whatever its length, and no host-known length enters the launch
    # but the number of splits (so a captured launch stays right as the heads grow).
    length = tl.load(len_ptr + pid_bh)
    split_size = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_size
    end = tl.minimum(start + split_size, length)

    first = tl.load(start_ptr + pid_bh).to(tl.int64)
    k_base = k_ptr + first * stride_kn
    v_base = v_ptr + first * stride_vn
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k = tl.load(k_base + n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (start >= length) reports out = 0, lse = -inf and contributes nothing to the merge.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    row = (pid_bh.to(tl.int64) * G_PAD + offs_g) * num_splits + pid_s
    tl.store(part_out_ptr + row[:, None] * D + offs_d[None, :], out)
    tl.store(part_lse_ptr + row, lse2)


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


def _check_inputs(q, k_cache, v_cache, starts, lengths, max_length):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32)")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32:
        raise TypeError(f"lengths must be an int32 tensor, got {getattr(lengths, 'dtype', type(lengths))}")
    if not isinstance(starts, torch.Tensor) or starts.dtype != torch.int64:
        raise TypeError(f"starts must be an int64 tensor, got {getattr(starts, 'dtype', type(starts))}")
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
    if starts.dim() != 2 or starts.shape[0] != B or Hq % starts.shape[1] != 0:
        raise ValueError(f"starts must be [B, Hkv] with Hq={Hq} a multiple of Hkv; got {tuple(starts.shape)}")
    if lengths.shape != starts.shape:
        raise ValueError(f"lengths must be [B, Hkv] = {tuple(starts.shape)}, got {tuple(lengths.shape)}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int (the expected longest head), got {max_length!r}")
    devices = {q.device, k_cache.device, v_cache.device, starts.device, lengths.device}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


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
    starts: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over the compacted DMS cache (Triton).

    Args:
        q: ``[B, Hq, D]`` query of the new token (RoPE applied, borrowed channel zeroed).
        k_cache, v_cache: ``[S, D]``, same dtype as ``q``, stride 1 along ``D``: all heads' segments.
        starts: ``[B, Hkv]`` int64, first row of each head's segment.
        lengths: ``[B, Hkv]`` int32, occupied rows per head (``>= 0``); rows past them are never read.
        max_length: a host-known estimate of the longest head, ``>= 1``. It only caps the number of
            splits over the key length (never more than its key blocks), never the result: each head's
            own length is cut into the splits on the device, also past ``max_length``. An upper bound of
            ``lengths`` (the cache's ``longest_bound``, or a power of two above it) is the fast choice.
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: programs per (batch, KV head) along the key length, ``<= 65535`` (a grid axis);
            default from the SM count.
    Returns:
        ``[B, Hq, D]`` in ``q.dtype``; query head ``h * G + g`` attends to KV head ``h``
        (G = Hq / Hkv), over exactly the occupied rows (docs/DMS.md, "Cache and decode"). A head of
        length 0 has nothing to attend to: its query heads' outputs are zeros.
    Reads ``starts`` and ``lengths`` on the device only: no host synchronization.
    """
    _check_inputs(q, k_cache, v_cache, starts, lengths, max_length)
    B, Hq, D = q.shape
    Hkv = starts.shape[1]
    G = Hq // Hkv
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need stride 1 along head_dim")
    scale = D**-0.5 if scale is None else float(scale)
    block_n = BLOCK_N if block_n is None else block_n
    if num_splits is None:
        num_splits = default_num_splits(B * Hkv, max_length, block_n)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    # The splits are the grid's second axis; its first, B * Hkv, may take up to 2**31 - 1.
    check_grid_rows("num_splits", num_splits)
    starts, lengths = starts.contiguous(), lengths.contiguous()
    g_pad = max(16, triton.next_power_of_2(G))
    part_out = torch.empty((B * Hkv * g_pad * num_splits, D), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B * Hkv * g_pad * num_splits,), device=q.device, dtype=torch.float32)
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, starts, lengths, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), v_cache.stride(0),
        Hkv, num_splits, scale * math.log2(math.e),
        G=G, G_PAD=g_pad, D=D, BLOCK_N=block_n, DOT_PRECISION=attention_dot_precision(q.dtype),
        num_warps=NUM_WARPS,
    )
    _decode_merge_kernel[(B * Hkv, G)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        Hkv, num_splits,
        G=G, G_PAD=g_pad, D=D, S_PAD=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    return out
