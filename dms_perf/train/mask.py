"""The DMS rule made differentiable: relaxed eviction decisions and the additive attention mask of training.

docs/DMS.md, "Who is visible": query i sees key j iff ``j <= i`` and (``i - j <= window`` or token j is not
evicted), where token j is evicted by token j+1's decision. Training replaces the hard decision of token
t+1 by a probability ``p[t]`` (Gumbel-sigmoid of its logit) and adds ``log(1 - p[j])`` to the attention
logit of every key j older than the window; keys within the window get 0, future keys ``-inf``. With hard
0/1 decisions this is ``visibility_mask`` written as 0 / ``-inf`` (tests/train/test_forward.py checks the
equality element by element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dms_perf.rule import evict_flags


def logistic_noise(shape, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """fp32 logistic noise ``log(u) - log(1 - u)``, u uniform in (0, 1): the difference of two Gumbel
    samples, which makes ``sigmoid((logit + noise) / tau)`` a Gumbel-sigmoid (binary Concrete) sample."""
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
    return torch.log(u) - torch.log1p(-u)


def relaxed_evictions(
    logits: torch.Tensor, tau: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft decisions from decision logits ``a * dms_alpha_scale - dms_initial_alpha_offset``.

    Args:
        logits: fp32 ``[..., N]``, one per token (token t's logit decides about token t-1).
        tau: the Gumbel-sigmoid temperature (> 0); small tau makes the samples nearly 0/1.
        noise: logistic noise of ``logits``' shape, or None for the noiseless sigmoid.

    Returns:
        ``(evict_prob, keep_log)``: ``evict_prob[..., j] = sigmoid((logits[..., j+1] + noise) / tau)`` for
        ``j < N - 1``, the soft version of ``evict_flags`` (``[..., N - 1]``: the first token's decision
        evicts nothing); ``keep_log[..., j] = log(1 - evict_prob[..., j])`` (``[..., N]``, computed as
        ``logsigmoid(-x)`` so that it stays finite and exact where ``p`` rounds to 1), 0 for the newest
        token, which has no decision yet.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    x = logits[..., 1:] if noise is None else logits[..., 1:] + noise[..., 1:]
    x = x / tau
    keep_log = F.pad(F.logsigmoid(-x), (0, 1), value=0.0)
    return torch.sigmoid(x), keep_log


def hard_keep_log(decisions: torch.Tensor) -> torch.Tensor:
    """``keep_log`` of hard bool decisions ``[..., N]``: 0 for a kept token, ``-inf`` for an evicted one
    (``evict_flags``: token j is evicted iff ``decisions[..., j + 1]``)."""
    evicted = evict_flags(decisions)
    return torch.zeros(evicted.shape, dtype=torch.float32, device=decisions.device).masked_fill(evicted, float("-inf"))


def training_mask(keep_log: torch.Tensor, window: int) -> torch.Tensor:
    """The additive attention mask of a prefill over N tokens, ``[..., N, N]`` (queries x keys), fp32.

    ``mask[..., i, j]`` is ``-inf`` for ``j > i``, 0 for ``0 <= i - j <= window`` and ``keep_log[..., j]``
    for ``i - j > window`` (docs/DMS.md, "Who is visible"; ``keep_log`` from ``relaxed_evictions`` or
    ``hard_keep_log``). Differentiable with respect to ``keep_log``.
    """
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    n = keep_log.shape[-1]
    i = torch.arange(n, device=keep_log.device)[:, None]
    j = torch.arange(n, device=keep_log.device)[None, :]
    older = (i - j) > window  # implies j < i
    zero = torch.zeros((), dtype=keep_log.dtype, device=keep_log.device)
    mask = torch.where(older, keep_log[..., None, :], zero)
    return mask.masked_fill(j > i, float("-inf"))
