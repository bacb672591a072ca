"""One decode step's DMS cache bookkeeping: ``decode_update`` (one Triton launch, the triton backends;
``kernel.py``) and ``decode_update_torch`` (the same in torch ops, the hub and flex backends;
``torch_ops.py``); the tests check both through the cache against the visibility rule. ``fused_decode_step``
(``fused_step.py``) folds the q/k norms, the decision and RoPE into the same launch, from the fused
q/k/v projection; ``naive.py`` holds its fp64 reference (tests only)."""

from dms_perf.ops.cache_update.fused_step import fused_decode_step
from dms_perf.ops.cache_update.kernel import decode_update
from dms_perf.ops.cache_update.torch_ops import decode_update_torch

__all__ = ["decode_update", "decode_update_torch", "fused_decode_step"]
