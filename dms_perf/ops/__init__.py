"""The ops: Triton kernels with launchers that validate their input, and a readable reference beside
each (``<op>/naive.py``, used by tests only). Ops import nothing from ``dms_perf.model`` or
``dms_perf.bench``.

``movers``: ``left_pad_2d``, ``scatter_by_index``, ``bool_gather_left_pad``, ``compact_by_bool``.
``prefill``: ``dms_prefill_attention`` (triton, hub-triton, hub, flex, math).
``decode``: ``dms_decode_attention``, ``hub_decode_attention``.
``cache_update``: ``decode_update`` (one decode step's cache bookkeeping).
"""

from dms_perf.ops.cache_update import decode_update
from dms_perf.ops.decode import dms_decode_attention, hub_decode_attention
from dms_perf.ops.movers import bool_gather_left_pad, compact_by_bool, left_pad_2d, scatter_by_index
from dms_perf.ops.prefill import dms_prefill_attention

__all__ = [
    "bool_gather_left_pad",
    "compact_by_bool",
    "decode_update",
    "dms_decode_attention",
    "dms_prefill_attention",
    "hub_decode_attention",
    "left_pad_2d",
    "scatter_by_index",
]
