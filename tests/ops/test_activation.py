"""``silu_mul`` on the fused gate/up layout against its fp64 reference, with ragged widths and rows."""

from __future__ import annotations

import pytest
import torch

from dms_perf.ops.activation import silu_mul
from dms_perf.ops.activation.naive import silu_mul_reference

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("shape", [(1, 1, 2 * 12), (3, 2 * 1024), (2, 5, 2 * 1500), (7, 2)])
def test_silu_mul_matches_reference(shape, dtype, device):
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    got = silu_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    torch.testing.assert_close(got.double(), silu_mul_reference(x), rtol=TOL[dtype], atol=TOL[dtype])


def test_silu_mul_takes_a_non_contiguous_input(device):
    x = torch.randn(4, 2 * 64, device=device)[::2]
    torch.testing.assert_close(silu_mul(x).double(), silu_mul_reference(x), rtol=1e-6, atol=1e-6)


def test_silu_mul_rejects_bad_input(device):
    with pytest.raises(ValueError, match="even last dim"):
        silu_mul(torch.randn(2, 7, device=device))
    with pytest.raises(TypeError, match="fp16 / bf16 / fp32"):
        silu_mul(torch.ones(2, 4, dtype=torch.int32, device=device))
