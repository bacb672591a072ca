"""The poisoning fixture (tests/conftest.py) must poison without breaking device contexts or autograd leaves."""

import torch

from dms_perf.model.qwen3_dms import build_model, tiny_config


def test_build_model_places_every_parameter_on_the_requested_device_under_poisoning():
    model = build_model(tiny_config(), backend="hub", device=torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_poisoned_empty_accepts_requires_grad():
    """Inductor's pattern setup (run by torch.compile, e.g. FlexAttention's compiled block masks) asks
    for ``torch.empty(..., requires_grad=True)``; poisoning it in place must not raise."""
    t = torch.empty(4, requires_grad=True)
    assert t.requires_grad and t.is_leaf
    assert torch.isnan(t).all()
