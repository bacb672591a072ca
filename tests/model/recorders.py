"""Test helpers that watch a Qwen3-DMS model from outside (forward hooks), independently of its code."""

from __future__ import annotations


def record_decisions(model):
    """Decisions of every layer recomputed from the q_norm outputs (docs/DMS.md), independently of the model."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    recorded = [[] for _ in model.model.layers]
    for layer_idx, layer in enumerate(model.model.layers):
        def grab(_m, _i, q, idx=layer_idx):
            a = q[:, :, ::group, -1].float().transpose(1, 2)  # [B, Hkv, N]
            recorded[idx].append(a * config.dms_alpha_scale - config.dms_initial_alpha_offset > 0)
        layer.self_attn.q_norm.register_forward_hook(grab)
    return recorded
