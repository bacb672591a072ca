"""bool_gather_left_pad (Triton) and its loop / torch references vs the issue-2 semantics, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.ops._common import MAX_GRID_ROWS
from dms_perf.ops.movers import bool_gather
from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.naive import bool_gather_left_pad_loop, bool_gather_left_pad_torch
from tests.ops.kernel_params import (
    LAUNCH_MODES,
    WIDTH_DTYPES,
    assert_launches_by_size,
    assert_same,
    case_params,
    impl_params,
    launch_mode_params,
    property_settings,
    random_data,
    random_mask,
    seq_len_for,
    set_launch_mode,
    shape_params,
    spy_count_chunks,
)

IMPL = {"loop": bool_gather_left_pad_loop, "torch": bool_gather_left_pad_torch, "triton": bool_gather_left_pad}


def expected_bool_gather(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h): the rows at the selected token indices, in order, after L - count zero rows."""
    batch, heads, _, dim = x.shape
    selected = {(b, h): mask[b, h].nonzero()[:, 0] for b in range(batch) for h in range(heads)}
    length = max(len(s) for s in selected.values())
    y = torch.zeros(batch, heads, length, dim, dtype=x.dtype, device=x.device)
    for (b, h), tokens in selected.items():
        y[b, h, length - len(tokens) :] = x[b, h, tokens]
    lengths = torch.tensor([[len(selected[b, h]) for h in range(heads)] for b in range(batch)], dtype=torch.int32)
    return y, lengths.to(x.device)


@impl_params
@case_params
@shape_params
def test_bool_gather_matches_semantics(impl, case, shape, context_length, dtype, device):
    batch, heads, dim = shape
    seq_len = seq_len_for(case, context_length)
    x = random_data((batch, heads, seq_len, dim), dtype, device)
    mask = random_mask(case, (batch, heads, seq_len), device)
    assert_same(IMPL[impl](x, mask), expected_bool_gather(x, mask))


@launch_mode_params
@pytest.mark.parametrize("extra", [0, 5])
@case_params
def test_bool_gather_given_max_length(launch_mode, extra, case, context_length, dtype, device, monkeypatch):
    """A caller-given L (no host sync): exactly the default result, or `extra` more zero rows in front."""
    count_calls = spy_count_chunks(monkeypatch, bool_gather)
    set_launch_mode(monkeypatch, bool_gather, launch_mode)
    seq_len = seq_len_for(case, context_length)
    x = random_data((1, 3, seq_len, 64), dtype, device)
    mask = random_mask(case, (1, 3, seq_len), device)
    y_ref, lengths_ref = expected_bool_gather(x, mask)
    length = y_ref.shape[2] + extra
    y, lengths = bool_gather_left_pad(x, mask, max_length=length)
    padded = torch.cat([torch.zeros(1, 3, extra, 64, dtype=dtype, device=device), y_ref], dim=2)
    assert_same((y, lengths), (padded, lengths_ref))
    assert len(count_calls) == LAUNCH_MODES.index(launch_mode)


@pytest.mark.parametrize("over", [0, 1], ids=["at-threshold", "over-threshold"])
def test_bool_gather_launches_by_sequence_length(over, device, monkeypatch):
    """Given L: one launch while S <= ONE_LAUNCH_MAX_COUNT, two past it; no L: always two."""
    x = random_data((2, 3, 50, 16), torch.float32, device)
    mask = random_mask("random", (2, 3, 50), device)
    expected = expected_bool_gather(x, mask)
    assert_launches_by_size(
        monkeypatch, bool_gather, mask.shape[-1], over,
        lambda: bool_gather_left_pad(x, mask, max_length=expected[0].shape[2]),
        lambda: bool_gather_left_pad(x, mask),
        expected,
    )


@launch_mode_params
@pytest.mark.parametrize("extra", [-40, 0, 5])
def test_bool_gather_uneven_rows(launch_mode, extra, device, monkeypatch):
    """All, few, none and one row selected: padding that spans several chunks, with L short, exact or long."""
    set_launch_mode(monkeypatch, bool_gather, launch_mode)
    x = random_data((1, 4, 300, 16), torch.float32, device)
    mask = torch.zeros(1, 4, 300, dtype=torch.bool, device=device)
    mask[0, 0] = True
    mask[0, 1, ::50] = True
    mask[0, 3, 7] = True
    y_ref, lengths_ref = expected_bool_gather(x, mask)
    padded = torch.cat([torch.zeros(1, 4, max(extra, 0), 16, device=device), y_ref], dim=2)
    y, lengths = bool_gather_left_pad(x, mask, max_length=300 + extra)
    assert_same((y, lengths), (padded[:, :, -(300 + extra) :], lengths_ref))


@launch_mode_params
def test_bool_gather_too_small_max_length_drops_earliest(launch_mode, device, monkeypatch):
    set_launch_mode(monkeypatch, bool_gather, launch_mode)
    x = random_data((1, 2, 40, 64), torch.float32, device)
    mask = torch.ones(1, 2, 40, dtype=torch.bool, device=device)
    y, lengths = bool_gather_left_pad(x, mask, max_length=25)
    assert torch.equal(y, x[:, :, 15:])
    assert lengths.tolist() == [[40, 40]]


def test_bool_gather_strided_input(dtype, device):
    """x as the transposed [B, S, H, D] projection output: no copy needed."""
    x = random_data((2, 90, 4, 64), dtype, device).transpose(1, 2)
    mask = random_mask("random", (2, 4, 90), device)
    assert_same(bool_gather_left_pad(x, mask), expected_bool_gather(x, mask))


@pytest.mark.parametrize("width_dtype", WIDTH_DTYPES, ids=str)
def test_bool_gather_moves_any_width(width_dtype, device):
    x = random_data((1, 2, 70, 24), width_dtype, device)  # head_dim 24: not a power of two
    mask = random_mask("random", (1, 2, 70), device)
    assert_same(bool_gather_left_pad(x, mask), expected_bool_gather(x, mask))


def test_bool_gather_empty_sequence(device):
    mask = torch.zeros(2, 3, 0, dtype=torch.bool, device=device)
    y, lengths = bool_gather_left_pad(torch.randn(2, 3, 0, 64, device=device), mask)
    assert y.shape == (2, 3, 0, 64) and lengths.tolist() == [[0] * 3] * 2


@property_settings
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    seq_len=st.integers(1, 300),
    dim=st.sampled_from([16, 64, 128]),
    keep_p=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    launch_mode=st.sampled_from(LAUNCH_MODES),
)
def test_bool_gather_property(batch, heads, seq_len, dim, keep_p, seed, launch_mode, device, monkeypatch):
    """The default call and the L-given call (in the drawn launch mode) both give the semantics."""
    set_launch_mode(monkeypatch, bool_gather, launch_mode)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, heads, seq_len, dim), generator=gen).to(device)
    mask = (torch.rand((batch, heads, seq_len), generator=gen) < keep_p).to(device)
    expected = expected_bool_gather(x, mask)
    assert_same(bool_gather_left_pad(x, mask), expected)
    assert_same(bool_gather_left_pad(x, mask, max_length=expected[0].shape[2]), expected)


def test_bool_gather_rejects_more_rows_than_one_launch_covers(device):
    heads = MAX_GRID_ROWS + 1
    mask = torch.zeros(1, heads, 1, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="65536 rows"):
        bool_gather_left_pad(torch.zeros(1, heads, 1, 1, device=device), mask)


BAD_CALLS = {
    "x not a tensor": (lambda x, m: bool_gather_left_pad(x.tolist(), m), TypeError, "torch.Tensor"),
    "x 3-D": (lambda x, m: bool_gather_left_pad(x[0], m), ValueError, "4 dimensions"),
    "x complex": (lambda x, m: bool_gather_left_pad(x.to(torch.complex128), m), TypeError, "dtype"),
    "x strided last dim": (lambda x, m: bool_gather_left_pad(x.transpose(2, 3), m), ValueError, "last dimension"),
    "mask not bool": (lambda x, m: bool_gather_left_pad(x, m.int()), TypeError, "bool"),
    "mask wrong shape": (lambda x, m: bool_gather_left_pad(x, m[:, :, :-1]), ValueError, r"\(1, 2, 8\)"),
    "mask strided": (lambda x, m: bool_gather_left_pad(x, m.repeat(1, 1, 2)[:, :, ::2]), ValueError, "contiguous"),
    "mask on meta": (lambda x, m: bool_gather_left_pad(x, m.to("meta")), ValueError, "meta"),
    "max_length float": (lambda x, m: bool_gather_left_pad(x, m, max_length=3.0), TypeError, "int"),
    "max_length negative": (lambda x, m: bool_gather_left_pad(x, m, max_length=-1), ValueError, "-1"),
}


@pytest.mark.parametrize("bad", BAD_CALLS)
def test_bool_gather_rejects_bad_input(bad, device):
    call, error, match = BAD_CALLS[bad]
    with pytest.raises(error, match=match):
        call(torch.randn(1, 2, 8, 64, device=device), torch.ones(1, 2, 8, dtype=torch.bool, device=device))
