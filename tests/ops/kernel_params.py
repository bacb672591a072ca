"""Parameters shared by the data-movement kernel tests (tests/kernels/test_*.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from dms_perf._runtime import HAS_CUDA

IMPLS = ("loop", "torch", "triton")

# (batch, heads, head_dim): the interpreter is slow, so CPU runs keep few rows.
SHAPES = ((1, 2, 128), (2, 1, 64)) if not HAS_CUDA else ((1, 2, 128), (2, 1, 64), (1, 8, 128), (2, 4, 64))
shape_params = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}d{}".format(*s))
impl_params = pytest.mark.parametrize("impl", IMPLS)

# Mask / length patterns: "random" also holds one all-false and one all-true row; "ragged" has a
# sequence length that is not a multiple of any block size.
CASES = ("random", "none", "all", "ragged")
case_params = pytest.mark.parametrize("case", CASES)

# Dtypes that exercise every bit width the kernels accept (they move bits, not values); uint8, not
# int8, because the poison value of an int8 allocation does not fit.
WIDTH_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float64, torch.bfloat16)

# Hypothesis: few examples (the interpreter is slow); the autouse poison / seed fixtures are
# function-scoped on purpose (poisoning stays on for every example).
property_settings = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# bool_gather / compact with the output size given: the move kernel counts the mask itself ("one-launch")
# or the count kernel runs first ("two-launch"); each module's ONE_LAUNCH_MAX_COUNT picks, by input size.
LAUNCH_MODES = ("one-launch", "two-launch")
launch_mode_params = pytest.mark.parametrize("launch_mode", LAUNCH_MODES)


def spy_count_chunks(monkeypatch, module) -> list:
    """Record each call of ``module.count_chunks`` (the first of two launches) in the returned list."""
    calls = []
    count_chunks = module.count_chunks
    monkeypatch.setattr(module, "count_chunks", lambda *args: calls.append(args) or count_chunks(*args))
    return calls


def set_launch_mode(monkeypatch, module, launch_mode: str) -> None:
    """Make ``module``'s size rule choose ``launch_mode`` at any input size."""
    monkeypatch.setattr(module, "ONE_LAUNCH_MAX_COUNT", 2**31 if launch_mode == "one-launch" else 0)


def assert_launches_by_size(monkeypatch, module, measured: int, over: int, sized, unsized, expected) -> None:
    """``module``'s size rule with ONE_LAUNCH_MAX_COUNT set to ``measured - over`` (``measured``: the
    size the rule compares): ``sized()`` (output size given) runs the count kernel only past the
    threshold (``over`` = 1), ``unsized()`` always (its counts size the output); both exact."""
    count_calls = spy_count_chunks(monkeypatch, module)
    monkeypatch.setattr(module, "ONE_LAUNCH_MAX_COUNT", measured - over)
    assert_same(sized(), expected)
    assert len(count_calls) == over
    assert_same(unsized(), expected)
    assert len(count_calls) == over + 1


def seq_len_for(case: str, context_length: int) -> int:
    return context_length - 3 if case == "ragged" else context_length


def random_mask(case: str, shape: tuple[int, ...], device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask [..., S] for a case: none / all / random (one row of each extreme) / ragged (30%)."""
    if case == "none":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if case == "all":
        return torch.ones(shape, dtype=torch.bool, device=device)
    p = 0.3 if case == "ragged" else 0.5
    mask = torch.rand(shape, generator=generator) < p
    if case == "random":
        rows = mask.view(-1, shape[-1])
        rows[0] = False
        rows[-1] = True
    return mask.to(device)


def random_data(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Finite random values of any dtype (integers drawn over a small range)."""
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.randint(-100, 100, shape, device=device).to(dtype)


def assert_same(result: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    """Every output equal to the expected one: dtype, shape and every element (NaN poison fails)."""
    assert len(result) == len(expected)
    for got, want in zip(result, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        assert torch.equal(got, want)
