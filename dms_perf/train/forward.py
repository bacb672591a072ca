"""The training forward of a Qwen3-DMS model: soft (or hard) eviction decisions in an additive mask.

``dms_training_forward`` runs the model's own modules (embedding, norms, projections, MLPs, head) layer by
layer; only attention differs from the inference forward: decisions are read exactly as
``dms_perf.rule.dms_decisions`` reads them (docs/DMS.md, "Decisions"), the borrowed channel is zeroed
before and after RoPE, and the DMS rule enters as ``dms_perf.train.mask.training_mask`` over the logits of
one dense SDPA call per layer. With ``hard=True`` the mask is the rule's own 0 / ``-inf`` and the logits
equal the inference forward's (tests/train/test_forward.py, against the "math" and "triton" backends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from dms_perf.model.qwen3_dms import Qwen3DMSForCausalLM
from dms_perf.rule import decision_alphas
from dms_perf.train.mask import hard_keep_log, logistic_noise, relaxed_evictions, training_mask


@dataclass
class TrainingForward:
    """What one training forward returns.

    ``logits``: ``[B, N, vocab]``. ``evict_prob``: ``[L, B, Hkv, N - 1]``, the (soft) probability that
    token j is evicted, i.e. token j+1's relaxed decision (hard mode: 0/1), differentiable; the eviction
    penalty averages it. ``evicted``: bool of the same shape, the noiseless hard decisions
    (``logit > 0``) that inference would take on these hidden states: the measured eviction rate.
    """

    logits: torch.Tensor
    evict_prob: torch.Tensor
    evicted: torch.Tensor

    @property
    def eviction_rate(self) -> float:
        """Fraction of tokens marked for eviction (hard decisions, all layers, heads and tokens 0..N-2)."""
        return float(self.evicted.float().mean())


def dms_training_forward(
    model: Qwen3DMSForCausalLM,
    input_ids: torch.Tensor,
    *,
    tau: float = 0.1,
    hard: bool = False,
    generator: torch.Generator | None = None,
    gradient_checkpointing: bool = False,
) -> TrainingForward:
    """Forward ``input_ids`` ``[B, N]`` (no padding, no cache) through ``model`` with the training mask.

    Args:
        model: a Qwen3-DMS model; its config gives ``dms_alpha_scale``, ``dms_initial_alpha_offset`` and
            ``dms_window_size``. Its backend is not used.
        tau: Gumbel-sigmoid temperature of the relaxed decisions.
        hard: take the inference decisions ``logit > 0`` (no noise, no sigmoid): the mask is then exactly
            ``visibility_mask`` as 0 / ``-inf``.
        generator: draws the logistic noise (all layers' noise is drawn before the first layer, so a
            recomputed layer sees the same); None: the global generator on the input's device.
        gradient_checkpointing: recompute each decoder layer in the backward pass instead of keeping its
            activations (the [B, Hq, N, N] mask and scores among them).
    """
    if not isinstance(model, Qwen3DMSForCausalLM):
        raise TypeError(f"dms_training_forward needs a Qwen3DMSForCausalLM, got {type(model).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
    config = model.config
    batch, n = input_ids.shape
    if n < 2:
        raise ValueError(f"a training sequence needs at least 2 tokens, got {n}")
    layers = model.model.layers
    noise = None
    if not hard:
        shape = (len(layers), batch, config.num_key_value_heads, n)
        noise = logistic_noise(shape, generator=generator, device=None if generator else input_ids.device)
        noise = noise.to(input_ids.device)

    hidden = model.model.embed_tokens(input_ids)
    positions = torch.arange(n, device=input_ids.device)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)
    evict_probs, evicted = [], []
    for index, layer in enumerate(layers):
        layer_noise = None if noise is None else noise[index]
        if gradient_checkpointing and torch.is_grad_enabled():
            hidden, prob, marked = checkpoint(
                _decoder_layer, layer, hidden, cos, sin, layer_noise, tau, hard, use_reentrant=False
            )
        else:
            hidden, prob, marked = _decoder_layer(layer, hidden, cos, sin, layer_noise, tau, hard)
        evict_probs.append(prob)
        evicted.append(marked)
    logits = model.lm_head(model.model.norm(hidden))
    return TrainingForward(logits, torch.stack(evict_probs), torch.stack(evicted))


def _decoder_layer(layer, hidden, cos, sin, noise, tau: float, hard: bool):
    """transformers' Qwen3DecoderLayer.forward with the DMS training attention."""
    attention, evict_prob, evicted = _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                noise, tau, hard)
    hidden = hidden + attention
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, evict_prob, evicted


def _attention(attn, x, cos, sin, noise, tau: float, hard: bool):
    config = attn.config
    batch, n, _ = x.shape
    shape = (batch, n, -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads

    # The decision logit, as dms_perf.rule computes it (fp32, same order of operations): differentiable.
    logits = decision_alphas(q, num_kv_heads) * config.dms_alpha_scale - config.dms_initial_alpha_offset
    evicted = logits[..., 1:].detach() > 0
    if hard:
        keep_log = hard_keep_log(logits.detach() > 0)
        evict_prob = evicted.to(logits.dtype)
    else:
        evict_prob, keep_log = relaxed_evictions(logits, tau, noise)

    # The borrowed channel takes no part in the scores: zeroed before RoPE and again after it, which
    # rotates channel D/2 - 1 into it (docs/DMS.md). A product rather than an in-place write keeps autograd
    # free to reuse q_norm's output.
    channels = torch.ones(num_q_heads, 1, attn.head_dim, dtype=q.dtype, device=q.device)
    channels[::group, :, -1] = 0
    q = q * channels
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q = q * channels

    mask = training_mask(keep_log, config.dms_window_size).to(q.dtype)  # [B, Hkv, N, N]
    out = _grouped_attention(q, k, v, mask, attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1)), evict_prob, evicted


def _grouped_attention(q, k, v, mask, scale):
    """SDPA over GQA groups without copying K and V: the G query heads of a KV head become G blocks of
    query rows, each block under the KV head's mask. q ``[B, Hq, N, D]``, k/v/mask per KV head."""
    batch, num_q_heads, n, dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    rows = q.reshape(batch, num_kv_heads, group * n, dim)
    row_mask = mask[:, :, None].expand(batch, num_kv_heads, group, n, n).reshape(batch, num_kv_heads, group * n, n)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=row_mask, scale=scale)
    return out.reshape(batch, num_q_heads, n, dim)
