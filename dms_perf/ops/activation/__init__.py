"""SwiGLU's activation on the fused gate/up projection: ``silu_mul`` (one Triton launch)."""

from dms_perf.ops.activation.kernel import silu_mul

__all__ = ["silu_mul"]
