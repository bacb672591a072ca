"""Calibrate a random-weight Qwen3-DMS to a target compression ratio (docs/DMS.md, "Random weights").

With random weights about half of the tokens get marked, not ``1 - 1/cr``. ``calibrate_dms`` sets the
one global ``dms_initial_alpha_offset`` so that the fraction of marked (token, layer, KV head)
decisions on a calibration prompt is ``1 - 1/target_cr``: the offset is the ``1/target_cr`` quantile
of ``a * dms_alpha_scale`` over all decisions. Eviction changes the hidden states of later layers and
so their ``a``; a few fixed-point rounds (measure ``a`` under the current offset, re-take the
quantile) settle it. Every result obtained this way must say so, with the achieved ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_perf.model.qwen3_dms import Qwen3DMSForCausalLM
from dms_perf.rule import decision_alphas


@dataclass(frozen=True)
class Calibration:
    alpha_offset: float
    marked_fraction: float
    target_cr: float
    # Whose decision rows the offset was found on: the model's own, or rows drawn at random
    # (``draw_decision_rows``) because the checkpoint's were all zero.
    decision_rows: str = "the model's"

    @property
    def compression_ratio(self) -> float:
        """Tokens seen per token kept, ignoring the window: ``1 / (1 - marked_fraction)``."""
        return 1.0 / max(1.0 - self.marked_fraction, 1e-12)


def decision_rows_are_zero(model) -> bool:
    """Whether every layer's decision rows of ``q_proj`` (the borrowed channel, docs/DMS.md "Decisions") are zero:
    a base checkpoint made for a DMS retrofit (``dms_perf.train.pretrain``), whose decisions cannot tell tokens
    apart, so no offset can calibrate them to a ratio."""
    from dms_perf.train.retrofit import borrowed_rows

    rows = borrowed_rows(model.config)
    projections = [layer.self_attn.q_proj for layer in model.model.layers]
    return all(not q.weight[rows].any() and (q.bias is None or not q.bias[rows].any()) for q in projections)


def draw_decision_rows(model, seed: int) -> None:
    """Write decision rows drawn at random into every layer's ``q_proj`` (in place, so fused projections, whose
    ``q_proj`` is a view, see them): normal with the config's ``initializer_range``, as a random-weight model's,
    from a CPU generator of ``seed`` (the same rows on every device). Untrained DMS on a base checkpoint: the
    decisions read a random projection of the hidden state. Undo with
    ``dms_perf.train.retrofit.zero_borrowed_channel``."""
    from dms_perf.train.retrofit import borrowed_rows

    rows = borrowed_rows(model.config)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.q_proj.weight
            drawn = torch.randn(len(rows), weight.shape[1], generator=generator, dtype=torch.float32) * std
            weight[rows] = drawn.to(device=weight.device, dtype=weight.dtype)


def _alpha_logits(model: Qwen3DMSForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """``a * dms_alpha_scale`` of every decision (all layers, KV heads, tokens) on ``input_ids``, fp32."""
    num_kv_heads = model.config.num_key_value_heads
    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, q_normed):  # q_norm's output is [B, N, Hq, D]
        captured.append(decision_alphas(q_normed.transpose(1, 2), num_kv_heads).flatten())

    hooks = [layer.self_attn.q_norm.register_forward_hook(grab) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(captured) * model.config.dms_alpha_scale


def calibrate_dms(
    model: Qwen3DMSForCausalLM,
    target_cr: float = 8,
    input_ids: torch.Tensor | None = None,
    *,
    num_tokens: int = 1024,
    rounds: int = 4,
    seed: int = 0,
) -> Calibration:
    """Set ``model.config.dms_initial_alpha_offset`` so ``1 - 1/target_cr`` of the decisions are marks.

    Args:
        model: a Qwen3-DMS model (any backend); its config is modified in place.
        target_cr: wanted compression ratio (> 1), e.g. 8 for DMS-8x.
        input_ids: ``[B, N]`` calibration prompt; default ``num_tokens`` random ids drawn with ``seed``.
        rounds: fixed-point rounds (see the module docstring).
    Returns:
        the offset set and the marked fraction achieved with it on the calibration prompt.
    """
    if not isinstance(model, Qwen3DMSForCausalLM):
        raise TypeError(f"calibrate_dms needs a Qwen3DMSForCausalLM, got {type(model).__name__}")
    if not target_cr > 1:
        raise ValueError(f"target_cr must be > 1, got {target_cr}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = next(model.parameters()).device
    if input_ids is None:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
    input_ids = input_ids.to(device)

    for _ in range(rounds):
        logits = _alpha_logits(model, input_ids)
        # Marked iff logit - offset > 0: the offset is the quantile below which 1/target_cr of them lie.
        kth = max(1, round(logits.numel() / target_cr))
        model.config.dms_initial_alpha_offset = float(logits.kthvalue(kth).values)
    logits = _alpha_logits(model, input_ids)
    marked = float((logits - model.config.dms_initial_alpha_offset > 0).float().mean())
    return Calibration(model.config.dms_initial_alpha_offset, marked, float(target_cr))
