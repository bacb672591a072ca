"""The decode step's projections for a few rows (``skinny_linear``): weights streamed once at near the
memory bandwidth, with the residual add or SwiGLU's activation in the epilogue."""

from dms_perf.ops.linear.kernel import (
    MAX_ROWS,
    PROJECTIONS,
    decode_linear,
    skinny_linear,
    skinny_linear_applies,
    torch_linear,
    uses_skinny_linear,
)

__all__ = [
    "MAX_ROWS",
    "PROJECTIONS",
    "decode_linear",
    "skinny_linear",
    "skinny_linear_applies",
    "torch_linear",
    "uses_skinny_linear",
]
