"""Liger-Kernel's fused RMSNorm / SwiGLU / RoPE on a Qwen3-DMS model: the same results as transformers'
modules, only the given instance patched, and a clean fallback where the kernels cannot run."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from dms_perf._runtime import HAS_CUDA
from dms_perf.model.fused import apply_fused_kernels, fused_kernels_unavailable
from dms_perf.model.qwen3_dms import Qwen3DMSAttention, build_model, tiny_config
from dms_perf.testing import rel_error

STEPS = 16


def _greedy(model, ids, steps):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.skipif(HAS_CUDA, reason="the fallback path: a machine without CUDA")
def test_falls_back_to_transformers_modules_without_cuda():
    model = build_model(tiny_config(), backend="triton")
    assert fused_kernels_unavailable() is not None
    assert apply_fused_kernels(model) is False and model.dms_fused_kernels is False
    assert all(layer.self_attn.rotary_fn is Qwen3DMSAttention.rotary_fn for layer in model.model.layers)
    assert all(type(layer.mlp) is modeling_qwen3.Qwen3MLP for layer in model.model.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_fused_model_matches_unfused_gpu(backend):
    if (why := fused_kernels_unavailable()) is not None:
        pytest.skip(why)
    config = tiny_config(head_dim=128, num_attention_heads=8, num_key_value_heads=2, dms_window_size=32)
    plain = build_model(config, backend=backend, device="cuda", dtype=torch.float32)
    fused = build_model(config, backend=backend, device="cuda", dtype=torch.float32)
    classes = (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP, modeling_qwen3.apply_rotary_pos_emb)
    assert apply_fused_kernels(fused) is True
    # Only this instance changed: transformers' module-level classes are what they were.
    assert (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP, modeling_qwen3.apply_rotary_pos_emb) == classes
    assert all(layer.self_attn.rotary_fn is not Qwen3DMSAttention.rotary_fn for layer in fused.model.layers)
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        want = plain(ids).logits
        got = fused(ids).logits
    assert rel_error(got, want) < 1e-4
    assert torch.equal(_greedy(fused, ids, STEPS), _greedy(plain, ids, STEPS))
