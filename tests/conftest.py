"""Correctness-test fixtures: every fresh allocation is poisoned so unwritten outputs fail loudly."""

from __future__ import annotations

import pytest
import torch

from dms_perf.testing import poison

try:  # `with torch.device(...)` recognizes factories by identity in a cached set: build it before patching
    from torch.utils._device import _device_constructors

    _device_constructors()
except ImportError:  # pragma: no cover - older/newer torch without this helper
    pass


@pytest.fixture(autouse=True)
def poison_fresh_allocations(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` return NaN (float), -7777 (int) or True (bool) fills.

    Kernels write into ``torch.empty`` outputs; an element they forget stays poisoned and fails the
    comparison with the reference.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
