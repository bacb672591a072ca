"""DMS prefill attention: one entry point, ``dms_prefill_attention``, over five implementations.

``"triton"``      our fused kernel (``fused.py``): kept keys read from a compacted copy, the window band
                  under the element-wise rule.
``"hub-triton"``  the released code's structure with its loops replaced by the data movers and its
                  chunked SDPA by one fused launch over all keys under the DMS mask (``hub_triton.py``).
``"hub"``         the released checkpoint's algorithm, reproduced faithfully (``hub.py``).
``"flex"``        PyTorch FlexAttention with a DMS ``mask_mod`` (``flex.py``).
``"math"``        a dense masked softmax in fp32/fp64 (``math_impl.py``), also the ground truth of the tests.

All of them follow docs/DMS.md, "Who is visible".
"""

from __future__ import annotations

import math

import torch

from dms_perf._runtime import INTERPRET
from dms_perf.ops._common import MAX_GRID_ROWS
from dms_perf.ops.prefill.flex import flex_attention
from dms_perf.ops.prefill.fused import triton_prefill_attention
from dms_perf.ops.prefill.hub import hub_attention
from dms_perf.ops.prefill.hub_triton import hub_triton_attention
from dms_perf.ops.prefill.math_impl import math_attention

# The one list of prefill implementations; the model's backends and the registry's DMS methods use these names.
IMPLS = ("triton", "hub-triton", "hub", "flex", "math")
TRITON_IMPLS = ("triton", "hub-triton")
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
    """Causal prefill attention under the DMS visibility rule (docs/DMS.md, "Who is visible").

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA); one
            dtype (fp16, bf16, fp32; fp64 for ``"math"`` only) and one device for all three.
        decisions: bool ``[B, Hkv, N]``; ``decisions[..., t]`` is token t's decision, which marks
            token t-1 for eviction. Query i sees key j iff ``j <= i`` and (``i - j <= window`` or not
            ``decisions[..., j + 1]``); the last token is always kept.
        window: the DMS sliding window (``dms_window_size``, 512 in the checkpoint), ``>= 0``.
        impl: one of ``IMPLS`` (see the module doc).
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
    elif impl == "hub-triton":
        out, lse = hub_triton_attention(q, k, v, decisions, window, scale, return_lse)
    else:
        out, lse = triton_prefill_attention(q, k, v, decisions, window, scale, return_lse)
    return (out, lse) if return_lse else out


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
    if impl in TRITON_IMPLS:
        if head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"impl {impl!r} supports head_dim in {TRITON_HEAD_DIMS}, got {head_dim}")
        if num_q_heads // num_kv_heads > TRITON_MAX_GROUP:
            raise ValueError(
                f"impl {impl!r} stacks at most {TRITON_MAX_GROUP} query heads per KV head, "
                f"got {num_q_heads // num_kv_heads}"
            )
        if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
            raise ValueError(f"impl {impl!r} needs CUDA tensors (or the interpreter), got {q.device}")
    if impl == "hub-triton" and batch * num_q_heads > MAX_GRID_ROWS:
        # Its data movers launch one row of the grid's second axis per (b, query head); "triton" folds
        # its rows into the first axis and takes any batch.
        raise ValueError(
            f"impl 'hub-triton' moves B*Hq = {batch * num_q_heads} rows, more than the {MAX_GRID_ROWS} its "
            "data movers cover in one launch; use impl='triton' or a smaller batch"
        )
