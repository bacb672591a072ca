"""Sweep the launch geometry of the masked data movers (compact_by_bool, bool_gather_left_pad) on this GPU.

    PYTHONPATH=. python3 benchmarks/tune_movement.py --context-length 32768 --batches 1,8

For each setting of ``dms_perf.ops._common``'s MASKED_* values (tile bytes, programs per SM, warps,
stages) and each launch mode (the count kernel first, or one launch where each program counts the mask
itself), times the benchmark's own inputs (``benchmarks/test_kernels.py``: ``[B, 8, S, 128]`` bf16, half
of the rows kept, input sets rotated past L2) replayed from CUDA graphs, and prints the do_bench median
and the fraction of the measured copy bandwidth. The defaults in ``_common`` are this sweep's H100 pick
(benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from benchmarks.cases import DTYPE, HEAD_DIM, HEADS, MAKE_CASE
from dms_perf.bench.timing import copy_bandwidth_bytes_per_s, do_bench_ms, graph_replays, rotating
from dms_perf.ops import _common
from dms_perf.ops.movers import bool_gather, compact

KERNELS = {"compact_by_bool": compact, "bool_gather_left_pad": bool_gather}
# (tile bytes, programs per SM, warps, stages): a grid over the first two at the default warps / stages,
# then warps and stages around it.
SETTINGS = [
    *((tile, per_sm, 4, 3) for tile, per_sm in itertools.product((8192, 16384, 32768, 65536), (2, 4, 8, 16))),
    (16384, 4, 8, 3), (32768, 4, 8, 3), (32768, 8, 8, 3), (65536, 4, 8, 3), (65536, 2, 8, 3),
    (16384, 4, 4, 1), (16384, 4, 4, 4), (32768, 4, 4, 1), (32768, 8, 4, 4),
]
MODES = {"two-launch": 0, "one-launch": 2**31}


def _time(kernel: str, batch: int, seq_len: int) -> tuple[float, int]:
    x_bytes = batch * HEADS * seq_len * HEAD_DIM * DTYPE.itemsize
    next_case = rotating(lambda: MAKE_CASE[kernel](batch, seq_len), x_bytes)
    moved = next_case().bytes
    return do_bench_ms(graph_replays(lambda: next_case().calls["triton"]())), moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-length", type=int, default=32768)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    args = parser.parse_args()
    copy_bw = copy_bandwidth_bytes_per_s()
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    saved = {name: getattr(_common, name) for name in
             ("MASKED_TILE_BYTES", "MASKED_PROGRAMS_PER_SM", "MASKED_NUM_WARPS", "MASKED_NUM_STAGES")}
    for kernel in args.kernels.split(","):
        module = KERNELS[kernel]
        default_threshold = module.ONE_LAUNCH_MAX_COUNT
        for batch in (int(b) for b in args.batches.split(",")):
            for (tile, per_sm, warps, stages), (mode, threshold) in itertools.product(SETTINGS, MODES.items()):
                _common.MASKED_TILE_BYTES, _common.MASKED_PROGRAMS_PER_SM = tile, per_sm
                _common.MASKED_NUM_WARPS, _common.MASKED_NUM_STAGES = warps, stages
                module.ONE_LAUNCH_MAX_COUNT = threshold
                label = f"{kernel} B={batch} tile={tile} per_sm={per_sm} warps={warps} stages={stages} {mode}"
                try:
                    ms, moved = _time(kernel, batch, args.context_length)
                    print(f"{label}: {ms * 1e3:.1f} us, {moved / (ms * 1e-3) / copy_bw:.3f} of copy", flush=True)
                except Exception as exc:  # noqa: BLE001 - a setting that does not fit is a result here
                    print(f"{label}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            module.ONE_LAUNCH_MAX_COUNT = default_threshold
    for name, value in saved.items():
        setattr(_common, name, value)


if __name__ == "__main__":
    main()
