"""The readable reference of DMS decode attention (tests only)."""

from __future__ import annotations

import torch


def dms_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """What :func:`dms_decode_attention` computes, written as literally as possible: for every query
    head ``h * G + g`` of every sequence b, softmax attention over exactly the ``lengths[b, h]`` rows of
    the caches from ``starts[b, h]`` (read on the host, one head at a time; no length bound at all, so
    nothing is cut short). A head of length 0 gives zeros.

    Computed and returned in ``compute_dtype``: fp64 for the truth; the input dtype measures what
    plain torch loses at that precision (the tests' tolerance rule, ``tests/ops/accuracy.py``).
    """
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // starts.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    firsts, counts = starts.tolist(), lengths.tolist()
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=compute_dtype, device=q.device)
    for b in range(batch):
        for hq in range(num_q_heads):
            first, n = firsts[b][hq // group], counts[b][hq // group]
            if n <= 0:
                continue
            keys = k_cache[first : first + n].to(compute_dtype)
            values = v_cache[first : first + n].to(compute_dtype)
            probs = torch.softmax((keys @ q[b, hq].to(compute_dtype)) * scale, dim=0)
            out[b, hq] = probs @ values
    return out
