"""DMS decode attention: one new query token per sequence over the compacted cache.

``dms_decode_attention`` (``kernel.py``): the Triton split-K kernels of the triton backends, over a
contiguous or a paged cache, with per-head or balanced splits. ``hub_decode_attention`` (``hub.py``): the
hub backends' torch decode. ``naive.py``: the references, contiguous and paged (tests only).
"""

from dms_perf.ops.decode.hub import hub_decode_attention
from dms_perf.ops.decode.kernel import dms_decode_attention

__all__ = ["dms_decode_attention", "hub_decode_attention"]
