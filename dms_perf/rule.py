"""The DMS decisions and visibility rule (docs/DMS.md, "Decisions" and "Who is visible").

Every prefill implementation (``dms_perf.ops.prefill``) and every reference builds its mask from
``visibility_mask`` here, so the rule is written exactly once.
"""

from __future__ import annotations

import torch


def dms_decisions(
    q_pre_rope: torch.Tensor, num_kv_heads: int, alpha_scale: float, alpha_offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eviction decisions read from the queries, as the released checkpoint does (docs/DMS.md).

    Args:
        q_pre_rope: ``[B, Hq, N, D]`` floating queries after ``q_norm``, before RoPE.
        num_kv_heads: Hkv; ``Hq`` must be a multiple of it (G = Hq // Hkv query heads per KV head).
        alpha_scale, alpha_offset: ``dms_alpha_scale`` and ``dms_initial_alpha_offset`` (100.0, 5.0).

    Returns:
        ``(decisions, q)``: ``decisions`` bool ``[B, Hkv, N]`` with
        ``decisions[b, h, t] = q_pre_rope[b, h * G, t, D - 1] * alpha_scale - alpha_offset > 0``
        (computed in fp32; token t's decision marks token t-1), and ``q`` a copy of ``q_pre_rope``
        whose borrowed channel (last channel of query heads ``h * G``) is zero, so that it takes no
        part in attention scores. The input is not modified.
    """
    if not isinstance(q_pre_rope, torch.Tensor) or not q_pre_rope.dtype.is_floating_point:
        raise TypeError(f"q_pre_rope must be a floating tensor, got {_describe(q_pre_rope)}")
    if q_pre_rope.dim() != 4:
        raise ValueError(f"q_pre_rope must be [B, Hq, N, D], got shape {tuple(q_pre_rope.shape)}")
    num_q_heads = q_pre_rope.shape[1]
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads must be a positive divisor of Hq={num_q_heads}, got {num_kv_heads!r}"
        )
    group = num_q_heads // num_kv_heads
    decisions = decisions_from_alphas(decision_alphas(q_pre_rope, num_kv_heads), alpha_scale, alpha_offset)
    q = q_pre_rope.clone()
    q[:, ::group, :, -1] = 0
    return decisions, q


def decision_alphas(q_pre_rope: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``a`` of every decision, fp32 ``[B, Hkv, N]``: the last channel of each group's first query head.
    Always a copy (also for fp32 input), so the caller may zero that channel afterwards."""
    group = q_pre_rope.shape[1] // num_kv_heads
    return q_pre_rope[:, ::group, :, -1].to(torch.float32, copy=True)


def decisions_from_alphas(alphas: torch.Tensor, alpha_scale: float, alpha_offset: float) -> torch.Tensor:
    """bool decisions from fp32 ``a`` values: ``a * alpha_scale - alpha_offset > 0`` (the Triton decode
    step, ``dms_perf.ops.cache_update.kernel``, computes the same on the device)."""
    return alphas * alpha_scale - alpha_offset > 0


def evict_flags(decisions: torch.Tensor) -> torch.Tensor:
    """``evict[..., j] = decisions[..., j + 1]``; the newest token has no decision yet and is kept."""
    evict = torch.zeros_like(decisions)
    evict[..., :-1] = decisions[..., 1:]
    return evict


def visibility_mask(
    decisions: torch.Tensor, window: int, n_queries: int, n_keys: int, query_offset: int = 0
) -> torch.Tensor:
    """Which keys each query sees, bool ``[B, Hkv, n_queries, n_keys]`` (docs/DMS.md).

    ``decisions`` is bool ``[B, Hkv, N]``, the decisions of the whole sequence (so the newest token,
    N - 1, is kept). Query row r is token ``i = query_offset + r``; key column j is token
    ``j < n_keys <= N``. Query i sees key j iff ``j <= i`` and (``i - j <= window`` or token j is not
    evicted, i.e. not ``decisions[..., j + 1]``).
    """
    if n_keys > decisions.shape[-1]:
        raise ValueError(f"decisions cover {decisions.shape[-1]} tokens, fewer than n_keys={n_keys}")
    device = decisions.device
    i = torch.arange(query_offset, query_offset + n_queries, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    causal = j <= i
    in_window = (i - j) <= window
    kept = ~evict_flags(decisions)[..., :n_keys]
    return causal & (in_window | kept[..., None, :])


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of dtype {x.dtype} on {x.device}"
    return type(x).__name__


def count_visible_pairs(decisions: torch.Tensor, window: int) -> int:
    """Number of visible (query, key) pairs of a prefill, summed over batch and KV heads.

    The count of ``visibility_mask(decisions, window, N, N)`` without building it: query i sees the
    ``min(i, window) + 1`` keys of its window plus the kept keys at positions ``< i - window``.
    Multiply by the query heads per KV head for attention FLOPs.
    """
    n = decisions.shape[-1]
    i = torch.arange(n, device=decisions.device)
    in_window = int((torch.clamp(i, max=window) + 1).sum()) * decisions[..., 0].numel()
    if n <= window + 1:
        return in_window
    kept_upto = torch.cumsum(~evict_flags(decisions), dim=-1)
    # Query i >= window + 1 adds the kept keys among positions 0 .. i - window - 1.
    return in_window + int(kept_upto[..., : n - window - 1].sum())
