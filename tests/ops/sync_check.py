"""Host-sync checking shared by the no-sync tests (data movers, prefill, cache update + decode).

``sync_checked()`` runs a block under ``torch.cuda.set_sync_debug_mode("error")``: a synchronizing
torch call inside it (``.item()``, ``.tolist()``, ``int(tensor)``, ``nonzero``, a blocking copy) raises
a RuntimeError. That mode only sees the waits torch itself does: a test that asserts nothing more than
"no error" would also pass if the mode were never set for the code it runs. So each such test has a
companion that runs the same guarded region with a sync planted at its end (``plant_sync``) under
``sync_checked(planted=True)``, which fails unless the planted sync is caught.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

# torch's message: "called a synchronizing CUDA operation".
SYNC_ERROR = "synchroniz"


@contextlib.contextmanager
def sync_checked(planted: bool = False):
    """Raise on any host synchronization inside the block. ``planted=True``: the block must raise one
    (it plants a sync), and the guard passes only if it is caught."""
    torch.cuda.synchronize()  # work queued before the block (compilation, inputs) is not the block's
    torch.cuda.set_sync_debug_mode("error")
    try:
        if planted:
            with pytest.raises(RuntimeError, match=SYNC_ERROR):
                yield
        else:
            yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def plant_sync(t: torch.Tensor) -> None:
    """A host synchronization of the kind the no-sync tests must catch: one element read back."""
    t.reshape(-1)[0].item()
