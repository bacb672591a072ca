"""The hub backends' decode attention: torch's SDPA over each head's occupied cache rows.

The released code decodes with ``flash_attn_with_kvcache`` over its paged pool, one key length per
(batch, KV head). Without flash-attn, this is the same computation in torch: gather every head's rows
into a ``[B * Hkv, 1, L, D]`` page batch (L = the host-known bound of the lengths), hide the rows past
each head's length with a key mask, and run one SDPA call whose G query heads share the head's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hub_decode_attention(q, k_cache, v_cache, starts, lengths, max_length: int, *, scale: float) -> torch.Tensor:
    """Arguments as ``dms_decode_attention`` (q ``[B, Hq, D]``, flat caches ``[S, D]``, starts/lengths
    ``[B, Hkv]``); returns ``[B, Hq, D]`` in q's dtype. A head of length 0 gives zeros, as there: its
    key mask is all False, and SDPA returns zeros for a fully masked row since torch 2.5 (pytorch#131060;
    tests/ops/test_decode.py::test_hub_decode_matches_reference pins it), so no extra op is spent on it.

    Unlike ``dms_decode_attention``, ``max_length`` must be an upper bound of every length: it is the
    width of the gathered page batch, so a head's rows past it are not read (the result would be that
    of a truncated head). Finding the true maximum would cost a host sync per step; the model passes the
    cache's ``longest_bound``, which is such a bound.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = starts.shape[1]
    pages = batch * num_kv_heads
    offsets = torch.arange(max_length, device=q.device)
    rows = (starts.reshape(pages, 1) + offsets).clamp(max=k_cache.shape[0] - 1)
    occupied = offsets < lengths.reshape(pages, 1)
    # Free rows may hold anything, NaN included: zeroed, so that no NaN score or 0 * NaN reaches the output.
    free = ~occupied[:, None, :, None]
    keys = k_cache[rows].unsqueeze(1).masked_fill(free, 0)  # [pages, 1, L, D]
    values = v_cache[rows].unsqueeze(1).masked_fill(free, 0)
    query = q.reshape(pages, num_q_heads // num_kv_heads, 1, head_dim)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=occupied[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.reshape(batch, num_q_heads, head_dim)
