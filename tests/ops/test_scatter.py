"""scatter_by_index (Triton) and its loop / torch baselines vs the issue-2 semantics, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.ops._common import HOST_CHECK_MAX
from dms_perf.ops.movers.baseline import scatter_by_index_loop, scatter_by_index_torch
from dms_perf.ops.movers.naive import scatter_by_index_reference
from dms_perf.ops.movers.scatter import scatter_by_index
from tests.ops.kernel_params import WIDTH_DTYPES, impl_params, property_settings, random_data, shape_params

IMPL = {"loop": scatter_by_index_loop, "torch": scatter_by_index_torch, "triton": scatter_by_index}
# The loop baseline syncs once per row: token-order permutations only up to this many rows.
LOOP_MAX_ROWS = 4096


def make_index(order: str, n: int, device) -> torch.Tensor:
    if order == "identity":
        return torch.arange(n, device=device)
    if order == "reverse":
        return torch.arange(n - 1, -1, -1, device=device)
    return torch.randperm(n, device=device)


@impl_params
@pytest.mark.parametrize("order", ["random", "identity", "reverse"])
@pytest.mark.parametrize("layout", ["heads", "tokens"])
@shape_params
def test_scatter_matches_semantics(impl, order, layout, shape, context_length, dtype, device):
    """heads: [B*H, S, D] rows (the hub's order restore); tokens: [S, D] rows, S not a block multiple."""
    batch, heads, dim = shape
    if layout == "heads":
        src = random_data((batch * heads, context_length, dim), dtype, device)
    else:
        if impl == "loop" and context_length > LOOP_MAX_ROWS:
            pytest.skip(f"loop baseline syncs per row: {context_length} rows is too slow")
        src = random_data((context_length - 3, dim), dtype, device)
    index = make_index(order, src.shape[0], device)
    assert torch.equal(IMPL[impl](src, index), scatter_by_index_reference(src, index))


@impl_params
def test_scatter_into_larger_out_keeps_other_rows(impl, dtype, device):
    src = random_data((5, 3, 64), dtype, device)
    index = torch.tensor([7, 0, 3, 9, 4], device=device)
    out = random_data((10, 3, 64), dtype, device)
    expected = out.clone()
    for m, j in enumerate(index.tolist()):
        expected[j] = src[m]
    result = IMPL[impl](src, index, out)
    assert result is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("width_dtype", WIDTH_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_scatter_moves_any_width(width_dtype, index_dtype, device):
    src = random_data((37, 5, 3), width_dtype, device)  # 15 elements per row: not a power of two
    index = torch.randperm(37, device=device).to(index_dtype)
    assert torch.equal(scatter_by_index(src, index), scatter_by_index_reference(src, index))


def test_scatter_empty_src(device):
    src = torch.randn(0, 64, device=device)
    assert scatter_by_index(src, torch.zeros(0, dtype=torch.int64, device=device)).shape == (0, 64)


def test_scatter_unchecked_permutation(device):
    src = random_data((300, 64), torch.float16, device)
    index = torch.randperm(300, device=device)
    assert torch.equal(scatter_by_index(src, index, check_index=False), scatter_by_index_reference(src, index))


@property_settings
@given(
    rows=st.integers(1, 300),
    row_shape=st.sampled_from([(1,), (64,), (3, 40), (2, 128)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_scatter_property(rows, row_shape, seed, device):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn((rows, *row_shape), generator=gen).to(device)
    index = torch.randperm(rows, generator=gen).to(device)
    assert torch.equal(scatter_by_index(src, index), scatter_by_index_reference(src, index))


BAD_CALLS = {
    "src not a tensor": (lambda src, idx: scatter_by_index(src.tolist(), idx), TypeError, "torch.Tensor"),
    "src scalar": (lambda src, idx: scatter_by_index(src[0, 0], idx), ValueError, "at least one dimension"),
    "src complex": (lambda src, idx: scatter_by_index(src.to(torch.complex128), idx), TypeError, "dtype"),
    "src not contiguous": (lambda src, idx: scatter_by_index(src.t(), idx), ValueError, "contiguous"),
    "index float": (lambda src, idx: scatter_by_index(src, idx.float()), TypeError, "integer dtype"),
    "index wrong count": (lambda src, idx: scatter_by_index(src, idx[:3]), ValueError, "4 entries"),
    "index 2-D": (lambda src, idx: scatter_by_index(src, idx[None]), ValueError, "1 dimensions"),
    "index duplicate": (lambda src, idx: scatter_by_index(src, idx * 0 + 2), ValueError, "2 repeats"),
    "index too large": (lambda src, idx: scatter_by_index(src, idx + 1), ValueError, r"\[0, 4\)"),
    "index negative": (lambda src, idx: scatter_by_index(src, idx - 1), ValueError, r"\[-1, 2\]"),
    "out wrong dtype": (lambda src, idx: scatter_by_index(src, idx, src.half()), TypeError, "float16"),
    "out too small": (lambda src, idx: scatter_by_index(src, idx, src[:3].clone()), ValueError, "N >= 4"),
    "out wrong row": (lambda src, idx: scatter_by_index(src, idx, src[:, :2].clone()), ValueError, "shape"),
    "index on meta": (lambda src, idx: scatter_by_index(src, idx.to("meta")), ValueError, "meta"),
}


@pytest.mark.parametrize("bad", BAD_CALLS)
def test_scatter_rejects_bad_input(bad, device):
    call, error, match = BAD_CALLS[bad]
    src = torch.randn(4, 64, device=device)
    with pytest.raises(error, match=match):
        call(src, torch.tensor([2, 0, 3, 1], device=device))


@pytest.mark.parametrize("rows", [10, HOST_CHECK_MAX + 10], ids=["host-checked", "device-checked"])
@pytest.mark.parametrize("flaw", ["duplicate", "too large", "negative"])
def test_scatter_rejects_flawed_permutation(rows, flaw, device):
    index = torch.randperm(rows, device=device)
    position = int(torch.nonzero(index == rows - 1)[0, 0])
    if flaw == "duplicate":
        index[position] = index[(position + 1) % rows]
        match = "repeat"
    else:
        index[position] = rows if flaw == "too large" else -3
        match = "must lie in"
    with pytest.raises(ValueError, match=match):
        scatter_by_index(torch.randn(rows, 8, device=device), index)


def test_scatter_rejected_index_leaves_out_untouched(device):
    out = torch.zeros(4, 8, device=device)
    with pytest.raises(ValueError):
        scatter_by_index(torch.ones(4, 8, device=device), torch.tensor([0, 1, 1, 2], device=device), out)
    assert not out.any()
