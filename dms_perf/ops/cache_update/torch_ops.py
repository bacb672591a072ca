"""One decode step's DMS cache bookkeeping in torch ops (docs/DMS.md, "Cache and decode").

Production code: ``DMSCacheLayer.decode`` runs it for the hub and flex backends (about 15 small ops, no read
back to the host); ``kernel.decode_update`` does the same in one Triton launch for the triton backend.
The tests check both through the cache against the visibility rule.
"""

from __future__ import annotations

import torch


def decode_update_torch(
    ring_slot, ring_flag, lengths, starts, k_cache, v_cache, keys, values, decisions, t: int, window: int
) -> None:
    """The step in torch ops: ring ``[B, Hkv, window + 1]`` (slot int64, flag bool), ``lengths`` int32 and
    ``starts`` int64 ``[B, Hkv]``, caches ``[S, D]``, new ``keys`` / ``values`` ``[B, Hkv, 1, D]`` and
    ``decisions`` bool ``[B, Hkv, 1]`` of token ``t``. Updates the ring, lengths and caches in place."""
    w1 = window + 1
    ring_flag[:, :, (t - 1) % w1] = decisions[:, :, 0]
    leaving = t % w1
    reuse = ring_flag[:, :, leaving]  # a view, consumed before the entry is cleared
    slot = torch.where(reuse, ring_slot[:, :, leaving], lengths.long())
    lengths += (~reuse).to(torch.int32)
    ring_slot[:, :, leaving] = slot
    ring_flag[:, :, leaving] = False
    rows = (starts + slot).flatten()
    k_cache.index_copy_(0, rows, keys.reshape(-1, keys.shape[-1]))
    v_cache.index_copy_(0, rows, values.reshape(-1, values.shape[-1]))
