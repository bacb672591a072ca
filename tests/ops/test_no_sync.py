"""The launchers never synchronize with the host once output sizes are given.

``tests.ops.sync_check.sync_checked`` turns any synchronizing torch call (``.item()``, ``int(tensor)``,
``nonzero``, a blocking copy) into an error; each check has a planted-sync companion.
"""

from __future__ import annotations

import pytest
import torch

from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.ops.movers.left_pad import left_pad_2d
from dms_perf.ops.movers.scatter import scatter_by_index
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
    }


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
@pytest.mark.parametrize("kernel", ["left_pad_2d", "scatter_by_index", "bool_gather_left_pad", "compact_by_bool"])
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
