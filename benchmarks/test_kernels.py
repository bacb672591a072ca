"""The four DMS data-movement kernels (issue 2) against their loop ("hub") and torch references.

GPU: the Qwen3-8B KV shape ``[B=1, H=8, S, D=128]`` bf16 at every context length, plus B=8 at the
largest one. Implementations: ``loop`` and ``torch`` references; ``triton`` with the sizes / checks
given by the caller (asynchronous: the kernel's own speed), eager, replayed from CUDA graphs one call a
replay (``triton-graph``) and eight back-to-back calls a replay (``triton-graph-x8``, timed per call);
``triton-default`` with default keywords (one host sync to size the output or validate the index /
lengths).

``extra_info``: ``bytes`` (each needed input byte read once, each output byte written once), ``gbps``,
``copy_fraction`` (of ``copy_bandwidth_bytes_per_s()``), and on Triton cases ``speedup_vs_loop`` /
``speedup_vs_torch`` from the do_bench medians of the reference cases run earlier in the session.
Compare within one size: ``--benchmark-group-by=group,param:context_length,param:batch``.

CPU smoke mode (``--benchmark-disable``): ``[1, 2, S, 64]`` fp32 at the given context lengths, one call each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.timing import bench, copy_bandwidth_bytes_per_s, rotating
from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.naive import (
    bool_gather_left_pad_loop,
    bool_gather_left_pad_torch,
    compact_by_bool_loop,
    compact_by_bool_torch,
    left_pad_2d_loop,
    left_pad_2d_torch,
    scatter_by_index_loop,
    scatter_by_index_torch,
)
from dms_perf.ops.movers.scatter import scatter_by_index

HEADS, HEAD_DIM, DTYPE = (8, 128, torch.bfloat16) if HAS_CUDA else (2, 64, torch.float32)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Random masks keep half the tokens: the irregular case (DMS-8x keeps about 1/8 plus the window).
KEEP_FRACTION = 0.5
# "triton-graph": the "triton" call replayed from CUDA graphs, i.e. the kernels' device time without
# Python's per-launch cost (about 30 us a launch on the H100 host, more than the kernel itself at B=1).
# "triton-graph-x8": 8 calls back to back (8 input sets) per graph, timed per call: the steady-state rate,
# without the fixed ~3.7 us of each replay that a single call pays (as the copy bandwidth is measured).
IMPLS = ("loop", "torch", "triton", "triton-graph", "triton-graph-x8", "triton-default")
CALLS_PER_GRAPH = {"triton-graph-x8": 8}
KERNELS = ("left_pad_2d", "scatter_by_index", "bool_gather_left_pad", "compact_by_bool")

# do_bench medians (ms) of the reference cases, keyed by (kernel, impl, context length, batch).
_reference_ms: dict[tuple[str, str, int, int], float] = {}


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


def host_bound(params: dict) -> bool:
    """The loop references (a host sync per row) and every eager batch-1 call: at B=1 a launch's Python
    costs about as much as the copy (triton vs triton-graph in benchmarks/NOTES.md)."""
    return params.get("impl") == "loop" or (params.get("batch") == 1 and "-graph" not in str(params.get("impl")))


MAKE_CASE = {
    "left_pad_2d": _left_pad_case,
    "scatter_by_index": _scatter_case,
    "bool_gather_left_pad": _bool_gather_case,
    "compact_by_bool": _compact_case,
}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel(benchmark, kernel, impl, batch, context_length, request):
    if batch != 1 and context_length != max(request.config.dms_context_lengths):
        pytest.skip("batch 8 runs at the largest context length only")
    x_bytes = batch * HEADS * context_length * HEAD_DIM * DTYPE.itemsize
    next_case = rotating(lambda: MAKE_CASE[kernel](batch, context_length), x_bytes)
    first = next_case()
    benchmark.group = kernel
    benchmark.extra_info.update(
        kernel=kernel,
        impl=impl,
        batch=batch,
        heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=str(DTYPE),
        keep_fraction=KEEP_FRACTION,
        bytes=first.bytes,
    )
    call = impl.split("-graph")[0]
    median_s = bench(
        benchmark,
        lambda: next_case().calls[call](),
        cuda_graph="-graph" in impl,
        calls_per_graph=CALLS_PER_GRAPH.get(impl, 1),
    )
    if median_s is None:
        return
    ms = benchmark.extra_info["median_ms"]
    benchmark.extra_info["gbps"] = first.bytes / median_s / 1e9
    benchmark.extra_info["copy_fraction"] = first.bytes / median_s / copy_bandwidth_bytes_per_s()
    _reference_ms[kernel, impl, context_length, batch] = ms
    if impl.startswith("triton"):
        for ref in ("loop", "torch"):
            ref_ms = _reference_ms.get((kernel, ref, context_length, batch))
            if ref_ms is not None:
                benchmark.extra_info[f"speedup_vs_{ref}"] = ref_ms / ms
