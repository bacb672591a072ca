"""The ops: Triton kernels with launchers that validate their input, the torch baselines production and
the benchmarks run (``prefill/hub.py``, ``prefill/math_impl.py``, ``decode/hub.py``,
``cache_update/torch_ops.py``, ``movers/baseline.py``), and the readable references of the tests
(``<op>/naive.py``: tests only, imported by nothing in dms_perf/ or benchmarks/, as tests/test_layers.py
checks). Ops import nothing from ``dms_perf.model`` or ``dms_perf.bench``.

``movers``: ``left_pad_2d``, ``scatter_by_index``, ``bool_gather_left_pad``, ``compact_by_bool``.
``prefill``: ``dms_prefill_attention`` (triton, hub-triton, hub, flex, math).
``decode``: ``dms_decode_attention``, ``hub_decode_attention``.
``cache_update``: ``decode_update`` (one decode step's cache bookkeeping; ``decode_update_torch`` in torch
ops), ``fused_decode_step`` (the step's norms, decision and RoPE folded in).
``activation``: ``silu_mul`` (SwiGLU's activation on the fused gate/up projection).
``linear``: ``skinny_linear`` (a decode step's projections for up to 32 rows, with a residual or SwiGLU's
activation in the epilogue) and ``decode_linear`` (it or cuBLAS, chosen per projection).
"""

from dms_perf.ops.activation import silu_mul
from dms_perf.ops.cache_update import decode_update, fused_decode_step
from dms_perf.ops.decode import dms_decode_attention, hub_decode_attention
from dms_perf.ops.linear import decode_linear, skinny_linear
from dms_perf.ops.movers import bool_gather_left_pad, compact_by_bool, left_pad_2d, scatter_by_index
from dms_perf.ops.prefill import dms_prefill_attention

__all__ = [
    "bool_gather_left_pad",
    "compact_by_bool",
    "decode_linear",
    "decode_update",
    "fused_decode_step",
    "dms_decode_attention",
    "dms_prefill_attention",
    "hub_decode_attention",
    "left_pad_2d",
    "scatter_by_index",
    "silu_mul",
    "skinny_linear",
]
