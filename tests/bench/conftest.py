"""Fixtures shared by the bench tests."""

from __future__ import annotations

import pytest
import torch

from dms_perf._runtime import default_device
from dms_perf.bench.methods import load_model_for


@pytest.fixture(scope="module")
def tiny_models():
    """``get(method)``: one tiny model per backend (DMS calibrated to 8x), built once per test module."""
    built = {}

    def get(method):
        if method.backend not in built:
            built[method.backend] = load_model_for("tiny", method, dtype=torch.float32, device=default_device(),
                                                   target_cr=8)[0]
        return built[method.backend]

    return get
