"""Readable references of the four data movers, written from their definitions (tests only; nothing in
dms_perf/ or benchmarks/ imports them).

Each spells its result out row by row, so that it shares no trick with the kernels or with the
baselines the benchmarks time (``baseline.py``): the tests compare both against these, exactly.
"""

from __future__ import annotations

import torch


def left_pad_2d_reference(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row n: S - lengths[n] zeros, then x[n, :lengths[n]]."""
    _, seq_len, dim = x.shape
    rows = []
    for n, length in enumerate(lengths.tolist()):
        rows.append(torch.cat([torch.zeros(seq_len - length, dim, dtype=x.dtype, device=x.device), x[n, :length]]))
    return torch.stack(rows)


def scatter_by_index_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For a permutation, out[j] = src[m] where index[m] = j, i.e. src gathered by index's inverse."""
    return src[torch.argsort(index)]


def bool_gather_left_pad_reference(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h): the rows at the selected token indices, in order, after L - count zero rows."""
    batch, heads, _, dim = x.shape
    selected = {(b, h): mask[b, h].nonzero()[:, 0] for b in range(batch) for h in range(heads)}
    length = max(len(s) for s in selected.values())
    y = torch.zeros(batch, heads, length, dim, dtype=x.dtype, device=x.device)
    for (b, h), tokens in selected.items():
        y[b, h, length - len(tokens) :] = x[b, h, tokens]
    lengths = torch.tensor([[len(selected[b, h]) for h in range(heads)] for b in range(batch)], dtype=torch.int32)
    return y, lengths.to(x.device)


def compact_by_bool_reference(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows r = b*H + h in order; within each, kept token indices ascending; offsets = running counts."""
    batch, heads, seq_len, dim = x.shape
    values, positions, offsets = [x.new_zeros(0, dim)], [], [0]
    for b in range(batch):
        for h in range(heads):
            kept = [s for s, k in zip(range(seq_len), keep[b, h].tolist(), strict=True) if k]
            values.append(x[b, h, torch.tensor(kept, dtype=torch.long, device=x.device)])
            positions += kept
            offsets.append(offsets[-1] + len(kept))

    def as_int32(v):
        return torch.tensor(v, dtype=torch.int32, device=x.device)

    return torch.cat(values), as_int32(offsets), as_int32(positions)
