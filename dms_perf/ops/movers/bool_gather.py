"""Boolean gather with left padding: each (b, h)'s selected rows, in order, right-aligned in ``[B, H, L, D]``.

This is the hub prefill's per-head selection of kept tokens (docs/DMS.md, "The hub algorithm" and
"Cache and decode": lengths differ between heads, so rows are left-padded to the longest one).
Baselines (the released code's per-(b, h) boolean indexing, and a vectorized one): ``baseline.py``.

Launches: a program moves the selected rows of one chunk of one (b, h) row. Rows are right-aligned, so
where a chunk's rows land depends only on how many rows are selected from the chunk on. With
``max_length`` given and ``S <= ONE_LAUNCH_MAX_COUNT``, each program counts that itself from the mask
(at most S bytes, 1 byte a token, from L2): one launch, no dependency between launches. Otherwise a
count kernel first writes per-chunk counts that the move kernel sums: without ``max_length`` they also
size the output, and for long rows every program re-reading its row would cost more than the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf.ops._common import (
    COUNT_BLOCK,
    MASK_SCAN_BLOCK,
    ONE_LAUNCH_MAX_COUNT,
    as_bits,
    check_data,
    check_device_usable,
    check_grid_rows,
    check_mask,
    check_size_argument,
    count_chunks,
    count_true,
    masked_geometry,
    next_power_of_2,
    tile_mask,
)


@triton.jit
def _bool_gather_kernel(
    x_ptr, mask_ptr, chunk_counts_ptr, y_ptr, lengths_ptr,
    H, S, L, stride_xb, stride_xh, stride_xs, CHUNK, n_chunks, tiles,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    COUNTED: tl.constexpr, COUNT_BLOCK: tl.constexpr, MASK_SCAN_BLOCK: tl.constexpr,
):
    """Program (c, r) moves the selected rows of chunk c of row r = b*H + h, and zero-fills the padding
    positions ``[c*CHUNK, (c+1)*CHUNK) ∩ [0, L - count)`` of that row (the last chunk: all beyond).
    ``COUNTED``: the row's counts come from the per-chunk counts, else from the mask itself."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    start = c * CHUNK
    mask_row = mask_ptr + r.to(tl.int64) * S
    # before / from_here: selected rows of this row before chunk c / from chunk c on.
    if COUNTED:
        before = 0
        from_here = 0
        for off in range(0, n_chunks, COUNT_BLOCK):
            j = off + tl.arange(0, COUNT_BLOCK)
            chunk_counts = tl.load(chunk_counts_ptr + r * n_chunks + j, mask=j < n_chunks, other=0)
            before += tl.sum(tl.where(j < c, chunk_counts, 0), axis=0)
            from_here += tl.sum(tl.where(j >= c, chunk_counts, 0), axis=0)
    else:
        from_here = count_true(mask_row, start, S, MASK_SCAN_BLOCK)
        # Padding ends at or before L - from_here: a chunk starting there zeroes none and skips `before`
        # (its pad then reads L - from_here <= start, still nothing to zero; chunk 0 has before = 0).
        before = 0
        if start < L - from_here:
            before = count_true(mask_row, 0, start, MASK_SCAN_BLOCK)
    count = before + from_here
    if c == 0:
        tl.store(lengths_ptr + r, count)
    pad = L - count
    d = tl.arange(0, BLOCK_D)
    y_row = y_ptr + r.to(tl.int64) * L * D
    zero_end = tl.minimum(start + CHUNK, pad)
    if c == n_chunks - 1:
        zero_end = pad
    zeros = tl.zeros((BLOCK_S, BLOCK_D), dtype=y_ptr.dtype.element_ty)
    for p0 in range(start, zero_end, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        tl.store(y_row + p[:, None].to(tl.int64) * D + d[None, :], zeros, mask=tile_mask(p < zero_end, D, BLOCK_D))
    b = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    x_row = x_ptr + b * stride_xb + h * stride_xh
    # Position (in y) of the next selected row; rows that fall before 0 (L too small) are dropped.
    next_dest = L - from_here
    s = start + tl.arange(0, BLOCK_S)
    mask_tile = tl.load(mask_row + s, mask=s < S, other=0)
    for _ in range(0, tiles):
        # The next tile's mask is requested before this tile's rows: its latency hides behind theirs.
        s_next = s + BLOCK_S
        mask_next = tl.load(mask_row + s_next, mask=s_next < S, other=0)
        selected = mask_tile.to(tl.int32)
        dest = next_dest + tl.cumsum(selected, axis=0) - 1
        move = (selected != 0) & (dest >= 0)
        vals = tl.load(x_row + s[:, None].to(tl.int64) * stride_xs + d[None, :], mask=tile_mask(move, D, BLOCK_D))
        tl.store(y_row + dest[:, None].to(tl.int64) * D + d[None, :], vals, mask=tile_mask(move, D, BLOCK_D))
        next_dest += tl.sum(selected, axis=0)
        s = s_next
        mask_tile = mask_next


def bool_gather_left_pad(
    x: torch.Tensor, mask: torch.Tensor, *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each (b, h)'s selected rows in order and right-align them (left padding with zeros).

    Args:
        x: ``[B, H, S, D]``, any 1/2/4/8-byte dtype (fp32, fp16, bf16, ...), contiguous in the last
            dim (other strides are free, e.g. a transposed ``[B, S, H, D]`` projection).
        mask: ``[B, H, S]`` contiguous bool on x's device; True selects the row.
        max_length: the output length L. Default: ``mask.sum(-1).max()``, which costs one host
            synchronization. Passing it makes the call asynchronous; it should be at least the
            largest count (a larger L just pads more; with a smaller one each row's earliest
            selected rows are dropped).

    Returns:
        ``(y, lengths)``: ``y [B, H, L, D]`` with ``y[b, h, L - n:] = x[b, h][mask[b, h]]`` and zeros
        before, ``lengths [B, H]`` int32 with ``n = mask[b, h].sum()``. One Triton launch when
        ``max_length`` is given and ``S <= ONE_LAUNCH_MAX_COUNT``, else two (per-chunk mask counts,
        then the move); no host sync when ``max_length`` is given.
    """
    check_data("x", x, ndim=4)
    batch, heads, seq_len, dim = x.shape
    check_mask("mask", mask, (batch, heads, seq_len), "x", x)
    check_device_usable("x", x)
    if max_length is not None:
        check_size_argument("max_length", max_length)
    rows = batch * heads
    check_grid_rows("B*H", rows)
    if rows == 0 or seq_len == 0:
        length = 0 if max_length is None else max_length
        return (
            torch.zeros((batch, heads, length, dim), dtype=x.dtype, device=x.device),
            torch.zeros((batch, heads), dtype=torch.int32, device=x.device),
        )
    block_s, chunk, n_chunks, tiles, launch = masked_geometry(rows, seq_len, dim, x.element_size(), x.device)
    chunk_counts = None
    if max_length is None or seq_len > ONE_LAUNCH_MAX_COUNT:
        chunk_counts = count_chunks(mask.view(rows, seq_len), chunk, n_chunks)
    if max_length is None:
        max_length = int(chunk_counts.sum(dim=1).max())
    y = torch.empty((batch, heads, max_length, dim), dtype=x.dtype, device=x.device)
    lengths = torch.empty((batch, heads), dtype=torch.int32, device=x.device)
    _bool_gather_kernel[(n_chunks, rows)](
        as_bits(x), mask.view(torch.uint8), chunk_counts, as_bits(y), lengths,
        heads, seq_len, max_length, x.stride(0), x.stride(1), x.stride(2), chunk, n_chunks, tiles,
        D=dim, BLOCK_S=block_s, BLOCK_D=next_power_of_2(dim),
        COUNTED=chunk_counts is not None, COUNT_BLOCK=COUNT_BLOCK, MASK_SCAN_BLOCK=MASK_SCAN_BLOCK,
        **launch,
    )
    return y, lengths
