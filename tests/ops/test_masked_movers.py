"""The two masked movers, ``bool_gather_left_pad`` and ``compact_by_bool``, and their loop / torch
baselines against the exact semantics, one parametrized module for both (each mover's own size
argument, launch rule and expected result are its ``Mover`` entry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.ops._common import MAX_GRID_ROWS
from dms_perf.ops.movers import bool_gather, compact
from dms_perf.ops.movers.baseline import (
    bool_gather_left_pad_loop,
    bool_gather_left_pad_torch,
    compact_by_bool_loop,
    compact_by_bool_torch,
)
from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.naive import bool_gather_left_pad_reference, compact_by_bool_reference
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


@dataclass(frozen=True)
class Mover:
    module: ModuleType
    impls: dict[str, Callable]
    expected: Callable
    size_keyword: str  # the caller-given output size that makes the call asynchronous
    size_of: Callable  # that size, from the expected result
    rule_size: Callable  # what the one-launch rule compares with ONE_LAUNCH_MAX_COUNT, from the mask

    @property
    def fn(self):
        return self.impls["triton"]

    def sized(self, x, mask, expected):
        return self.fn(x, mask, **{self.size_keyword: self.size_of(expected)})


MOVERS = {
    "bool_gather_left_pad": Mover(
        bool_gather,
        {"loop": bool_gather_left_pad_loop, "torch": bool_gather_left_pad_torch, "triton": bool_gather_left_pad},
        bool_gather_left_pad_reference,
        "max_length",
        lambda expected: expected[0].shape[2],
        lambda mask: mask.shape[-1],  # S: a program counts within its own row
    ),
    "compact_by_bool": Mover(
        compact,
        {"loop": compact_by_bool_loop, "torch": compact_by_bool_torch, "triton": compact_by_bool},
        compact_by_bool_reference,
        "total",
        lambda expected: expected[0].shape[0],
        lambda mask: mask.numel(),  # B*H*S: a program counts every earlier row too
    ),
}
mover_params = pytest.mark.parametrize("mover", list(MOVERS))


@mover_params
@impl_params
@case_params
@shape_params
def test_matches_semantics(mover, impl, case, shape, context_length, dtype, device):
    spec = MOVERS[mover]
    batch, heads, dim = shape
    seq_len = seq_len_for(case, context_length)
    x = random_data((batch, heads, seq_len, dim), dtype, device)
    mask = random_mask(case, (batch, heads, seq_len), device)
    assert_same(spec.impls[impl](x, mask), spec.expected(x, mask))


@mover_params
@launch_mode_params
@case_params
def test_given_size(mover, launch_mode, case, context_length, dtype, device, monkeypatch):
    """A caller-given output size (no host sync) gives exactly the default result, in one launch or two."""
    spec = MOVERS[mover]
    count_calls = spy_count_chunks(monkeypatch, spec.module)
    set_launch_mode(monkeypatch, spec.module, launch_mode)
    seq_len = seq_len_for(case, context_length)
    x = random_data((2, 2, seq_len, 128), dtype, device)
    mask = random_mask(case, (2, 2, seq_len), device)
    expected = spec.expected(x, mask)
    assert_same(spec.sized(x, mask, expected), expected)
    assert len(count_calls) == LAUNCH_MODES.index(launch_mode)


@mover_params
@pytest.mark.parametrize("over", [0, 1], ids=["at-threshold", "over-threshold"])
def test_launches_by_size(mover, over, device, monkeypatch):
    """Size given: one launch while the mover's rule size <= ONE_LAUNCH_MAX_COUNT, two past it; no size:
    always two."""
    spec = MOVERS[mover]
    x = random_data((2, 3, 50, 16), torch.float32, device)
    mask = random_mask("random", (2, 3, 50), device)
    expected = spec.expected(x, mask)
    assert_launches_by_size(
        monkeypatch, spec.module, spec.rule_size(mask), over,
        lambda: spec.sized(x, mask, expected),
        lambda: spec.fn(x, mask),
        expected,
    )


@mover_params
def test_strided_input(mover, dtype, device):
    """x as the transposed [B, S, H, D] projection output: no copy needed."""
    spec = MOVERS[mover]
    x = random_data((2, 90, 4, 64), dtype, device).transpose(1, 2)
    mask = random_mask("random", (2, 4, 90), device)
    assert_same(spec.fn(x, mask), spec.expected(x, mask))


@mover_params
@pytest.mark.parametrize("width_dtype", WIDTH_DTYPES, ids=str)
def test_moves_any_width(mover, width_dtype, device):
    spec = MOVERS[mover]
    x = random_data((1, 2, 70, 24), width_dtype, device)  # head_dim 24: not a power of two
    mask = random_mask("random", (1, 2, 70), device)
    assert_same(spec.fn(x, mask), spec.expected(x, mask))


@mover_params
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
def test_property(mover, batch, heads, seq_len, dim, keep_p, seed, launch_mode, device, monkeypatch):
    """The default call and the size-given call (in the drawn launch mode) both give the semantics."""
    spec = MOVERS[mover]
    set_launch_mode(monkeypatch, spec.module, launch_mode)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, heads, seq_len, dim), generator=gen).to(device)
    mask = (torch.rand((batch, heads, seq_len), generator=gen) < keep_p).to(device)
    expected = spec.expected(x, mask)
    assert_same(spec.fn(x, mask), expected)
    assert_same(spec.sized(x, mask, expected), expected)


@mover_params
def test_rejects_more_rows_than_one_launch_covers(mover, device):
    heads = MAX_GRID_ROWS + 1
    mask = torch.zeros(1, heads, 1, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="65536 rows"):
        MOVERS[mover].fn(torch.zeros(1, heads, 1, 1, device=device), mask)


BAD_CALLS = {
    "x not a tensor": (lambda f, x, m: f(x.tolist(), m), TypeError, "torch.Tensor"),
    "x 3-D": (lambda f, x, m: f(x[0], m), ValueError, "4 dimensions"),
    "x complex": (lambda f, x, m: f(x.to(torch.complex128), m), TypeError, "dtype"),
    "x strided last dim": (lambda f, x, m: f(x.transpose(2, 3), m), ValueError, "last dimension"),
    "mask not bool": (lambda f, x, m: f(x, m.int()), TypeError, "bool"),
    "mask float": (lambda f, x, m: f(x, m.float()), TypeError, "bool"),
    "mask shorter": (lambda f, x, m: f(x, m[:, :, :-1]), ValueError, r"\(1, 2, 8\)"),
    "mask fewer heads": (lambda f, x, m: f(x, m[:, :1]), ValueError, r"\(1, 2, 8\)"),
    "mask strided": (lambda f, x, m: f(x, m.repeat(1, 1, 2)[:, :, ::2]), ValueError, "contiguous"),
    "mask on meta": (lambda f, x, m: f(x, m.to("meta")), ValueError, "meta"),
}
BAD_SIZES = {"size float": (3.0, TypeError, "int"), "size negative": (-2, ValueError, "-2")}


@mover_params
@pytest.mark.parametrize("bad", list(BAD_CALLS) + list(BAD_SIZES))
def test_rejects_bad_input(mover, bad, device):
    spec = MOVERS[mover]
    x, mask = torch.randn(1, 2, 8, 64, device=device), torch.ones(1, 2, 8, dtype=torch.bool, device=device)
    if bad in BAD_SIZES:
        size, error, match = BAD_SIZES[bad]
        with pytest.raises(error, match=match):
            spec.fn(x, mask, **{spec.size_keyword: size})
        return
    call, error, match = BAD_CALLS[bad]
    with pytest.raises(error, match=match):
        call(spec.fn, x, mask)


# --- what only one of the two does --------------------------------------------------------------------


def test_bool_gather_empty_sequence(device):
    mask = torch.zeros(2, 3, 0, dtype=torch.bool, device=device)
    y, lengths = bool_gather_left_pad(torch.randn(2, 3, 0, 64, device=device), mask)
    assert y.shape == (2, 3, 0, 64) and lengths.tolist() == [[0] * 3] * 2


def test_compact_empty_sequence(device):
    keep = torch.zeros(2, 3, 0, dtype=torch.bool, device=device)
    values, offsets, positions = compact_by_bool(torch.randn(2, 3, 0, 64, device=device), keep)
    assert values.shape == (0, 64) and positions.shape == (0,) and offsets.tolist() == [0] * 7


@launch_mode_params
@pytest.mark.parametrize("extra", [0, 5])
@case_params
def test_bool_gather_longer_max_length_pads_in_front(launch_mode, extra, case, context_length, dtype, device,
                                                     monkeypatch):
    """A caller-given L: exactly the default result, or `extra` more zero rows in front."""
    count_calls = spy_count_chunks(monkeypatch, bool_gather)
    set_launch_mode(monkeypatch, bool_gather, launch_mode)
    seq_len = seq_len_for(case, context_length)
    x = random_data((1, 3, seq_len, 64), dtype, device)
    mask = random_mask(case, (1, 3, seq_len), device)
    y_ref, lengths_ref = bool_gather_left_pad_reference(x, mask)
    y, lengths = bool_gather_left_pad(x, mask, max_length=y_ref.shape[2] + extra)
    padded = torch.cat([torch.zeros(1, 3, extra, 64, dtype=dtype, device=device), y_ref], dim=2)
    assert_same((y, lengths), (padded, lengths_ref))
    assert len(count_calls) == LAUNCH_MODES.index(launch_mode)


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
    y_ref, lengths_ref = bool_gather_left_pad_reference(x, mask)
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


@launch_mode_params
def test_compact_too_small_total_drops_last_rows(launch_mode, device, monkeypatch):
    set_launch_mode(monkeypatch, compact, launch_mode)
    x = random_data((1, 2, 30, 64), torch.float32, device)
    keep = torch.ones(1, 2, 30, dtype=torch.bool, device=device)
    values, offsets, positions = compact_by_bool(x, keep, total=45)
    assert torch.equal(values, x.reshape(60, 64)[:45])
    assert offsets.tolist() == [0, 30, 60]
    assert positions.tolist() == list(range(30)) + list(range(15))
