"""The four data movers of the DMS cache and the hub prefill, each one Triton kernel family with a
launcher that validates its input. ``baseline.py`` holds the loop (hub) and vectorized torch baselines the
benchmarks time them against; ``naive.py`` holds the readable references of the tests (tests only)."""

from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.scatter import scatter_by_index

__all__ = ["bool_gather_left_pad", "compact_by_bool", "left_pad_2d", "scatter_by_index"]
