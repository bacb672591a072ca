"""The released checkpoint's prefill, kept as our "DMS (Hub)" baseline (docs/DMS.md, "The hub algorithm")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dms_perf.rule import visibility_mask

HUB_QUERY_CHUNK = 512


def hub_attention(q, k, v, decisions, window, scale):
    """The released checkpoint's prefill, kept as its "DMS (Hub)" baseline (docs/DMS.md).

    Left-pads the batch with Python loops, runs query chunks of 512, each with a dense boolean mask
    over all keys up to the chunk's end (one per KV head, in the released code's page-batch layout
    ``[B * Hkv, G, N, D]``) and one SDPA call with ``enable_gqa``, then restores the original order
    with another loop. Not optimized on purpose: speedups are measured against it.
    """
    batch, num_q_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    lengths = [n] * batch  # equal lengths: the API takes no padding mask (see dms_prefill_attention)
    padded_len = max(lengths)

    q_pad = q.new_zeros(batch, num_q_heads, padded_len, head_dim)
    k_pad = k.new_zeros(batch, num_kv_heads, padded_len, head_dim)
    v_pad = v.new_zeros(batch, num_kv_heads, padded_len, head_dim)
    decisions_pad = decisions.new_zeros(batch, num_kv_heads, padded_len)
    for b, length in enumerate(lengths):
        q_pad[b, :, padded_len - length :] = q[b]
        k_pad[b, :, padded_len - length :] = k[b]
        v_pad[b, :, padded_len - length :] = v[b]
        decisions_pad[b, :, padded_len - length :] = decisions[b]

    # As the released code: one "page batch" entry per (batch, KV head), holding that head's G query
    # heads and its one K/V head, so each chunk's mask is [B*Hkv, 1, chunk, keys], shared by the G heads.
    page_batch = batch * num_kv_heads
    q_pages = q_pad.reshape(page_batch, group, padded_len, head_dim)
    k_pages = k_pad.reshape(page_batch, 1, padded_len, head_dim)
    v_pages = v_pad.reshape(page_batch, 1, padded_len, head_dim)
    out_pages = torch.empty_like(q_pages)
    for start in range(0, padded_len, HUB_QUERY_CHUNK):
        end = min(start + HUB_QUERY_CHUNK, padded_len)
        mask = visibility_mask(decisions_pad, window, end - start, end, query_offset=start)
        out_pages[:, :, start:end] = F.scaled_dot_product_attention(
            q_pages[:, :, start:end],
            k_pages[:, :, :end],
            v_pages[:, :, :end],
            attn_mask=mask.reshape(page_batch, 1, end - start, end),
            scale=scale,
            enable_gqa=True,
        )

    out_pad = out_pages.reshape(batch, num_q_heads, padded_len, head_dim)
    out = torch.empty_like(q)
    for b, length in enumerate(lengths):
        out[b] = out_pad[b, :, padded_len - length :]
    return out
