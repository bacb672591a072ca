"""CSR compaction of kept rows: the building block of the compacted DMS cache.

Per (batch, KV head) the DMS cache holds only the kept tokens, so lengths differ between heads
(docs/DMS.md, "Cache and decode"). ``compact_by_bool`` packs every (b, h)'s kept rows back to back:
``values [T, D]``, ``offsets [B*H + 1]`` (row r = b*H + h owns ``values[offsets[r]:offsets[r+1]]``)
and ``positions [T]`` (each kept row's original token index). Baselines: ``baseline.py``.

Launches: a program moves the kept rows of one chunk of one (b, h) row, starting at the number of kept
rows before the chunk in the whole mask. With ``total`` given and ``B*H*S <= ONE_LAUNCH_MAX_COUNT``,
each program counts that itself from the mask (1 byte a token, read from L2): one launch. Otherwise a
count kernel first writes per-chunk counts that the move kernel sums: without ``total`` they also size
the output, and for large masks the programs' repeated counts would cost more than a second launch.
A program requests its first tile's mask and rows before summing the counts before it, so that wait
overlaps the loads. Why not a one-launch look-back: benchmarks/NOTES.md.
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
def _compact_kernel(
    x_ptr, keep_ptr, chunk_counts_ptr, values_ptr, offsets_ptr, positions_ptr,
    H, S, T, n_rows, stride_xb, stride_xh, stride_xs, CHUNK, n_chunks, tiles,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    COUNTED: tl.constexpr, COUNT_BLOCK: tl.constexpr, MASK_SCAN_BLOCK: tl.constexpr,
):
    """Program (c, r) packs the kept rows of chunk c of row r = b*H + h; its first destination is the
    number of kept rows before it in (row, chunk) order: the sum of the earlier chunks' counts
    (``COUNTED``), else a count of the mask itself."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    start = c * CHUNK
    chunk_end = tl.minimum(start + CHUNK, S)
    d = tl.arange(0, BLOCK_D)
    b = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    x_row = x_ptr + b * stride_xb + h * stride_xh
    keep_row = keep_ptr + r.to(tl.int64) * S
    # The first tile's mask and kept rows are requested before the count of the rows before the
    # chunk: their loads do not need it (only the stores do), so the two latencies overlap.
    s = start + tl.arange(0, BLOCK_S)
    keep_tile = tl.load(keep_row + s, mask=s < chunk_end, other=0)
    vals = tl.load(x_row + s[:, None].to(tl.int64) * stride_xs + d[None, :], mask=tile_mask(keep_tile != 0, D, BLOCK_D))
    if COUNTED:
        flat = r * n_chunks + c
        before = 0
        for off in range(0, flat, COUNT_BLOCK):
            j = off + tl.arange(0, COUNT_BLOCK)
            before += tl.sum(tl.load(chunk_counts_ptr + j, mask=j < flat, other=0), axis=0)
    else:
        before = count_true(keep_ptr, 0, r.to(tl.int64) * S + start, MASK_SCAN_BLOCK)
    if c == 0:
        tl.store(offsets_ptr + r, before)
    next_dest = before
    for _ in range(0, tiles):
        # The next tile's mask, then its rows, are requested before this tile's stores complete.
        s_next = s + BLOCK_S
        keep_next = tl.load(keep_row + s_next, mask=s_next < chunk_end, other=0)
        kept = keep_tile.to(tl.int32)
        dest = next_dest + tl.cumsum(kept, axis=0) - 1
        # dest < T guards against a caller-given total that is too small.
        move = (kept != 0) & (dest < T)
        tl.store(values_ptr + dest[:, None].to(tl.int64) * D + d[None, :], vals, mask=tile_mask(move, D, BLOCK_D))
        tl.store(positions_ptr + dest, s, mask=move)
        next_dest += tl.sum(kept, axis=0)
        vals = tl.load(x_row + s_next[:, None].to(tl.int64) * stride_xs + d[None, :],
                       mask=tile_mask(keep_next != 0, D, BLOCK_D))
        s = s_next
        keep_tile = keep_next
    if (c == n_chunks - 1) & (r == n_rows - 1):
        tl.store(offsets_ptr + n_rows, next_dest)


def compact_by_bool(
    x: torch.Tensor, keep: torch.Tensor, *, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack each (b, h)'s kept rows, in order, into one CSR array.

    Args:
        x: ``[B, H, S, D]``, any 1/2/4/8-byte dtype (fp32, fp16, bf16, ...), contiguous in the last
            dim (other strides are free, e.g. a transposed ``[B, S, H, D]`` projection).
        keep: ``[B, H, S]`` contiguous bool on x's device; True keeps the row.
        total: T, the number of kept rows. Default: ``keep.sum()``, which costs one host
            synchronization. Passing it makes the call asynchronous; it must equal ``keep.sum()``
            (not checked: that would need the sync it saves; a smaller value drops the last rows,
            a larger one leaves the tail of ``values`` / ``positions`` unwritten).

    Returns:
        ``(values, offsets, positions)``: ``values [T, D]`` (x's dtype) holds row r = b*H + h's kept
        rows ``x[b, h][keep[b, h]]`` at ``values[offsets[r]:offsets[r + 1]]``; ``offsets [B*H + 1]``
        int32 prefix sums of the per-row counts (``offsets[0] = 0``); ``positions [T]`` int32, the
        token index s of each kept row. One Triton launch when ``total`` is given and
        ``B*H*S <= ONE_LAUNCH_MAX_COUNT``, else two (per-chunk counts, then the move).
    """
    check_data("x", x, ndim=4)
    batch, heads, seq_len, dim = x.shape
    check_mask("keep", keep, (batch, heads, seq_len), "x", x)
    check_device_usable("x", x)
    if total is not None:
        check_size_argument("total", total)
    rows = batch * heads
    check_grid_rows("B*H", rows)
    if rows == 0 or seq_len == 0:
        return (
            torch.zeros((0, dim), dtype=x.dtype, device=x.device),
            torch.zeros(rows + 1, dtype=torch.int32, device=x.device),
            torch.zeros(0, dtype=torch.int32, device=x.device),
        )
    block_s, chunk, n_chunks, tiles, launch = masked_geometry(rows, seq_len, dim, x.element_size(), x.device)
    chunk_counts = None
    if total is None or keep.numel() > ONE_LAUNCH_MAX_COUNT:
        chunk_counts = count_chunks(keep.view(rows, seq_len), chunk, n_chunks)
    if total is None:
        total = int(chunk_counts.sum())
    values = torch.empty((total, dim), dtype=x.dtype, device=x.device)
    offsets = torch.empty(rows + 1, dtype=torch.int32, device=x.device)
    positions = torch.empty(total, dtype=torch.int32, device=x.device)
    _compact_kernel[(n_chunks, rows)](
        as_bits(x), keep.view(torch.uint8), chunk_counts, as_bits(values), offsets, positions,
        heads, seq_len, total, rows, x.stride(0), x.stride(1), x.stride(2), chunk, n_chunks, tiles,
        D=dim, BLOCK_S=block_s, BLOCK_D=next_power_of_2(dim),
        COUNTED=chunk_counts is not None, COUNT_BLOCK=COUNT_BLOCK, MASK_SCAN_BLOCK=MASK_SCAN_BLOCK,
        **launch,
    )
    return values, offsets, positions
