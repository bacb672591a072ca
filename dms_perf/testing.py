"""Helpers for correctness tests: poisoning, per-dtype tolerances, error metrics."""

from __future__ import annotations

import torch

INT_SENTINEL = -7777


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value no kernel produces (NaN, -7777 or True) and return it."""
    if t.numel() == 0:
        return t
    # no_grad: callers such as inductor's pattern setup ask for leaves with requires_grad=True, which
    # an in-place fill under autograd would reject.
    with torch.no_grad():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype == torch.uint8:
            t.fill_(0xAB)
        else:
            t.fill_(INT_SENTINEL)
    return t


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def teacher_forced_logits(model, ids: torch.Tensor, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Prefill ``ids`` into ``cache``, then feed ``tokens`` [1, T] one by one at explicit positions: the
    fp32 last-position logits of the prefill and of each step, ``[T, vocab]``."""
    with torch.inference_mode():
        logits = [model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()]
        for t in range(tokens.shape[1] - 1):
            position = torch.full((1, 1), ids.shape[1] + t, device=ids.device)
            out = model(tokens[:, t:t + 1], past_key_values=cache, position_ids=position, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.cat(logits)
