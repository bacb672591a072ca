"""compact_by_bool (Triton) and its loop / torch references vs the issue-2 semantics, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.ops._common import MAX_GRID_ROWS
from dms_perf.ops.movers import compact
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.naive import compact_by_bool_loop, compact_by_bool_torch
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

IMPL = {"loop": compact_by_bool_loop, "torch": compact_by_bool_torch, "triton": compact_by_bool}


def expected_compact(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows r = b*H + h in order; within each, kept token indices ascending; offsets = running counts."""
    batch, heads, seq_len, dim = x.shape
    values, positions, offsets = [x.new_zeros(0, dim)], [], [0]
    for b in range(batch):
        for h in range(heads):
            kept = [s for s, k in zip(range(seq_len), keep[b, h].tolist(), strict=True) if k]
            values.append(x[b, h, torch.tensor(kept, dtype=torch.long, device=x.device)])
            positions += kept
            offsets.append(offsets[-1] + len(kept))
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32, device=x.device)
    return torch.cat(values), as_int32(offsets), as_int32(positions)


@impl_params
@case_params
@shape_params
def test_compact_matches_semantics(impl, case, shape, context_length, dtype, device):
    batch, heads, dim = shape
    seq_len = seq_len_for(case, context_length)
    x = random_data((batch, heads, seq_len, dim), dtype, device)
    keep = random_mask(case, (batch, heads, seq_len), device)
    assert_same(IMPL[impl](x, keep), expected_compact(x, keep))


@launch_mode_params
@case_params
def test_compact_given_total(launch_mode, case, context_length, dtype, device, monkeypatch):
    """A caller-given T (no host sync) gives exactly the default result, in one launch or two."""
    count_calls = spy_count_chunks(monkeypatch, compact)
    set_launch_mode(monkeypatch, compact, launch_mode)
    seq_len = seq_len_for(case, context_length)
    x = random_data((2, 2, seq_len, 128), dtype, device)
    keep = random_mask(case, (2, 2, seq_len), device)
    expected = expected_compact(x, keep)
    assert_same(compact_by_bool(x, keep, total=expected[0].shape[0]), expected)
    assert len(count_calls) == LAUNCH_MODES.index(launch_mode)


@pytest.mark.parametrize("over", [0, 1], ids=["at-threshold", "over-threshold"])
def test_compact_launches_by_mask_size(over, device, monkeypatch):
    """Given T: one launch while B*H*S <= ONE_LAUNCH_MAX_COUNT, two past it; no T: always two."""
    x = random_data((2, 3, 50, 16), torch.float32, device)
    keep = random_mask("random", (2, 3, 50), device)
    expected = expected_compact(x, keep)
    assert_launches_by_size(
        monkeypatch, compact, keep.numel(), over,
        lambda: compact_by_bool(x, keep, total=expected[0].shape[0]),
        lambda: compact_by_bool(x, keep),
        expected,
    )


@launch_mode_params
def test_compact_too_small_total_drops_last_rows(launch_mode, device, monkeypatch):
    set_launch_mode(monkeypatch, compact, launch_mode)
    x = random_data((1, 2, 30, 64), torch.float32, device)
    keep = torch.ones(1, 2, 30, dtype=torch.bool, device=device)
    values, offsets, positions = compact_by_bool(x, keep, total=45)
    assert torch.equal(values, x.reshape(60, 64)[:45])
    assert offsets.tolist() == [0, 30, 60]
    assert positions.tolist() == list(range(30)) + list(range(15))


def test_compact_strided_input(dtype, device):
    """x as the transposed [B, S, H, D] projection output: no copy needed."""
    x = random_data((2, 90, 4, 64), dtype, device).transpose(1, 2)
    keep = random_mask("random", (2, 4, 90), device)
    assert_same(compact_by_bool(x, keep), expected_compact(x, keep))


@pytest.mark.parametrize("width_dtype", WIDTH_DTYPES, ids=str)
def test_compact_moves_any_width(width_dtype, device):
    x = random_data((1, 2, 70, 24), width_dtype, device)  # head_dim 24: not a power of two
    keep = random_mask("random", (1, 2, 70), device)
    assert_same(compact_by_bool(x, keep), expected_compact(x, keep))


def test_compact_empty_sequence(device):
    keep = torch.zeros(2, 3, 0, dtype=torch.bool, device=device)
    values, offsets, positions = compact_by_bool(torch.randn(2, 3, 0, 64, device=device), keep)
    assert values.shape == (0, 64) and positions.shape == (0,) and offsets.tolist() == [0] * 7


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
def test_compact_property(batch, heads, seq_len, dim, keep_p, seed, launch_mode, device, monkeypatch):
    """The default call and the T-given call (in the drawn launch mode) both give the semantics."""
    set_launch_mode(monkeypatch, compact, launch_mode)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, heads, seq_len, dim), generator=gen).to(device)
    keep = (torch.rand((batch, heads, seq_len), generator=gen) < keep_p).to(device)
    expected = expected_compact(x, keep)
    assert_same(compact_by_bool(x, keep), expected)
    assert_same(compact_by_bool(x, keep, total=expected[0].shape[0]), expected)


def test_compact_rejects_more_rows_than_one_launch_covers(device):
    heads = MAX_GRID_ROWS + 1
    mask = torch.zeros(1, heads, 1, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="65536 rows"):
        compact_by_bool(torch.zeros(1, heads, 1, 1, device=device), mask)


BAD_CALLS = {
    "x not a tensor": (lambda x, k: compact_by_bool(x.tolist(), k), TypeError, "torch.Tensor"),
    "x 3-D": (lambda x, k: compact_by_bool(x[0], k), ValueError, "4 dimensions"),
    "x complex": (lambda x, k: compact_by_bool(x.to(torch.complex128), k), TypeError, "dtype"),
    "x strided last dim": (lambda x, k: compact_by_bool(x.transpose(2, 3), k), ValueError, "last dimension"),
    "keep not bool": (lambda x, k: compact_by_bool(x, k.float()), TypeError, "bool"),
    "keep wrong shape": (lambda x, k: compact_by_bool(x, k[:, :1]), ValueError, r"\(1, 2, 8\)"),
    "keep strided": (lambda x, k: compact_by_bool(x, k.repeat(1, 1, 2)[:, :, ::2]), ValueError, "contiguous"),
    "keep on meta": (lambda x, k: compact_by_bool(x, k.to("meta")), ValueError, "meta"),
    "total float": (lambda x, k: compact_by_bool(x, k, total=3.0), TypeError, "int"),
    "total negative": (lambda x, k: compact_by_bool(x, k, total=-2), ValueError, "-2"),
}


@pytest.mark.parametrize("bad", BAD_CALLS)
def test_compact_rejects_bad_input(bad, device):
    call, error, match = BAD_CALLS[bad]
    with pytest.raises(error, match=match):
        call(torch.randn(1, 2, 8, 64, device=device), torch.ones(1, 2, 8, dtype=torch.bool, device=device))
