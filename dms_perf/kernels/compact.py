"""CSR compaction of kept rows: the building block of the compacted DMS cache.

Per (batch, KV head) the DMS cache holds only the kept tokens, so lengths differ between heads
(shared/DMS.md, "Cache and decode"). ``compact_by_bool`` packs every (b, h)'s kept rows back to back:
``values [T, D]``, ``offsets [B*H + 1]`` (row r = b*H + h owns ``values[offsets[r]:offsets[r+1]]``)
and ``positions [T]`` (each kept row's original token index). ``compact_by_bool_loop`` mirrors the
original per-head boolean indexing, ``..._torch`` is the vectorized reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf.kernels._common import (
    COUNT_BLOCK,
    as_bits,
    block_rows,
    check_data,
    check_device_usable,
    check_grid_rows,
    check_mask,
    check_size_argument,
    chunk_geometry,
    count_chunks,
    next_power_of_2,
    tile_mask,
)


@triton.jit
def _compact_kernel(
    x_ptr, keep_ptr, chunk_counts_ptr, values_ptr, offsets_ptr, positions_ptr,
    H, S, T, n_rows, stride_xb, stride_xh, stride_xs, CHUNK, n_chunks, tiles,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COUNT_BLOCK: tl.constexpr,
):
    """Program (c, r) packs the kept rows of chunk c of row r = b*H + h; its first destination is the
    sum of the counts of all chunks before it in (row, chunk) order."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    flat = r * n_chunks + c
    before = 0
    for off in range(0, flat, COUNT_BLOCK):
        j = off + tl.arange(0, COUNT_BLOCK)
        before += tl.sum(tl.load(chunk_counts_ptr + j, mask=j < flat, other=0), axis=0)
    if c == 0:
        tl.store(offsets_ptr + r, before)
    d = tl.arange(0, BLOCK_D)
    b = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    x_row = x_ptr + b * stride_xb + h * stride_xh
    keep_row = keep_ptr + r.to(tl.int64) * S
    start = c * CHUNK
    next_dest = before
    for t in range(0, tiles):
        s = start + t * BLOCK_S + tl.arange(0, BLOCK_S)
        kept = tl.load(keep_row + s, mask=s < S, other=0).to(tl.int32)
        dest = next_dest + tl.cumsum(kept, axis=0) - 1
        # dest < T guards against a caller-given total that is too small.
        move = (kept != 0) & (dest < T)
        vals = tl.load(x_row + s[:, None].to(tl.int64) * stride_xs + d[None, :], mask=tile_mask(move, D, BLOCK_D))
        tl.store(values_ptr + dest[:, None].to(tl.int64) * D + d[None, :], vals, mask=tile_mask(move, D, BLOCK_D))
        tl.store(positions_ptr + dest, s, mask=move)
        next_dest += tl.sum(kept, axis=0)
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
        token index s of each kept row. Two Triton launches (per-chunk counts, then the move).
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
    block_s = block_rows(dim, x.element_size())
    chunk, n_chunks, tiles = chunk_geometry(rows, seq_len, block_s, x.device)
    chunk_counts = count_chunks(keep.view(rows, seq_len), chunk, n_chunks)
    if total is None:
        total = int(chunk_counts.sum())
    values = torch.empty((total, dim), dtype=x.dtype, device=x.device)
    offsets = torch.empty(rows + 1, dtype=torch.int32, device=x.device)
    positions = torch.empty(total, dtype=torch.int32, device=x.device)
    _compact_kernel[(n_chunks, rows)](
        as_bits(x), keep.view(torch.uint8), chunk_counts, as_bits(values), offsets, positions,
        heads, seq_len, total, rows, x.stride(0), x.stride(1), x.stride(2), chunk, n_chunks, tiles,
        D=dim, BLOCK_S=block_s, BLOCK_D=next_power_of_2(dim), COUNT_BLOCK=COUNT_BLOCK,
    )
    return values, offsets, positions


def compact_by_bool_torch(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorized reference: one boolean index (row-major order is CSR order), nonzero, cumsum."""
    counts = keep.sum(dim=-1, dtype=torch.int32).flatten()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    positions = keep.nonzero(as_tuple=True)[2].to(torch.int32)
    return x[keep], offsets, positions


def compact_by_bool_loop(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hub baseline: boolean indexing per (b, h) (one host sync each), then one concatenation."""
    batch, heads, _, dim = x.shape
    values, positions, offsets = [], [], [0]
    for b in range(batch):
        for h in range(heads):
            values.append(x[b, h][keep[b, h]])
            positions.append(keep[b, h].nonzero()[:, 0].to(torch.int32))
            offsets.append(offsets[-1] + len(values[-1]))
    offsets = torch.tensor(offsets, dtype=torch.int32, device=x.device)
    if not values:
        return x.new_zeros((0, dim)), offsets, torch.zeros(0, dtype=torch.int32, device=x.device)
    return torch.cat(values), offsets, torch.cat(positions)
