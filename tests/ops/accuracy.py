"""The accuracy rule of the attention tests (prefill and decode), flash-attention style.

An implementation's error against the fp64 reference may be at most twice the error of the same
math done by plain torch at the input dtype, plus a small floor (for the cases where torch's error
is near zero). The floors are per dtype and per metric; ``cap`` keeps a test's bound at or below a
fixed one it had before it used this rule.
"""

from __future__ import annotations

import torch

from dms_perf.testing import rel_error

# ||out - ref|| / ||ref|| over the whole output.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
# Per query row (one norm over the whole output would hide a wrong tile at 32K).
ROW_FLOOR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Largest absolute error of the natural-log logsumexp.
LSE_FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def worst_row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows (all but the last dimension) of ||out_row - ref_row|| / ||ref_row||, in fp64."""
    ref = ref.double()
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def assert_as_accurate_as_torch(
    what: str, out, same_dtype, ref, floor: float, *, metric=rel_error, cap: float | None = None
) -> None:
    """``metric(out, ref) <= 2 * metric(same_dtype, ref) + floor`` (and ``<= cap`` if given).

    ``ref``: the fp64 truth; ``same_dtype``: the same reference computed by torch at the input dtype.
    """
    err, base = metric(out, ref), metric(same_dtype, ref)
    bound = 2 * base + floor
    if cap is not None:
        bound = min(bound, cap)
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch at the input dtype: {base:.3g})"
