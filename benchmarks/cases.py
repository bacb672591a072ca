"""Input sets of the data-movement kernel benchmarks (``test_kernels.py``, ``tune_movement.py``): for
each kernel, one random input at the Qwen3-8B KV shape and the call of each implementation on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.ops.movers.baseline import (
    bool_gather_left_pad_loop,
    bool_gather_left_pad_torch,
    compact_by_bool_loop,
    compact_by_bool_torch,
    left_pad_2d_loop,
    left_pad_2d_torch,
    scatter_by_index_loop,
    scatter_by_index_torch,
)
from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.scatter import scatter_by_index

HEADS, HEAD_DIM, DTYPE = (8, 128, torch.bfloat16) if HAS_CUDA else (2, 64, torch.float32)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Random masks keep half the tokens: the irregular case (DMS-8x keeps about 1/8 plus the window).
KEEP_FRACTION = 0.5

@dataclass
class Case:
    """One input set: the call of each implementation on it, and the bytes the operation must move."""

    calls: dict[str, Callable[[], object]]
    bytes: int


def _left_pad_case(batch: int, seq_len: int) -> Case:
    x = torch.randn(batch * HEADS, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    # Lengths spread evenly over (0, S] in random row order: every input set moves the same bytes.
    rows = batch * HEADS
    lengths = ((torch.arange(1, rows + 1) * seq_len) // rows)[torch.randperm(rows)].to(DEVICE)
    elem = x.element_size()
    moved = int(lengths.sum()) * HEAD_DIM * elem + lengths.numel() * 8 + x.numel() * elem
    return Case(
        {
            "loop": lambda: left_pad_2d_loop(x, lengths),
            "torch": lambda: left_pad_2d_torch(x, lengths),
            "triton": lambda: left_pad_2d(x, lengths, check_lengths=False),
            "triton-default": lambda: left_pad_2d(x, lengths),
        },
        moved,
    )


def _scatter_case(batch: int, seq_len: int) -> Case:
    """The hub's order restore: whole (b, h) rows of the KV tensor permuted back."""
    src = torch.randn(batch * HEADS, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    index = torch.randperm(batch * HEADS, device=DEVICE)
    out = torch.empty_like(src)
    return Case(
        {
            "loop": lambda: scatter_by_index_loop(src, index, out),
            "torch": lambda: scatter_by_index_torch(src, index, out),
            "triton": lambda: scatter_by_index(src, index, out, check_index=False),
            "triton-default": lambda: scatter_by_index(src, index, out),
        },
        2 * src.numel() * src.element_size() + index.numel() * 8,
    )


def _bool_gather_case(batch: int, seq_len: int) -> Case:
    x = torch.randn(batch, HEADS, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    mask = torch.rand(batch, HEADS, seq_len, device=DEVICE) < KEEP_FRACTION
    max_length = int(mask.sum(-1).max())
    elem = x.element_size()
    moved = mask.numel() + int(mask.sum()) * HEAD_DIM * elem + batch * HEADS * (max_length * HEAD_DIM * elem + 4)
    return Case(
        {
            "loop": lambda: bool_gather_left_pad_loop(x, mask),
            "torch": lambda: bool_gather_left_pad_torch(x, mask),
            "triton": lambda: bool_gather_left_pad(x, mask, max_length=max_length),
            "triton-default": lambda: bool_gather_left_pad(x, mask),
        },
        moved,
    )


def _compact_case(batch: int, seq_len: int) -> Case:
    x = torch.randn(batch, HEADS, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    keep = torch.rand(batch, HEADS, seq_len, device=DEVICE) < KEEP_FRACTION
    total = int(keep.sum())
    moved = keep.numel() + total * (2 * HEAD_DIM * x.element_size() + 4) + (batch * HEADS + 1) * 4
    return Case(
        {
            "loop": lambda: compact_by_bool_loop(x, keep),
            "torch": lambda: compact_by_bool_torch(x, keep),
            "triton": lambda: compact_by_bool(x, keep, total=total),
            "triton-default": lambda: compact_by_bool(x, keep),
        },
        moved,
    )


MAKE_CASE = {
    "left_pad_2d": _left_pad_case,
    "scatter_by_index": _scatter_case,
    "bool_gather_left_pad": _bool_gather_case,
    "compact_by_bool": _compact_case,
}
