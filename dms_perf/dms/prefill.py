"""DMS prefill attention: one public function, four implementations (issue 3, shared/DMS.md).

``"math"``   fp32 dense masked softmax, written for reading: the ground truth of the tests.
``"hub"``    the released checkpoint's algorithm, reproduced faithfully (the "DMS (Hub)" baseline).
``"flex"``   PyTorch FlexAttention with a DMS ``mask_mod``, chunked over queries.
``"triton"`` the fused kernel, ``dms_perf/kernels/prefill_attention.py``.

All four take their mask from ``dms_perf.dms.rule.visibility_mask`` / ``evict_flags``.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from dms_perf._runtime import INTERPRET
from dms_perf.dms.rule import evict_flags, visibility_mask

IMPLS = ("math", "hub", "flex", "triton")
HUB_QUERY_CHUNK = 512
# Elements (B * Hq * query rows * keys) of one query chunk: "math" holds fp32/fp64 scores and
# their softmax; "flex" holds the bool mask that create_block_mask materializes.
MATH_CHUNK_ELEMENTS = 2**28
FLEX_CHUNK_ELEMENTS = 2**30
# Compiled FlexAttention finds no kernel for fewer tokens than its 128-token block (torch 2.11 on an
# H100: NoValidChoicesError at 96 tokens, in fp32 and bf16; 200 tokens work): shorter inputs are padded.
FLEX_MIN_TOKENS = 128
TRITON_HEAD_DIMS = (16, 32, 64, 128)
# The kernel stacks a KV head's query heads into one tile of at least 32 rows.
TRITON_MAX_GROUP = 16


def dms_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decisions: torch.Tensor,
    window: int = 512,
    *,
    impl: str = "triton",
    scale: float | None = None,
    return_lse: bool = False,
):
    """Causal prefill attention under the DMS visibility rule (shared/DMS.md, "Who is visible").

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA); one
            dtype (fp16, bf16, fp32; fp64 for ``"math"`` only) and one device for all three.
        decisions: bool ``[B, Hkv, N]``; ``decisions[..., t]`` is token t's decision, which marks
            token t-1 for eviction. Query i sees key j iff ``j <= i`` and (``i - j <= window`` or not
            ``decisions[..., j + 1]``); the last token is always kept.
        window: the DMS sliding window (``dms_window_size``, 512 in the checkpoint), ``>= 0``.
        impl: ``"triton"`` (fused kernel), ``"flex"``, ``"hub"`` or ``"math"`` (see the module doc).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural-log logsumexp of the scaled visible scores per query row,
            fp32 ``[B, Hq, N]`` (not available for ``"hub"``, whose SDPA calls do not expose it).

    Returns:
        ``out`` shaped and typed like ``q``, or ``(out, lse)`` with ``return_lse``.

    Padding: every sequence of the batch has length N; left-padded batches of different lengths are
    not supported (there is no attention-mask argument): run such sequences one by one.
    """
    _check_inputs(q, k, v, decisions, window, impl, scale, return_lse)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "math":
        out, lse = math_attention(q, k, v, decisions, window, scale)
    elif impl == "hub":
        out, lse = hub_attention(q, k, v, decisions, window, scale), None
    elif impl == "flex":
        out, lse = flex_attention(q, k, v, decisions, window, scale, return_lse)
    else:
        from dms_perf.kernels.prefill_attention import triton_prefill_attention

        out, lse = triton_prefill_attention(q, k, v, decisions, window, scale, return_lse)
    return (out, lse) if return_lse else out


def math_attention(q, k, v, decisions, window, scale, compute_dtype=None):
    """Dense masked softmax, one query chunk at a time; returns ``(out, lse)``.

    The queries are the newest ``q.shape[2]`` of the ``k.shape[2]`` tokens (all of them in a prefill;
    the last one in a decode step); ``decisions`` covers all ``k.shape[2]`` tokens. Computed in
    ``compute_dtype`` (default: fp32, or fp64 for fp64 inputs; tests also run it in the input dtype to
    measure what plain torch loses at that precision). ``out`` has q's dtype.
    """
    if compute_dtype is None:
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
    batch, num_q_heads, n, _ = q.shape
    offset = k.shape[2] - n  # position of the first query
    group = num_q_heads // k.shape[1]
    keys = k.to(compute_dtype).repeat_interleave(group, dim=1)
    values = v.to(compute_dtype).repeat_interleave(group, dim=1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, n), dtype=torch.float32, device=q.device)
    rows = max(1, MATH_CHUNK_ELEMENTS // (batch * num_q_heads * k.shape[2]))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        visible = visibility_mask(decisions, window, end - start, offset + end, query_offset=offset + start)
        visible = visible.repeat_interleave(group, dim=1)
        scores = (q[:, :, start:end].to(compute_dtype) @ keys[:, :, : offset + end].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[:, :, start:end] = torch.logsumexp(scores, dim=-1).float()
        out[:, :, start:end] = (torch.softmax(scores, dim=-1) @ values[:, :, : offset + end]).to(q.dtype)
    return out, lse


def hub_attention(q, k, v, decisions, window, scale):
    """The released checkpoint's prefill, kept as its "DMS (Hub)" baseline (shared/DMS.md).

    Left-pads the batch with Python loops, runs query chunks of 512, each with a dense boolean mask
    over all keys up to the chunk's end (one per KV head, in the released code's page-batch layout
    ``[B * Hkv, G, N, D]``) and one SDPA call with ``enable_gqa``, then restores the original order
    with another loop. Not optimized on purpose: speedups are measured against it.
    """
    batch, num_q_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    lengths = [n] * batch  # equal lengths: the API takes no padding mask (see dms_prefill_attention)
    padded_len = max(lengths)

    q_pad = q.new_zeros(batch, num_q_heads, padded_len, head_dim)
    k_pad = k.new_zeros(batch, num_kv_heads, padded_len, head_dim)
    v_pad = v.new_zeros(batch, num_kv_heads, padded_len, head_dim)
    decisions_pad = decisions.new_zeros(batch, num_kv_heads, padded_len)
    for b, length in enumerate(lengths):
        q_pad[b, :, padded_len - length :] = q[b]
        k_pad[b, :, padded_len - length :] = k[b]
        v_pad[b, :, padded_len - length :] = v[b]
        decisions_pad[b, :, padded_len - length :] = decisions[b]

    # As the released code: one "page batch" entry per (batch, KV head), holding that head's G query
    # heads and its one K/V head, so each chunk's mask is [B*Hkv, 1, chunk, keys], shared by the G heads.
    page_batch = batch * num_kv_heads
    q_pages = q_pad.reshape(page_batch, group, padded_len, head_dim)
    k_pages = k_pad.reshape(page_batch, 1, padded_len, head_dim)
    v_pages = v_pad.reshape(page_batch, 1, padded_len, head_dim)
    out_pages = torch.empty_like(q_pages)
    for start in range(0, padded_len, HUB_QUERY_CHUNK):
        end = min(start + HUB_QUERY_CHUNK, padded_len)
        mask = visibility_mask(decisions_pad, window, end - start, end, query_offset=start)
        out_pages[:, :, start:end] = F.scaled_dot_product_attention(
            q_pages[:, :, start:end],
            k_pages[:, :, :end],
            v_pages[:, :, :end],
            attn_mask=mask.reshape(page_batch, 1, end - start, end),
            scale=scale,
            enable_gqa=True,
        )

    out_pad = out_pages.reshape(batch, num_q_heads, padded_len, head_dim)
    out = torch.empty_like(q)
    for b, length in enumerate(lengths):
        out[b] = out_pad[b, :, padded_len - length :]
    return out


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


def _check_inputs(q, k, v, decisions, window, impl, scale, return_lse):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("decisions", decisions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if impl == "math" else ())
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; impl {impl!r} takes {allowed}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if decisions.dtype != torch.bool:
        raise TypeError(f"decisions must be torch.bool, got {decisions.dtype}")
    if len({t.device for t in (q, k, v, decisions)}) != 1:
        raise ValueError(
            f"q, k, v, decisions must be on one device, got {q.device}, {k.device}, {v.device}, {decisions.device}"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, num_q_heads, n, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    kb, num_kv_heads, kn, kd = k.shape
    if (kb, kn, kd) != (batch, n, head_dim):
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, length or head_dim"
        )
    if n == 0 or num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"need N > 0 and Hq={num_q_heads} a multiple of Hkv={num_kv_heads}")
    if tuple(decisions.shape) != (batch, num_kv_heads, n):
        raise ValueError(f"decisions must be [B, Hkv, N] = {(batch, num_kv_heads, n)}, got {tuple(decisions.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if return_lse and impl == "hub":
        raise ValueError("return_lse is not available for impl 'hub' (its SDPA calls do not return it)")
    if impl == "triton":
        if head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"impl 'triton' supports head_dim in {TRITON_HEAD_DIMS}, got {head_dim}")
        if num_q_heads // num_kv_heads > TRITON_MAX_GROUP:
            raise ValueError(
                f"impl 'triton' stacks at most {TRITON_MAX_GROUP} query heads per KV head, "
                f"got {num_q_heads // num_kv_heads}"
            )
        if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
            raise ValueError(f"impl 'triton' needs CUDA tensors (or the interpreter), got {q.device}")
