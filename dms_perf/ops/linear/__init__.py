"""The decode step's projections for a few rows (``skinny_linear``): weights streamed once at near the
memory bandwidth, with the residual add or SwiGLU's activation in the epilogue."""

from dms_perf.ops.linear.kernel import MAX_ROWS, decode_linear, skinny_linear, skinny_linear_applies

__all__ = ["MAX_ROWS", "decode_linear", "skinny_linear", "skinny_linear_applies"]
