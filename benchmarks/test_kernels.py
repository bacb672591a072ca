"""The four DMS data-movement kernels against their loop ("hub") and torch baselines
(``dms_perf/ops/movers/baseline.py``).

GPU: the Qwen3-8B KV shape ``[B=1, H=8, S, D=128]`` bf16 at every context length, plus B=8 at the
largest one. Implementations: ``loop`` and ``torch`` baselines; ``triton`` with the sizes / checks
given by the caller (asynchronous: the kernel's own speed), eager, replayed from CUDA graphs one call a
replay (``triton-graph``) and eight back-to-back calls a replay (``triton-graph-x8``, timed per call);
``triton-default`` with default keywords (one host sync to size the output or validate the index /
lengths).

``extra_info``: ``bytes`` (each needed input byte read once, each output byte written once), ``gbps``,
``copy_fraction`` (of ``copy_bandwidth_bytes_per_s()``), and on Triton cases ``speedup_vs_loop`` /
``speedup_vs_torch``: the baselines' medians on the same input (``median_call_ms``, the statistic of the
case's own median), measured by the case itself.
Compare within one size: ``--benchmark-group-by=group,param:context_length,param:batch``.

CPU smoke mode (``--benchmark-disable``): ``[1, 2, S, 64]`` fp32 at the given context lengths, one call each.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import DTYPE, HEAD_DIM, HEADS, KEEP_FRACTION, MAKE_CASE
from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.floors import bandwidth_floor
from dms_perf.bench.timing import bench, median_call_ms, rotating

# "triton-graph": the "triton" call replayed from CUDA graphs, i.e. the kernels' device time without
# Python's per-launch cost (about 30 us a launch on the H100 host, more than the kernel itself at B=1).
# "triton-graph-x8": 8 calls back to back (8 input sets) per graph, timed per call: the steady-state rate,
# without the fixed ~3.7 us of each replay that a single call pays (as the copy bandwidth is measured).
IMPLS = ("loop", "torch", "triton", "triton-graph", "triton-graph-x8", "triton-default")
CALLS_PER_GRAPH = {"triton-graph-x8": 8}
KERNELS = ("left_pad_2d", "scatter_by_index", "bool_gather_left_pad", "compact_by_bool")


def host_bound(params: dict) -> bool:
    """The loop baselines (a host sync per row) and every eager batch-1 call: at B=1 a launch's Python
    costs about as much as the copy (triton vs triton-graph in benchmarks/NOTES.md)."""
    return params.get("impl") == "loop" or (params.get("batch") == 1 and "-graph" not in str(params.get("impl")))


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
    ms = median_s * 1e3
    floor = bandwidth_floor(first.bytes, median_s)
    benchmark.extra_info["gbps"] = floor["gbps"]
    benchmark.extra_info["copy_fraction"] = floor["floor_fraction"]
    if impl.startswith("triton") and HAS_CUDA:
        # Each case times its own baselines (no state shared between cases: -k and --shard change nothing).
        for ref in ("loop", "torch"):
            ref_ms = median_call_ms(lambda ref=ref: next_case().calls[ref]())
            benchmark.extra_info[f"{ref}_ms"] = ref_ms
            benchmark.extra_info[f"speedup_vs_{ref}"] = ref_ms / ms
