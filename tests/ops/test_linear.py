"""``skinny_linear`` (the decode step's projections) against its fp64 reference: plain, with a residual,
with SwiGLU's activation over the fused gate/up rows; ragged widths and depths, every row count of one
tile and of two, a poisoned output."""

from __future__ import annotations

import pytest
import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.ops.linear import MAX_ROWS, skinny_linear, skinny_linear_applies
from dms_perf.ops.linear.naive import skinny_linear_reference
from dms_perf.testing import poison, rel_error

# Relative error of the result against fp64: products accumulated in fp32, one rounding to the dtype.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The kernel's dtypes; bf16 on the GPU only (the interpreter's bf16 dot is wrong).
DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]


def _case(rows, n, k, dtype, device, lead=()):
    x = torch.randn(*lead, rows, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    return x, weight


@pytest.mark.parametrize("rows", [1, 5, 16, 17, MAX_ROWS])
@pytest.mark.parametrize("epilogue", ["plain", "residual", "silu_mul", "silu_mul+residual"])
@pytest.mark.parametrize("half", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_skinny_linear_matches_reference(rows, epilogue, half, device):
    dtype = half
    n, k = 2 * 72, 700  # not a multiple of any block; more than one step along K
    x, weight = _case(rows, n, k, dtype, device)
    silu = epilogue.startswith("silu_mul")
    width = n // 2 if silu else n
    residual = torch.randn(rows, width, device=device).to(dtype) if "residual" in epilogue else None
    out = poison(torch.empty(rows, width, dtype=dtype, device=device))  # an unwritten element stays NaN
    got = skinny_linear(x, weight, residual=residual, silu_mul=silu, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (rows, width) and got.dtype == dtype
    assert not got.isnan().any()
    assert rel_error(got, skinny_linear_reference(x, weight, residual=residual, silu_mul=silu)) < TOL[dtype]


def test_skinny_linear_keeps_leading_dims_and_takes_strided_rows(device):
    """``[B, 1, K]`` in, ``[B, 1, N]`` out (the decode step's hidden states); rows of a strided view."""
    x, weight = _case(3, 40, 64, torch.float16, device, lead=(2,))
    got = skinny_linear(x[:, ::2], weight)  # [2, 2, 64], rows not contiguous
    assert got.shape == (2, 2, 40)
    assert rel_error(got, skinny_linear_reference(x[:, ::2], weight)) < TOL[torch.float16]


def test_skinny_linear_applies_to_a_decode_step_only(device):
    weight = torch.randn(8, 16, device=device).half()
    assert skinny_linear_applies(torch.randn(MAX_ROWS, 16, device=device).half(), weight)
    assert not skinny_linear_applies(torch.randn(MAX_ROWS + 1, 16, device=device).half(), weight)  # a prefill
    assert not skinny_linear_applies(torch.randn(1, 16, device=device).half(), weight.t().contiguous().t())
    assert not skinny_linear_applies(torch.randn(1, 16, device=device), weight)  # dtypes differ
    assert not skinny_linear_applies(torch.randn(1, 16, device=device), weight.float())  # fp32: cuBLAS


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(MAX_ROWS + 1, 16).half()), "1..32 rows"),
    (dict(weight=torch.randn(8, 15).half()), "1..32 rows"),
    (dict(x=torch.randn(2, 16)), "1..32 rows"),  # fp32
    (dict(weight=torch.randn(7, 16).half(), silu_mul=True), "even number of weight rows"),
    (dict(residual=torch.randn(2, 9).half()), "residual must be"),
    (dict(out=torch.empty(2, 8, dtype=torch.float32)), "out must be"),
])
def test_skinny_linear_rejects_bad_input(change, match):
    args = dict(x=torch.randn(2, 16).half(), weight=torch.randn(8, 16).half())
    args.update(change)
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        skinny_linear(x, weight, **args)


# The projection of the engine that each epilogue stands for.
EPILOGUE_PROJECTION = {"plain": "qkv", "residual": "down", "silu_mul": "gate_up"}


@pytest.mark.parametrize("skinny", [True, False], ids=["skinny", "cublas"])
@pytest.mark.parametrize("epilogue", ["plain", "residual", "silu_mul"])
def test_decode_linear_is_the_same_arithmetic_either_way(skinny, epilogue, device, monkeypatch):
    """The engine's dispatcher: the kernel on CUDA for the projections in ``SKINNY_PROJECTIONS``, else
    cuBLAS and torch; both give the reference, and off the kernel ``residual_in_place`` adds the product
    into the residual itself."""
    from dms_perf.ops.linear import PROJECTIONS, decode_linear, kernel

    monkeypatch.setattr(kernel, "SKINNY_PROJECTIONS", frozenset(PROJECTIONS if skinny else ()))
    x, weight = _case(4, 64, 48, torch.float16, device, lead=(1,))
    silu = epilogue == "silu_mul"
    residual = torch.randn(1, 4, 64, device=device).half() if epilogue == "residual" else None
    want = skinny_linear_reference(x, weight, residual=residual, silu_mul=silu)
    kept = None if residual is None else residual.clone()
    got = decode_linear(x, weight, projection=EPILOGUE_PROJECTION[epilogue], residual=residual, silu_mul=silu,
                        residual_in_place=True)
    assert got.shape == want.shape and rel_error(got, want) < TOL[torch.float16]
    if residual is not None:
        on_kernel = skinny and device.type == "cuda"
        assert (got.data_ptr() == residual.data_ptr()) != on_kernel
        assert torch.equal(residual, kept) == on_kernel  # the kernel writes a new tensor


@pytest.mark.parametrize("projection", ["qkv", "o", "gate_up", "down"])
def test_each_projection_goes_where_the_table_says(projection, device, monkeypatch):
    """``uses_skinny_linear`` follows ``SKINNY_PROJECTIONS`` projection by projection (and only where the
    kernel applies); ``decode_linear`` then runs the kernel on CUDA and cuBLAS / torch elsewhere."""
    from dms_perf.ops.linear import PROJECTIONS, decode_linear, kernel, uses_skinny_linear

    x, weight = _case(2, 32, 16, torch.float16, device)
    others = frozenset(PROJECTIONS) - {projection}
    ran = []
    for name, path in (("skinny_linear", "skinny"), ("torch_linear", "torch")):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, real=real, path=path, **k: ran.append(path) or real(*a, **k))
    for table, chosen in ((frozenset({projection}), True), (others, False)):
        monkeypatch.setattr(kernel, "SKINNY_PROJECTIONS", table)
        assert uses_skinny_linear(x, weight, projection) is chosen
        assert not uses_skinny_linear(x.float(), weight.float(), projection)  # fp32: the kernel never applies
        ran.clear()
        decode_linear(x, weight, projection=projection)
        assert ran == ["skinny" if chosen and device.type == "cuda" else "torch"]


def test_unknown_projection_is_an_error():
    from dms_perf.ops.linear import decode_linear, uses_skinny_linear

    x, weight = _case(1, 8, 16, torch.float16, "cpu")
    with pytest.raises(ValueError, match="projection must be one of .*'lm'"):
        uses_skinny_linear(x, weight, "lm")
    with pytest.raises(ValueError, match="'q_proj'"):
        decode_linear(x, weight, projection="q_proj")
