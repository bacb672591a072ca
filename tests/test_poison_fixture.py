"""The poisoning fixture (tests/conftest.py) must not break ``with torch.device(...)`` model building."""

import torch

from dms_perf.dms.model import build_model, tiny_config


def test_build_model_places_every_parameter_on_the_requested_device_under_poisoning():
    model = build_model(tiny_config(), backend="hub", device=torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
