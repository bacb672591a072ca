"""One decode step's DMS cache bookkeeping: ``decode_update`` (one Triton launch, the triton backends)
and ``decode_update_torch`` (the same in torch ops, the hub and flex backends). Both live in
``kernel.py``; the tests check them through the cache against the visibility rule."""

from dms_perf.ops.cache_update.kernel import decode_update, decode_update_torch

__all__ = ["decode_update", "decode_update_torch"]
