"""compact_by_bool (Triton) and its loop / torch references vs the issue-2 semantics, exactly."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from dms_perf.kernels import compact
from dms_perf.kernels._common import MAX_GRID_ROWS
from dms_perf.kernels.compact import compact_by_bool, compact_by_bool_loop, compact_by_bool_torch
from tests.kernels.kernel_params import (
    COMPACT_LAUNCH_MODES,
    COUNT_LAUNCHES,
    WIDTH_DTYPES,
    assert_same,
    case_params,
    compact_launch_mode_params,
    impl_params,
    property_settings,
    random_data,
    random_mask,
    seq_len_for,
    set_launch_mode,
    shape_params,
    spy_count_chunks,
)


@triton.jit
def _look_back_probe(flags_ptr, out_ptr, flat, own, epoch, WINDOW: tl.constexpr):
    tl.store(out_ptr, compact._look_back(flags_ptr, flat, own, epoch, WINDOW))


def _word(epoch: int, status: int, value: int) -> int:
    return epoch << 32 | status << 30 | value


@pytest.mark.parametrize("inclusive_at", [None, 0, 5, 60, 98], ids=lambda i: f"inclusive{i}")
def test_look_back_walks_back_to_the_nearest_inclusive_count(inclusive_at, device):
    """Program 99 of a call: the earlier programs have published only their own counts, except one
    inclusive count (none: back to the start), and words before that one are a former call's. The
    look-back must add own counts over several windows of 32 words back to the inclusive one, stop
    there, and publish its own inclusive count."""
    epoch, flat, own = 7, 99, 5
    counts = torch.randint(0, 1000, (flat,)).tolist()
    words = [_word(epoch, 1, n) for n in counts]
    expected = sum(counts)
    if inclusive_at is not None:
        words[inclusive_at] = _word(epoch, 2, 123_456)
        words[:inclusive_at] = [_word(epoch - 1, 2, 999_999)] * inclusive_at  # a former call's words
        expected = 123_456 + sum(counts[inclusive_at + 1:])
    flags = torch.tensor(words + [0], dtype=torch.int64, device=device)
    out = torch.full((1,), -1, dtype=torch.int32, device=device)
    _look_back_probe[(1,)](flags, out, flat, own, epoch, WINDOW=compact.LOOKBACK_WINDOW)
    assert out.item() == expected
    assert flags[flat].item() == _word(epoch, 2, expected + own)


@pytest.mark.gpu
def test_compact_look_back_replayed_from_a_cuda_graph(monkeypatch):
    """Graph replays repeat the same launch on the same look-back state: every replay must start a new
    epoch and give the exact result (outputs poisoned before each replay); then an eager call on the
    same stream."""
    monkeypatch.setattr(compact, "LOOKBACK", True)
    x = random_data((2, 8, 4099, 64), torch.bfloat16, "cuda")
    keep = random_mask("random", (2, 8, 4099), "cuda")
    assert keep.numel() > compact.ONE_LAUNCH_MAX_COUNT
    expected = expected_compact(x, keep)
    total = expected[0].shape[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compact_by_bool(x, keep, total=total)  # compile, and create this stream's state outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            result = compact_by_bool(x, keep, total=total)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):
        for out in result:
            out.fill_(-1) if out.dtype == torch.int32 else out.fill_(float("nan"))
        graph.replay()
        assert_same(result, expected)
    with torch.cuda.stream(stream):
        eager = compact_by_bool(x, keep, total=total)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same(eager, expected)


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


@compact_launch_mode_params
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
    assert len(count_calls) == COUNT_LAUNCHES[launch_mode]


@pytest.mark.parametrize("over", [0, 1], ids=["at-threshold", "over-threshold"])
@pytest.mark.parametrize("lookback", [True, False], ids=["look-back", "count-kernel"])
def test_compact_launches_by_mask_size(over, lookback, device, monkeypatch):
    """Given T: programs count the mask themselves while B*H*S <= ONE_LAUNCH_MAX_COUNT; past it they
    look back at earlier programs' counts (``LOOKBACK``), else the count kernel runs first. No T: the
    count kernel always (its counts size the output)."""
    count_calls = spy_count_chunks(monkeypatch, compact)
    workspace = compact._workspace
    lookback_calls = []
    monkeypatch.setattr(compact, "_workspace", lambda *args: lookback_calls.append(args) or workspace(*args))
    monkeypatch.setattr(compact, "LOOKBACK", lookback)
    x = random_data((2, 3, 50, 16), torch.float32, device)
    keep = random_mask("random", (2, 3, 50), device)
    monkeypatch.setattr(compact, "ONE_LAUNCH_MAX_COUNT", keep.numel() - over)
    expected = expected_compact(x, keep)
    assert_same(compact_by_bool(x, keep, total=expected[0].shape[0]), expected)
    assert (len(count_calls), len(lookback_calls)) == ((0, over) if lookback else (over, 0))
    assert_same(compact_by_bool(x, keep), expected)
    assert len(count_calls) == (0 if lookback else over) + 1


def test_compact_look_back_repeated_calls(device, monkeypatch):
    """The look-back state survives calls of other sizes (each call leaves it reset for the next
    epoch): many calls in a row, growing and shrinking, each exact."""
    monkeypatch.setattr(compact, "ONE_LAUNCH_MAX_COUNT", 0)
    monkeypatch.setattr(compact, "LOOKBACK", True)
    for seq_len in (40, 300, 7, 300, 41):
        x = random_data((2, 2, seq_len, 8), torch.float32, device)
        keep = random_mask("random", (2, 2, seq_len), device)
        expected = expected_compact(x, keep)
        assert_same(compact_by_bool(x, keep, total=expected[0].shape[0]), expected)


@compact_launch_mode_params
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
    launch_mode=st.sampled_from(COMPACT_LAUNCH_MODES),
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
