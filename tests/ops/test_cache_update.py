"""``decode_update`` on a paged cache: the ring bookkeeping of the torch step (``decode_update_torch``, the
production torch path, on a contiguous scratch cache) and K/V rows stored through the block table, found
by a loop over each head's table entries. The page buffers start poisoned: after every step they must
equal the expected buffers everywhere, so a row written anywhere else (a dead head's, a ``NO_PAGE``
slot's) shows. The contiguous layout is tested through the cache (tests/model/test_cache.py)."""

from __future__ import annotations

import pytest
import torch

from dms_perf.ops.cache_update.kernel import decode_update
from dms_perf.ops.cache_update.torch_ops import decode_update_torch
from tests.ops.paged_layout import (
    assert_same_pages,
    copy_state,
    expected_stores,
    paged_heads,
    physical_row,
    ring_state,
)

STATE = ("ring_slot", "ring_flag", "lengths", "step")


@pytest.mark.parametrize("page_rows", [16, 64])
@pytest.mark.parametrize("window", [0, 3])
def test_paged_decode_update_matches_the_torch_step(page_rows, window, device):
    """Eight steps over heads of one page exactly and no page reserved (its appends have no page: not
    stored), a page + 1, several pages, the window alone, and two dead heads (0 rows, no pages, their
    ring zeros): ring, lengths and step as the torch step leaves them, K/V rows where the table says,
    nothing else written. Slot reuse and appends both occur (random decisions and flags)."""
    P, w1, steps, seen, G, D = page_rows, window + 1, 8, 50, 2, 16
    lengths = [[0, P, P + 1, 3 * P + 2], [w1, 2 * P - 3, 0, 5]]
    reserve = [[0, 0, steps, steps], [steps, steps, 0, steps]]
    B, Hkv = len(lengths), len(lengths[0])
    k_pages, v_pages, table = paged_heads(lengths, reserve, P, D, torch.float32, device)
    state = ring_state(lengths, window, seen, device)
    state["ring_flag"][0, 1] = False  # the one-page head appends first: a row its pages do not hold
    reference = copy_state(state)
    cap = max(max(heads) for heads in lengths) + steps + w1  # the scratch cache's rows per head
    starts = (torch.arange(B * Hkv, device=device) * cap).view(B, Hkv)
    scratch_k, scratch_v = (torch.zeros(B * Hkv * cap, D, device=device) for _ in "kv")
    for t in range(seen, seen + steps):
        keys, values = (torch.randn(B, Hkv, 1, D, device=device) for _ in "kv")
        alphas = torch.randn(B, Hkv, 1, device=device)
        alphas += alphas.sign() * 0.5  # decisions a > 0 (scale 1, offset 0), none near the threshold
        q = torch.randn(B, Hkv * G, 1, D, device=device)
        expected_q = q.clone()
        expected_q[:, ::G, :, -1] = 0

        decode_update_torch(reference["ring_slot"], reference["ring_flag"], reference["lengths"], starts, scratch_k,
                            scratch_v, keys, values, alphas > 0, t, window)
        reference["step"] += 1
        slots = reference["ring_slot"][:, :, t % w1].tolist()  # where token t went, per head
        expected_k = expected_stores(k_pages, table, slots, keys[:, :, 0], P)
        expected_v = expected_stores(v_pages, table, slots, values[:, :, 0], P)

        decode_update(state["ring_slot"], state["ring_flag"], state["lengths"], None, k_pages, v_pages, keys, values,
                      alphas, q, state["step"], window, 1.0, 0.0, block_table=table, page_rows=P)
        for name in STATE:
            assert torch.equal(state[name], reference[name]), (t, name)
        assert torch.equal(q, expected_q)
        assert_same_pages(k_pages, expected_k)
        assert_same_pages(v_pages, expected_v)
    # The one-page head appended without a page, the dead heads never had one: each skipped its stores.
    assert state["lengths"][0, 1] > P and state["lengths"][0, 0] > 0 and state["lengths"][1, 2] > 0


def test_paged_decode_update_skips_any_slot_outside_the_table(device):
    """A dead head's ring may hold anything: a slot past its table or negative reads no table entry
    outside its own and stores nothing (here every ring slot is one of those, and every flag set)."""
    P, window, D = 16, 2, 16
    k_pages, v_pages, table = paged_heads([[0, 20]], [[0, 0]], P, D, torch.float32, device)
    state = ring_state([[0, 20]], window, 30, device)
    state["ring_slot"][0, 0] = torch.tensor([-1, -P - 3, 10**6])
    state["ring_flag"][0, 0] = True
    before_k, before_v = k_pages.clone(), v_pages.clone()
    keys = torch.randn(1, 2, 1, D, device=device)
    state["ring_flag"][0, 1] = False  # the live head never marks: it appends rows 20, 21, 22 on its second page
    alphas = torch.tensor([[[1.0], [-1.0]]], device=device)
    for _ in range(3):
        decode_update(state["ring_slot"], state["ring_flag"], state["lengths"], None, k_pages, v_pages, keys, keys,
                      alphas, torch.randn(1, 2, 1, D, device=device), state["step"], window, 1.0, 0.0,
                      block_table=table, page_rows=P)
        state["ring_flag"][0, 0] = True
    live = [physical_row(table[0, 1].tolist(), slot, P) for slot in (20, 21, 22)]
    for expected, got in ((before_k, k_pages), (before_v, v_pages)):
        expected[live] = keys[0, 1, 0]
        assert_same_pages(got, expected)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(starts=None), ValueError, "got neither"),
        (lambda a: a.update(block_table=a["table"], page_rows=16), ValueError, "got both"),
        (lambda a: a.update(starts=None, block_table=a["table"], page_rows=12), ValueError, "power of two"),
        (lambda a: a.update(starts=None, block_table=a["table"].long(), page_rows=16), TypeError, "int32"),
        (lambda a: a.update(starts=None, block_table=a["table"][:, :1], page_rows=16), ValueError, "block_table"),
        (lambda a: a.update(page_rows=16), ValueError, "goes with a block_table"),
        (lambda a: a.update(starts=a["starts"].int()), TypeError, "int64"),
    ],
)
def test_decode_update_rejects_bad_addressing(change, error, match, device):
    B, Hkv, D = 1, 2, 16
    args = dict(starts=torch.zeros(B, Hkv, dtype=torch.int64, device=device), block_table=None, page_rows=None,
                table=torch.zeros(B, Hkv, 2, dtype=torch.int32, device=device))
    change(args)
    state = ring_state([[0, 0]], 1, 0, device)
    cache = torch.zeros(64, D, device=device)
    new = torch.zeros(B, Hkv, 1, D, device=device)
    with pytest.raises(error, match=match):
        decode_update(state["ring_slot"], state["ring_flag"], state["lengths"], args["starts"], cache, cache, new, new,
                      torch.zeros(B, Hkv, 1, device=device), torch.zeros(B, Hkv, 1, D, device=device), state["step"],
                      1, 1.0, 0.0, block_table=args["block_table"], page_rows=args["page_rows"])
