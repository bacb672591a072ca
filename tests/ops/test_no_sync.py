"""The launchers never synchronize with the host once output sizes are given.

``tests.ops.sync_check.sync_checked`` turns any synchronizing torch call (``.item()``, ``int(tensor)``,
``nonzero``, a blocking copy) into an error; each check has a planted-sync companion.
"""

from __future__ import annotations

import pytest
import torch

from dms_perf.ops.cache_update import decode_update, fused_decode_step
from dms_perf.ops.decode import dms_decode_attention
from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.scatter import scatter_by_index
from tests.ops.paged_layout import ring_state, shuffled_block_table
from tests.ops.sync_check import plant_sync, sync_checked


def _calls(device):
    """Each kernel called with its size / check keyword, so no data-dependent size is left to read back."""
    x = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    mask = torch.rand(1, 8, 4096, device=device) < 0.5
    # Sizes computed before sync checking starts, as a caller that already knows them would have.
    max_length, total = int(mask.sum(-1).max()), int(mask.sum())
    lengths = torch.randint(0, 4097, (8,), device=device)
    index = torch.randperm(8, device=device)
    return {
        "left_pad_2d": lambda: left_pad_2d(x[0], lengths, check_lengths=False),
        "scatter_by_index": lambda: scatter_by_index(x[0], index, check_index=False),
        "bool_gather_left_pad": lambda: bool_gather_left_pad(x, mask, max_length=max_length),
        "compact_by_bool": lambda: compact_by_bool(x, mask, total=total),
        **_decode_calls(device),
    }


def _decode_calls(device):
    """The decode step's kernels on a paged cache (pages of 64 rows in shuffled order, heads of 0..2000
    rows, the table a view of a pool-sized one), and decode attention with each scheduler."""
    B, Hq, Hkv, D, P, window, seen = 4, 32, 8, 128, 64, 8, 3000
    rows = torch.randint(window + 1, 2001, (B, Hkv))
    rows[0, 0] = 0  # a dead head: no pages
    table, num_pages = shuffled_block_table(rows + 1, P)  # a page more where the next row needs one
    pool_table = torch.full((2, B + 2, Hkv, table.shape[2]), -1, dtype=torch.int32, device=device)
    pool_table[1, :B] = table.to(device)
    table = pool_table[1, :B]
    k_pages, v_pages = (torch.randn(num_pages * P, D, device=device, dtype=torch.bfloat16) for _ in "kv")
    state = ring_state(rows.tolist(), window, seen, device)
    lengths, longest = state["lengths"], int(rows.max())
    flat = rows.flatten().long()
    starts = (flat.cumsum(0) - flat).view(B, Hkv).to(device)
    q = torch.randn(B, Hq, D, device=device, dtype=torch.bfloat16)
    new = torch.randn(B, Hkv, 1, D, device=device, dtype=torch.bfloat16)
    alphas = torch.randn(B, Hkv, 1, device=device)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, device=device, dtype=torch.bfloat16)
    weight = torch.ones(D, device=device, dtype=torch.bfloat16)
    cos = sin = torch.rand(B, D, device=device, dtype=torch.bfloat16)
    ring = (state["ring_slot"], state["ring_flag"], lengths)
    paged = dict(block_table=table, page_rows=P)

    def update():
        decode_update(*ring, None, k_pages, v_pages, new, new, alphas, q[:, :, None], state["step"], window, 1.0, 0.0,
                      **paged)
        return lengths

    return {
        "decode_attention-paged-per_head": lambda: dms_decode_attention(
            q, k_pages, v_pages, None, lengths, longest, schedule="per_head", **paged),
        "decode_attention-paged-balanced": lambda: dms_decode_attention(
            q, k_pages, v_pages, None, lengths, longest, schedule="balanced", **paged),
        "decode_attention-balanced": lambda: dms_decode_attention(
            q, k_pages, v_pages, starts, lengths, longest, schedule="balanced"),
        "decode_update-paged": update,
        "fused_decode_step-paged": lambda: fused_decode_step(
            qkv, weight, weight, 1e-6, cos, sin, *ring, None, k_pages, v_pages, state["step"], 1.0, 0.0, **paged),
    }


KERNELS = ["left_pad_2d", "scatter_by_index", "bool_gather_left_pad", "compact_by_bool",
           "decode_attention-paged-per_head", "decode_attention-paged-balanced", "decode_attention-balanced",
           "decode_update-paged", "fused_decode_step-paged"]


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_launcher_does_not_synchronize(kernel, planted, device):
    """planted-sync: the same region with a sync planted after the call must be caught (the check is live)."""
    call = _calls(device)[kernel]
    call()  # compile first: the JIT may legitimately query the device
    with sync_checked(planted):
        result = call()
        if planted:
            plant_sync(result[0] if isinstance(result, tuple) else result)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_sync_checking_catches_a_sync(device):
    """The check above can fail: the default (size-computing) path does synchronize."""
    x = torch.randn(1, 2, 256, 64, device=device)
    mask = torch.rand(1, 2, 256, device=device) < 0.5
    compact_by_bool(x, mask)
    with sync_checked(planted=True):
        compact_by_bool(x, mask)
