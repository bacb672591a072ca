"""DMS prefill attention with PyTorch FlexAttention and a DMS ``mask_mod``, chunked over queries."""

from __future__ import annotations

import functools
import warnings

import torch

from dms_perf.rule import evict_flags

# Elements (B * Hkv * query rows * keys) of the bool mask that create_block_mask materializes per chunk.
FLEX_CHUNK_ELEMENTS = 2**30
# Compiled FlexAttention finds no kernel for fewer tokens than its 128-token block: shorter inputs are
# padded.
FLEX_MIN_TOKENS = 128


def flex_attention(q, k, v, decisions, window, scale, return_lse):
    """FlexAttention with a DMS ``mask_mod`` over query chunks; returns ``(out, lse or None)``.

    Building one block mask over all N x N pairs eagerly runs out of memory at 16K on an 80 GB card,
    so each chunk of queries gets its own block mask. Heads are laid out in pages (one per KV head,
    as the hub does), so the mask is evaluated once per KV head, not once per query head. On CUDA the
    block masks are built by compiled code (as FlexAttention is meant to be used): every chunk has the
    same shape (its queries x all N keys) and reads its query offset from a device tensor, so the
    build compiles once per shape (twice at most: the last chunk may be shorter), not once per chunk.
    """
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    batch, num_q_heads, n, head_dim = q.shape
    if n < FLEX_MIN_TOKENS:
        # Padded keys come after every real query, so the causal rule hides them (and their decisions
        # are False, as the newest token's is); the padded query rows are dropped.
        pad = FLEX_MIN_TOKENS - n
        q, k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], pad, t.shape[3])], dim=2) for t in (q, k, v))
        decisions = torch.cat([decisions, decisions.new_zeros(*decisions.shape[:2], pad)], dim=2)
        out, lse = flex_attention(q, k, v, decisions, window, scale, return_lse)
        return out[:, :, :n], (lse[:, :, :n] if return_lse else None)
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    # Page-batch layout, as the hub: one batch entry per (b, KV head) holding its G query heads and its
    # one K/V head. The block mask then has B * Hkv "heads" of masks instead of B * Hq (the rule depends
    # on the KV head only): G times less mask to evaluate.
    pages = batch * num_kv_heads
    q_pages = q.reshape(pages, group, n, head_dim)
    k_pages = k.reshape(pages, 1, n, head_dim)
    v_pages = v.reshape(pages, 1, n, head_dim)
    evict = evict_flags(decisions).reshape(pages, n)
    on_cuda = q.device.type == "cuda"
    attend = _flex_attention_fn(on_cuda)
    rows = max(128, (FLEX_CHUNK_ELEMENTS // (pages * n)) // 128 * 128)
    out = torch.empty((pages, group, n, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((pages, group, n), dtype=torch.float32, device=q.device) if return_lse else None
    # Position of the chunk's first query; updated in place, in stream order with the kernels reading it.
    offset = torch.zeros((), dtype=torch.int64, device=q.device)

    def dms_mask(b, h, q_idx, kv_idx):
        i = q_idx + offset
        return (kv_idx <= i) & ((i - kv_idx <= window) | ~evict[b, kv_idx])

    for start in range(0, n, rows):
        end = min(start + rows, n)
        offset.fill_(start)
        with warnings.catch_warnings():  # _compile=True is deprecated in newer torch, still supported
            warnings.simplefilter("ignore", DeprecationWarning)
            block_mask = create_block_mask(dms_mask, pages, 1, end - start, n, device=q.device, _compile=on_cuda)
        result = attend(
            q_pages[:, :, start:end],
            k_pages,
            v_pages,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=True,
            return_aux=AuxRequest(lse=True) if return_lse else None,
        )
        if return_lse:
            out[:, :, start:end], lse[:, :, start:end] = result[0], result[1].lse
        else:
            out[:, :, start:end] = result
    out = out.reshape(batch, num_q_heads, n, head_dim)
    return out, (lse.reshape(batch, num_q_heads, n) if return_lse else None)


@functools.cache
def _flex_attention_fn(on_cuda: bool):
    """flex_attention compiled once (dynamic shapes: every chunk length reuses it); eager on CPU.

    Runs under ``torch.no_grad()``: the prefill is inference only (no impl offers a backward), so
    compile traces no autograd path.
    """
    from torch.nn.attention.flex_attention import flex_attention as flex

    if not on_cuda:
        return flex
    compiled = torch.compile(flex, dynamic=True)

    def attend(*args, **kwargs):
        with torch.no_grad():
            return compiled(*args, **kwargs)

    return attend
