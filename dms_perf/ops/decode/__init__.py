"""DMS decode attention: one new query token per sequence over the compacted cache.

``dms_decode_attention`` (``kernel.py``): the Triton split-K kernel of the triton backends.
``hub_decode_attention`` (``hub.py``): the hub backends' torch decode. ``naive.py``: the reference (tests only).
"""

from dms_perf.ops.decode.hub import hub_decode_attention
from dms_perf.ops.decode.kernel import dms_decode_attention

__all__ = ["dms_decode_attention", "hub_decode_attention"]
