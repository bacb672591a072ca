"""left_pad_2d (Triton) and its loop / torch baselines vs the issue-2 semantics, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.ops._common import HOST_CHECK_MAX, MAX_GRID_ROWS
from dms_perf.ops.movers.baseline import left_pad_2d_loop, left_pad_2d_torch
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.naive import left_pad_2d_reference
from tests.ops.kernel_params import (
    WIDTH_DTYPES,
    case_params,
    impl_params,
    property_settings,
    random_data,
    seq_len_for,
    shape_params,
)

IMPL = {"loop": left_pad_2d_loop, "torch": left_pad_2d_torch, "triton": left_pad_2d}


def case_lengths(case: str, n_rows: int, seq_len: int, device) -> torch.Tensor:
    if case == "none":
        return torch.zeros(n_rows, dtype=torch.int64, device=device)
    if case == "all":
        return torch.full((n_rows,), seq_len, dtype=torch.int64, device=device)
    lengths = torch.randint(0, seq_len + 1, (n_rows,), device=device)
    if case == "random":
        lengths[0], lengths[-1] = 0, seq_len
    return lengths


@impl_params
@case_params
@shape_params
def test_left_pad_matches_semantics(impl, case, shape, context_length, dtype, device):
    batch, heads, dim = shape
    seq_len = seq_len_for(case, context_length)
    x = random_data((batch * heads, seq_len, dim), dtype, device)
    lengths = case_lengths(case, batch * heads, seq_len, device)
    assert torch.equal(IMPL[impl](x, lengths), left_pad_2d_reference(x, lengths))


@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int64])
def test_left_pad_strided_input_and_int32_lengths(lengths_dtype, dtype, device):
    base = random_data((3, 77, 4, 64), dtype, device)
    x = base[:, :, 1]  # [3, 77, 64] with a row stride of 4 * 64
    lengths = torch.tensor([0, 40, 77], dtype=lengths_dtype, device=device)
    assert torch.equal(left_pad_2d(x, lengths), left_pad_2d_reference(x, lengths))


@pytest.mark.parametrize("width_dtype", WIDTH_DTYPES, ids=str)
def test_left_pad_moves_any_width(width_dtype, device):
    x = random_data((2, 70, 24), width_dtype, device)  # head_dim 24: not a power of two either
    lengths = torch.tensor([13, 70], device=device)
    assert torch.equal(left_pad_2d(x, lengths), left_pad_2d_reference(x, lengths))


def test_left_pad_unchecked_clamps_lengths(device):
    x = random_data((2, 50, 64), torch.float32, device)
    y = left_pad_2d(x, torch.tensor([-5, 80], device=device), check_lengths=False)
    assert torch.equal(y, left_pad_2d_reference(x, torch.tensor([0, 50], device=device)))


@property_settings
@given(
    n_rows=st.integers(1, 4),
    seq_len=st.integers(1, 150),
    dim=st.sampled_from([8, 64, 128]),
    seed=st.integers(0, 2**31 - 1),
)
def test_left_pad_property(n_rows, seq_len, dim, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_rows, seq_len, dim), generator=gen).to(device)
    lengths = torch.randint(0, seq_len + 1, (n_rows,), generator=gen).to(device)
    assert torch.equal(left_pad_2d(x, lengths), left_pad_2d_reference(x, lengths))


@pytest.mark.parametrize("rows", [10, HOST_CHECK_MAX + 10], ids=["host-checked", "device-checked"])
@pytest.mark.parametrize("bad_length", [-1, 9])
def test_left_pad_rejects_out_of_range_length(rows, bad_length, device):
    lengths = torch.randint(0, 9, (rows,), device=device)
    lengths[rows // 2] = bad_length
    with pytest.raises(ValueError, match=r"\[0, S=8\]"):
        left_pad_2d(torch.randn(rows, 8, 4, device=device), lengths)


def test_left_pad_rejects_more_rows_than_one_launch_covers(device):
    rows = MAX_GRID_ROWS + 1
    with pytest.raises(ValueError, match="65536 rows"):
        left_pad_2d(torch.zeros(rows, 1, 1, device=device), torch.zeros(rows, dtype=torch.int64, device=device))


BAD_CALLS = {
    "x not a tensor": (lambda x, ok: left_pad_2d(x.tolist(), ok), TypeError, "torch.Tensor"),
    "x 2-D": (lambda x, ok: left_pad_2d(x[0], ok), ValueError, "3 dimensions"),
    "x complex": (lambda x, ok: left_pad_2d(x.to(torch.complex128), ok), TypeError, "dtype"),
    "x strided last dim": (lambda x, ok: left_pad_2d(x.transpose(1, 2), ok), ValueError, "last dimension"),
    "lengths float": (lambda x, ok: left_pad_2d(x, ok.float()), TypeError, "integer dtype"),
    "lengths wrong count": (lambda x, ok: left_pad_2d(x, ok[:1]), ValueError, "2 entries"),
    "length above S": (lambda x, ok: left_pad_2d(x, ok * 9), ValueError, r"\[0, S=8\]"),
    "length below 0": (lambda x, ok: left_pad_2d(x, -ok), ValueError, r"\[-2, -1\]"),
    "lengths on meta": (lambda x, ok: left_pad_2d(x, ok.to("meta")), ValueError, "meta"),
}


@pytest.mark.parametrize("bad", BAD_CALLS)
def test_left_pad_rejects_bad_input(bad, device):
    call, error, match = BAD_CALLS[bad]
    with pytest.raises(error, match=match):
        call(torch.randn(2, 8, 64, device=device), torch.tensor([1, 2], device=device))
