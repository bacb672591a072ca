"""The DMS decisions and visibility rule (dms_perf/rule.py) against hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from dms_perf import dms_decisions
from dms_perf.rule import count_visible_pairs, decisions_from_alphas, evict_flags, visibility_mask


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
    # G = 1: KV head h reads query head h itself, channel D - 1; logits 100a - 5 written out by hand.
    q = torch.zeros(1, 3, 2, 8)
    q[0, :, :, -1] = torch.tensor([[0.5, -0.5], [0.0, 0.07], [-2.0, 1.0]])  # 45, -55 | -5, 2 | -205, 95
    q[0, :, :, -2] = torch.tensor([[-9.0, 9.0], [9.0, -9.0], [9.0, -9.0]])  # decoys in channel D - 2
    decisions, q_out = dms_decisions(q, 3, 100.0, 5.0)
    assert torch.equal(decisions, torch.tensor([[[True, False], [False, True], [False, True]]]))
    assert torch.equal(q_out[..., -1], torch.zeros(1, 3, 2))
    assert torch.equal(q_out[..., :-1], q[..., :-1])


def test_dms_decisions_threshold_with_the_checkpoint_values():
    # scale 100, offset 5: decided iff a > 0.05. In fp32, 0.05 * 100 rounds to exactly 5.0, so the
    # boundary itself gives logit 0, which is not > 0; 0.04 and 0.06 give -1 and +1.
    q = torch.zeros(1, 1, 7, 4)
    q[0, 0, :, -1] = torch.tensor([0.04, 0.05, 0.06, 0.0500001, 0.0499999, 0.0, -0.06])
    decisions, _ = dms_decisions(q, 1, 100.0, 5.0)
    assert decisions[0, 0].tolist() == [False, False, True, True, False, False, False]


def test_dms_decisions_exact_boundary_and_other_constants():
    # 0.0625 * 64 = 4 exactly: logit 0 at the boundary (False) whatever the rounding; one fp32 step above
    # it is True. A negative offset decides a = 0 (logit +2) and a = -0.03 (logit -1) the other way.
    q = torch.zeros(1, 1, 3, 4)
    q[0, 0, :, -1] = torch.tensor([0.0625, 0.0625 + 2.0**-27, 0.0625 - 2.0**-28])
    decisions, _ = dms_decisions(q, 1, 64.0, 4.0)
    assert decisions[0, 0].tolist() == [False, True, False]
    q[0, 0, :, -1] = torch.tensor([0.0, -0.03, -0.01])
    decisions, _ = dms_decisions(q, 1, 100.0, -2.0)
    assert decisions[0, 0].tolist() == [True, False, True]


def test_dms_decisions_read_channel_d_minus_1_of_head_h_times_g():
    # Hq = 6, Hkv = 2, G = 3, D = 5: KV head 0 reads query head 0, KV head 1 reads query head 3, channel 4.
    # Every other head and channel holds a value that would flip the decision if it were read instead.
    q = torch.full((1, 6, 2, 5), 1.0)  # logit 95 everywhere else
    q[0, 0, :, 4] = torch.tensor([0.0, 0.1])  # head 0: logits -5, 5
    q[0, 3, :, 4] = torch.tensor([0.2, -0.1])  # head 3: logits 15, -15
    q[0, [1, 2, 4, 5], :, 4] = torch.tensor([1.0, -1.0])  # the other heads' channel D - 1
    q[0, 0, :, 3] = torch.tensor([1.0, -1.0])  # channel D - 2 of the reading heads
    q[0, 3, :, 3] = torch.tensor([-1.0, 1.0])
    original = q.clone()

    decisions, q_out = dms_decisions(q, 2, 100.0, 5.0)

    assert torch.equal(decisions, torch.tensor([[[False, True], [True, False]]]))
    assert torch.equal(q, original)
    zeroed = torch.zeros(6, 5, dtype=torch.bool)
    zeroed[[0, 3], 4] = True  # (h * G, D - 1) for h = 0, 1
    where = zeroed[None, :, None, :].expand_as(q)
    assert torch.equal(q_out[where], torch.zeros(int(where.sum())))
    assert torch.equal(q_out[~where], original[~where])


def test_decisions_from_alphas_hand_values():
    alphas = torch.tensor([[[0.04, 0.05, 0.06, 0.3, -1.0]]])
    assert decisions_from_alphas(alphas, 100.0, 5.0).tolist() == [[[False, False, True, True, False]]]
    assert decisions_from_alphas(alphas, 10.0, 0.0).tolist() == [[[True, True, True, True, False]]]


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
