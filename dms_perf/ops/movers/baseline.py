"""The baselines the data-mover benchmarks time each Triton kernel against (benchmarks/cases.py).

``*_loop``: the released code's Python loops (one host sync per row), the "before" of each kernel.
``*_torch``: the same result from a few vectorized torch ops, the best plain torch does.
Benchmark code, not test references: the tests check them, like the kernels, against ``naive.py``.
"""

from __future__ import annotations

import torch


def left_pad_2d_torch(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Vectorized baseline: one gather from ``x[n, s - (S - lengths[n])]`` where that index is valid."""
    n_rows, seq_len, dim = x.shape
    src = torch.arange(seq_len, device=x.device)[None, :] - (seq_len - lengths.long()[:, None])
    valid = src >= 0
    gathered = torch.gather(x, 1, src.clamp(min=0)[:, :, None].expand(n_rows, seq_len, dim))
    return torch.where(valid[:, :, None], gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def left_pad_2d_loop(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The hub baseline: one Python iteration (and one host sync) per row, as ``left_pad_one`` did."""
    n_rows, seq_len, _ = x.shape
    y = torch.zeros_like(x)
    for n in range(n_rows):
        length = int(lengths[n])
        if length:
            y[n, seq_len - length:] = x[n, :length]
    return y


def scatter_by_index_torch(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Vectorized baseline: ``out.index_copy_(0, index, src)``."""
    out = torch.empty_like(src) if out is None else out
    return out.index_copy_(0, index.long(), src)


def scatter_by_index_loop(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The hub baseline: one Python iteration (and one host sync) per row, as the original order-restoring loop did."""
    out = torch.empty_like(src) if out is None else out
    for m in range(src.shape[0]):
        out[int(index[m])] = src[m]
    return out


def bool_gather_left_pad_torch(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized baseline: destination ``L - n + rank`` of every selected row, one index_put."""
    batch, heads, seq_len, dim = x.shape
    lengths = mask.sum(dim=-1)
    max_length = int(lengths.max()) if lengths.numel() else 0
    dest = max_length - lengths[..., None] + torch.cumsum(mask, dim=-1) - 1
    b, h, s = mask.nonzero(as_tuple=True)
    y = torch.zeros((batch, heads, max_length, dim), dtype=x.dtype, device=x.device)
    y[b, h, dest[b, h, s]] = x[b, h, s]
    return y, lengths.to(torch.int32)


def bool_gather_left_pad_loop(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hub baseline: boolean indexing per (b, h) (one host sync each), then left padding per row."""
    batch, heads, _, dim = x.shape
    selected = [[x[b, h][mask[b, h]] for h in range(heads)] for b in range(batch)]
    lengths = torch.tensor([[len(sel) for sel in row] for row in selected], dtype=torch.int32, device=x.device)
    max_length = int(lengths.max()) if lengths.numel() else 0
    y = torch.zeros((batch, heads, max_length, dim), dtype=x.dtype, device=x.device)
    for b in range(batch):
        for h in range(heads):
            n = len(selected[b][h])
            if n:
                y[b, h, max_length - n:] = selected[b][h]
    return y, lengths


def compact_by_bool_torch(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorized baseline: one boolean index (row-major order is CSR order), nonzero, cumsum."""
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
