"""Readable fp64 reference of ``fused_step.fused_decode_step`` (tests only; production never calls it)."""

from __future__ import annotations

import torch


def fused_step_reference(qkv, q_norm_weight, k_norm_weight, eps: float, cos, sin, *, num_kv_heads: int,
                         head_dim: int, alpha_scale: float, alpha_offset: float, zero_borrowed: bool = True):
    """The decode step's norms, decisions and RoPE, in fp64, written out from their definitions.

    Returns ``(q [B, Hq, D], k [B, Hkv, 1, D], v [B, Hkv, 1, D], decisions [B, Hkv, 1] bool)``: the
    rotated query (borrowed channels zeroed before and after RoPE), the rotated key and the value the
    cache stores, and the new tokens' decisions (``a * alpha_scale - alpha_offset > 0``).
    """
    batch = qkv.shape[0]
    x = qkv.reshape(batch, -1, head_dim).double()
    num_q_heads = x.shape[1] - 2 * num_kv_heads
    group = num_q_heads // num_kv_heads
    q, k, v = x[:, :num_q_heads], x[:, num_q_heads:num_q_heads + num_kv_heads], x[:, num_q_heads + num_kv_heads:]

    def rms_norm(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    def rope(t):
        c, s = cos.reshape(batch, 1, head_dim).double(), sin.reshape(batch, 1, head_dim).double()
        first, second = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return t * c + torch.cat([-second, first], dim=-1) * s

    q, k = rms_norm(q, q_norm_weight), rms_norm(k, k_norm_weight)
    decisions = q[:, ::group, -1] * alpha_scale - alpha_offset > 0
    if zero_borrowed:
        q[:, ::group, -1] = 0
    q, k = rope(q), rope(k)
    if zero_borrowed:
        q[:, ::group, -1] = 0
    return q, k[:, :, None], v[:, :, None].clone(), decisions[:, :, None]
