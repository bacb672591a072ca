"""calibrate_dms reaches the target marked fraction on its calibration prompt."""

from __future__ import annotations

import pytest
import torch

import dms_perf.model.qwen3_dms as dms_model
from dms_perf.model.calibrate import calibrate_dms
from dms_perf.model.qwen3_dms import build_model, tiny_config


@pytest.mark.parametrize("target_cr", [8, 4])
def test_calibration_hits_target_fraction(target_cr, device, monkeypatch):
    model = build_model(tiny_config(), backend="hub", dtype=torch.float32, device=device)
    ids = torch.randint(0, 512, (1, 200), device=device)
    result = calibrate_dms(model, target_cr=target_cr, input_ids=ids)
    assert model.config.dms_initial_alpha_offset == result.alpha_offset
    assert abs(result.marked_fraction - (1 - 1 / target_cr)) <= 0.02
    # The decisions the model then actually applies in a forward pass, recorded at their source.
    applied = []
    real_decisions = dms_model.dms_decisions

    def recording(*args, **kwargs):
        decisions, q = real_decisions(*args, **kwargs)
        applied.append(decisions)
        return decisions, q

    monkeypatch.setattr(dms_model, "dms_decisions", recording)
    with torch.no_grad():
        model(ids, past_key_values=model.make_dms_cache())
    assert len(applied) == model.config.num_hidden_layers
    marked = torch.cat([d.flatten() for d in applied]).float().mean().item()
    assert abs(marked - (1 - 1 / target_cr)) <= 0.02
    assert result.compression_ratio == pytest.approx(1 / (1 - result.marked_fraction))


def test_calibration_rejects_bad_input(device):
    model = build_model(tiny_config(), backend="hub", dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="target_cr"):
        calibrate_dms(model, target_cr=1)
    with pytest.raises(TypeError, match="Qwen3DMSForCausalLM"):
        calibrate_dms(build_model(tiny_config(), backend=None, device=device))
