"""One decode step's DMS cache bookkeeping in one Triton launch (docs/DMS.md, "Cache and decode").

Per (batch, KV head) and new token t: t's decision (``a * alpha_scale - alpha_offset > 0``, ``a`` the
borrowed channel of the group's first query head before RoPE) marks token t-1; token t - window - 1
leaves the window and frees its slot if it was marked; token t takes that slot, or the next free row
of the head's segment; its K and V rows are written there (a contiguous segment from ``starts``, or
the head's pages through a block table: see ``decode_update``). The step also zeroes the borrowed channel of
the rotated query (RoPE moved channel D/2 - 1 into it), so that it takes no part in the scores.

``decode_update`` does in one launch, for the triton backend, what ``torch_ops.decode_update_torch``
does in about 15 small torch ops for the hub and flex backends: a decode step is bound by the host's
per-op cost (benchmarks/NOTES.md, "Decode host cost"), so ops per layer are what a step costs. Neither
reads anything back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf.ops._common import check_cache_addressing


@triton.jit
def ring_step(r, marked, STEP, LENGTHS, RING_SLOT, RING_FLAG, w1):
    """Head ``r``'s bookkeeping for its new token t = ``STEP[r]`` (advanced to t + 1): ``marked`` becomes
    the flag of token t - 1, the token leaving the window frees its slot if it was marked, and t takes
    that slot or the next free row. Returns t's logical slot (int64; ``cache_row`` finds where it lives).
    Shared by this file's kernel and ``fused_step.py``'s."""
    t = tl.load(STEP + r)
    tl.store(STEP + r, t + 1)
    prev = (t + w1 - 1) % w1
    leaving = t % w1
    ring = r.to(tl.int64) * w1
    tl.store(RING_FLAG + ring + prev, marked.to(tl.uint8))
    # window 0 (w1 = 1): the entry just written is the one leaving.
    reuse = tl.where(w1 == 1, marked, tl.load(RING_FLAG + ring + leaving) != 0)
    length = tl.load(LENGTHS + r)
    slot = tl.where(reuse, tl.load(RING_SLOT + ring + leaving), length.to(tl.int64))
    tl.store(LENGTHS + r, length + tl.where(reuse, 0, 1).to(tl.int32))
    tl.store(RING_SLOT + ring + leaving, slot)
    tl.store(RING_FLAG + ring + leaving, 0)
    return slot


@triton.jit
def cache_row(r, b, h, slot, STARTS, TABLE, stride_tb, stride_th, stride_tp, max_pages,
              PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr):
    """The K/V buffer row of head ``r`` = (``b``, ``h``)'s logical ``slot``: ``STARTS[r] + slot``
    (contiguous), or row ``slot % PAGE_ROWS`` of page ``TABLE[b, h, slot // PAGE_ROWS]`` (paged), -1
    where that entry is ``NO_PAGE`` or outside the table (the row is then not stored: a dead sequence's
    ring may hold any slot)."""
    if PAGED:
        index = slot // PAGE_ROWS
        inside = (slot >= 0) & (index < max_pages)
        page = tl.load(TABLE + b * stride_tb + h * stride_th + index * stride_tp, mask=inside, other=-1)
        row = tl.where(page >= 0, page.to(tl.int64) * PAGE_ROWS + slot % PAGE_ROWS, -1)
    else:
        row = tl.load(STARTS + r) + slot
    return row


@triton.jit
def store_row(CACHE, row, stride, cols, values, PAGED: tl.constexpr):
    """``CACHE[row, cols] = values``; paged, nothing where ``row`` is -1 (a ``NO_PAGE`` slot)."""
    if PAGED:
        # The row spread over the columns before the test: the CPU interpreter mistypes a scalar's mask.
        tl.store(CACHE + row * stride + cols, values, mask=(cols * 0 + row) >= 0)
    else:
        tl.store(CACHE + row * stride + cols, values)


@triton.jit
def _decode_update_kernel(
    ALPHA, stride_ab, stride_ah,
    Q, stride_qb, stride_qh,
    K, stride_kb, stride_kh, V, stride_vb, stride_vh,
    KC, VC, stride_kcn, stride_vcn,
    STARTS, TABLE, stride_tb, stride_th, stride_tp, max_pages, LENGTHS, RING_SLOT, RING_FLAG, STEP,
    num_kv_heads, group, w1, alpha_scale, alpha_offset,
    D: tl.constexpr, ZERO_BORROWED: tl.constexpr, PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
):
    """Program r = b * Hkv + h performs the step of head (b, h); ``STEP[r]`` holds the index t of the
    new token and is advanced to t + 1 (a device counter: a CUDA graph replays this launch unchanged)."""
    r = tl.program_id(0)
    b = (r // num_kv_heads).to(tl.int64)
    h = (r % num_kv_heads).to(tl.int64)
    a = tl.load(ALPHA + b * stride_ab + h * stride_ah).to(tl.float32)
    # Written as a comparison, not a subtraction: the compiler may fuse `a * scale - offset` into one
    # multiply-add, which rounds differently from torch's two steps (x - y > 0 iff x > y when rounded).
    marked = a * alpha_scale > alpha_offset
    if ZERO_BORROWED:
        q_borrowed = Q + b * stride_qb + (h * group) * stride_qh + (D - 1)
        tl.store(q_borrowed, 0.0)

    slot = ring_step(r, marked, STEP, LENGTHS, RING_SLOT, RING_FLAG, w1)
    row = cache_row(r, b, h, slot, STARTS, TABLE, stride_tb, stride_th, stride_tp, max_pages, PAGED, PAGE_ROWS)
    d = tl.arange(0, D)
    store_row(KC, row, stride_kcn, d, tl.load(K + b * stride_kb + h * stride_kh + d), PAGED)
    store_row(VC, row, stride_vcn, d, tl.load(V + b * stride_vb + h * stride_vh + d), PAGED)


def cache_addressing(op: str, starts, block_table, page_rows, batch: int, num_kv_heads: int, k_cache, v_cache):
    """The update kernels' addressing arguments ``(STARTS, TABLE, stride_tb, stride_th, stride_tp,
    max_pages)`` and constexprs ``{PAGED, PAGE_ROWS}`` after ``check_cache_addressing``; the layout not in
    use gets stand-ins the kernel never reads."""
    check_cache_addressing(op, starts, block_table, page_rows, (batch, num_kv_heads), k_cache.shape[0],
                           k_cache.device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have one shape, got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if block_table is None:
        if not starts.is_contiguous():
            raise ValueError(f"{op}: starts must be contiguous, got strides {starts.stride()}")
        return (starts, starts, 0, 0, 0, 0), {"PAGED": False, "PAGE_ROWS": 1}
    return (block_table, block_table, *block_table.stride(), block_table.shape[2]), {"PAGED": True,
                                                                                       "PAGE_ROWS": page_rows}


def decode_update(
    ring_slot, ring_flag, lengths, starts, k_cache, v_cache, keys, values, alphas, q,
    step: torch.Tensor, window: int, alpha_scale: float, alpha_offset: float, *, zero_borrowed: bool = True,
    block_table: torch.Tensor | None = None, page_rows: int | None = None,
) -> None:
    """``torch_ops.decode_update_torch`` with the decisions computed from ``alphas`` (fp32 ``[B, Hkv, 1]`` or a
    view of that shape) in the same launch, which also zeroes ``q[:, h * G, 0, D - 1]`` of the rotated
    query ``q`` ``[B, Hq, 1, D]`` in place (``zero_borrowed=False``: leaves q as it is, for a model
    decoding a non-DMS cache with eviction off). One Triton launch, no host synchronization.

    ``step``: int64 ``[B * Hkv]`` on the device, the index t of the new token per head (the torch step's
    ``t``); the launch advances it by one. Every argument is a device tensor or fixed for the cache's
    life, so the launch can be captured in a CUDA graph and replayed step after step.

    The K/V rows live as in ``dms_decode_attention``: ``starts`` ``[B, Hkv]`` int64 (contiguous
    segments), or ``block_table`` ``[B, Hkv, max_pages]`` int32 with ``page_rows`` (a power of two) and
    ``starts=None`` (pages; ``k_cache`` / ``v_cache`` are the pages viewed as ``[num_pages * page_rows,
    D]``). Exactly one of ``starts`` and ``block_table`` is given. The ring keeps logical slots either way;
    only where the slot's row lives differs. A slot whose table entry is ``NO_PAGE`` (-1), or past the
    table, is not stored (a dead sequence with no pages writes nothing), while its ring and length
    bookkeeping still runs.

    Inputs come from the DMS cache and attention (``dms_perf.dms``), which own their shapes: only the
    layout assumptions are checked (last dim contiguous, D a power of two, matching devices, the
    addressing's dtypes and shapes).
    """
    batch, num_kv_heads, w1 = ring_slot.shape
    head_dim = k_cache.shape[1]
    group = q.shape[1] // num_kv_heads
    if head_dim & (head_dim - 1):
        raise ValueError(f"decode_update needs a power-of-two head_dim, got {head_dim}")
    for name, x in (("q", q), ("keys", keys), ("values", values), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"decode_update needs {name} with stride 1 along head_dim, got strides {x.stride()}")
    expected = (batch, num_kv_heads, 1, head_dim)
    if keys.shape != expected or values.shape != expected or q.shape[2:] != (1, head_dim):
        raise ValueError(
            f"expected one new token per (batch, KV head), keys = values {expected} and q [B, Hq, 1, "
            f"{head_dim}]; got keys {tuple(keys.shape)}, values {tuple(values.shape)}, q {tuple(q.shape)}"
        )
    if alphas.dtype != torch.float32 or alphas.shape[:2] != (batch, num_kv_heads):
        raise TypeError(f"alphas must be fp32 [B, Hkv, 1] = {expected[:2]}, got {alphas.dtype} {tuple(alphas.shape)}")
    if step.dtype != torch.int64 or step.shape != (batch * num_kv_heads,):
        rows = batch * num_kv_heads
        raise TypeError(f"step must be int64 [B * Hkv] = [{rows}], got {step.dtype} {tuple(step.shape)}")
    devices = {x.device for x in (ring_slot, k_cache, keys, values, alphas, q, step)}
    if len(devices) != 1:
        raise ValueError(f"decode_update: all tensors must be on one device, got {sorted(map(str, devices))}")
    addressing, paging = cache_addressing("decode_update", starts, block_table, page_rows, batch, num_kv_heads,
                                          k_cache, v_cache)
    _decode_update_kernel[(batch * num_kv_heads,)](
        alphas, alphas.stride(0), alphas.stride(1),
        q, q.stride(0), q.stride(1),
        keys, keys.stride(0), keys.stride(1), values, values.stride(0), values.stride(1),
        k_cache, v_cache, k_cache.stride(0), v_cache.stride(0),
        *addressing, lengths, ring_slot, ring_flag.view(torch.uint8), step,
        num_kv_heads, group, w1, float(alpha_scale), float(alpha_offset),
        D=head_dim, ZERO_BORROWED=zero_borrowed, **paging,
    )
