"""The ``"math"`` prefill implementation: a dense masked softmax in fp32/fp64, in query chunks.

Production code: ``dms_prefill_attention(impl="math")`` and the model's "math" backend (the reference
model) run it. The tests also use it in fp64 as the ground truth of every other implementation; its
mask is the rule's ``visibility_mask`` (docs/DMS.md, "Who is visible"), checked on its own in
tests/test_rule.py.
"""

from __future__ import annotations

import torch

from dms_perf.rule import visibility_mask

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

