"""The DMS decisions and visibility rule (dms_perf/dms/rule.py) against hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from dms_perf import dms_decisions
from dms_perf.rule import count_visible_pairs, evict_flags, visibility_mask


def test_dms_decisions_hand_example():
    # Hq=4, Hkv=2 (G=2): KV head 0 reads query head 0, KV head 1 reads query head 2, last channel.
    q = torch.randn(1, 4, 3, 4)
    q[0, 0, :, -1] = torch.tensor([0.2, 0.01, -1.0])  # logits 100a - 5: 15, -4, -105
    q[0, 2, :, -1] = torch.tensor([0.06, 3.0, 0.049])  # 1, 295, -0.1
    original = q.clone()

    decisions, q_out = dms_decisions(q, 2, 100.0, 5.0)

    expected = torch.tensor([[[True, False, False], [True, True, False]]])
    assert torch.equal(decisions, expected)
    assert torch.equal(q, original), "the input must not be modified"
    assert torch.equal(q_out[0, [0, 2], :, -1], torch.zeros(2, 3))
    # Everything else, including the last channel of the non-first heads, is untouched.
    assert torch.equal(q_out[0, [1, 3]], original[0, [1, 3]])
    assert torch.equal(q_out[..., :-1], original[..., :-1])


def test_dms_decisions_group_of_one_reads_every_head():
    q = torch.randn(2, 3, 5, 8)
    decisions, q_out = dms_decisions(q, 3, 100.0, 5.0)
    assert torch.equal(decisions, q[..., -1] * 100.0 - 5.0 > 0)
    assert torch.equal(q_out[..., -1], torch.zeros(2, 3, 5))


@pytest.mark.parametrize(
    "args, error",
    [
        ((torch.randn(1, 4, 3, 4), 3, 100.0, 5.0), ValueError),  # 4 query heads, 3 KV heads
        ((torch.randn(1, 4, 3, 4), 0, 100.0, 5.0), ValueError),
        ((torch.randn(4, 3, 4), 2, 100.0, 5.0), ValueError),
        ((torch.ones(1, 4, 3, 4, dtype=torch.int32), 2, 100.0, 5.0), TypeError),
    ],
)
def test_dms_decisions_rejects_bad_input(args, error):
    with pytest.raises(error):
        dms_decisions(*args)


def test_evict_flags_shift_by_one():
    decisions = torch.tensor([[True, False, True, True]])
    # Token t+1's decision marks token t; the newest token is kept.
    assert torch.equal(evict_flags(decisions), torch.tensor([[False, True, True, False]]))


def test_visibility_mask_hand_example():
    # decisions of tokens 0..5; evict = decisions shifted left: tokens 0, 2, 3 are evicted.
    decisions = torch.tensor([[[False, True, False, True, True, False]]])
    visible = visibility_mask(decisions, window=1, n_queries=6, n_keys=6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],  # key 0 evicted and 2 behind
            [0, 1, 1, 1, 0, 0],
            [0, 1, 0, 1, 1, 0],  # key 2 evicted, key 1 kept
            [0, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible[0, 0], expected)


def test_visibility_mask_window_zero_and_huge():
    decisions = torch.rand(2, 3, 37) < 0.5
    evict = evict_flags(decisions)
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    huge = visibility_mask(decisions, window=10_000, n_queries=37, n_keys=37)
    assert torch.equal(huge, causal.expand(2, 3, 37, 37))
    zero = visibility_mask(decisions, window=0, n_queries=37, n_keys=37)
    expected = (causal & ~evict[..., None, :]) | torch.eye(37, dtype=torch.bool)
    assert torch.equal(zero, expected)


def test_visibility_mask_query_chunk_is_a_slice_of_the_full_mask():
    decisions = torch.rand(1, 2, 50) < 0.8
    full = visibility_mask(decisions, window=7, n_queries=50, n_keys=50)
    chunk = visibility_mask(decisions, window=7, n_queries=13, n_keys=33, query_offset=20)
    assert torch.equal(chunk, full[:, :, 20:33, :33])


def test_visibility_mask_rejects_more_keys_than_decisions():
    with pytest.raises(ValueError, match="n_keys"):
        visibility_mask(torch.zeros(1, 1, 4, dtype=torch.bool), 1, 4, 5)


@pytest.mark.parametrize("window", [0, 3, 16, 40, 100])
def test_count_visible_pairs_matches_the_mask(window):
    decisions = torch.rand(2, 3, 41) < 0.7
    expected = int(visibility_mask(decisions, window, 41, 41).sum())
    assert count_visible_pairs(decisions, window) == expected
