"""The readable reference of DMS prefill attention: a dense masked softmax in fp32/fp64 (tests only,
and the model's "math" reference backend)."""

from __future__ import annotations

import torch

from dms_perf.rule import evict_flags, visibility_mask

# Elements (B * Hq * query rows * keys) of one query chunk: the fp32/fp64 scores and their softmax.
MATH_CHUNK_ELEMENTS = 2**28


def math_attention(q, k, v, decisions, window, scale, compute_dtype=None):
    """Dense masked softmax, one query chunk at a time; returns ``(out, lse)``.

    The queries are the newest ``q.shape[2]`` of the ``k.shape[2]`` tokens (all of them in a prefill;
    the last one in a decode step); ``decisions`` covers all ``k.shape[2]`` tokens. Computed in
    ``compute_dtype`` (default: fp32, or fp64 for fp64 inputs; tests also run it in the input dtype to
    measure what plain torch loses at that precision). ``out`` has q's dtype.
    """
    if compute_dtype is None:
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
    batch, num_q_heads, n, _ = q.shape
    offset = k.shape[2] - n  # position of the first query
    group = num_q_heads // k.shape[1]
    keys = k.to(compute_dtype).repeat_interleave(group, dim=1)
    values = v.to(compute_dtype).repeat_interleave(group, dim=1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, n), dtype=torch.float32, device=q.device)
    rows = max(1, MATH_CHUNK_ELEMENTS // (batch * num_q_heads * k.shape[2]))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        visible = visibility_mask(decisions, window, end - start, offset + end, query_offset=offset + start)
        visible = visible.repeat_interleave(group, dim=1)
        scores = (q[:, :, start:end].to(compute_dtype) @ keys[:, :, : offset + end].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[:, :, start:end] = torch.logsumexp(scores, dim=-1).float()
        out[:, :, start:end] = (torch.softmax(scores, dim=-1) @ values[:, :, : offset + end]).to(q.dtype)
    return out, lse


def prep_reference(k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor):
    """Readable reference of ``dms_prep``: ``(kept K rows, kept V rows, kept_upto)``, the kept rows
    as one list entry per (b, h) (``k[b, h][keep[b, h]]``), ``kept_upto = cumsum(keep)`` int32."""
    keep = ~evict_flags(decisions)
    batch, num_kv_heads = keep.shape[:2]
    k_rows = [k[b, h][keep[b, h]] for b in range(batch) for h in range(num_kv_heads)]
    v_rows = [v[b, h][keep[b, h]] for b in range(batch) for h in range(num_kv_heads)]
    return k_rows, v_rows, torch.cumsum(keep, dim=-1, dtype=torch.int32)
