"""Readable reference of the fused prefill's prep launch (tests only; nothing in dms_perf/ or
benchmarks/ imports it).

The attention itself is checked against ``math_impl.math_attention``, the ``"math"`` implementation: a
production backend (``impl="math"``, the model's "math" backend) that the tests also use as their fp64
ground truth. A copy of it here would share its one assumption, the rule's ``visibility_mask``, which
tests/test_rule.py checks against hand-worked examples.
"""

from __future__ import annotations

import torch

from dms_perf.rule import evict_flags


def prep_reference(k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor):
    """Readable reference of ``dms_prep``: ``(kept K rows, kept V rows, kept_upto)``, the kept rows
    as one list entry per (b, h) (``k[b, h][keep[b, h]]``), ``kept_upto = cumsum(keep)`` int32."""
    keep = ~evict_flags(decisions)
    batch, num_kv_heads = keep.shape[:2]
    k_rows = [k[b, h][keep[b, h]] for b in range(batch) for h in range(num_kv_heads)]
    v_rows = [v[b, h][keep[b, h]] for b in range(batch) for h in range(num_kv_heads)]
    return k_rows, v_rows, torch.cumsum(keep, dim=-1, dtype=torch.int32)
