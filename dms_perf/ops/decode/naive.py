"""The readable reference of DMS decode attention (tests only)."""

from __future__ import annotations

import torch


def dms_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Readable torch version of :func:`dms_decode_attention` (fp32 math, same arguments and result).

    Gathers rows ``starts .. starts + max_length - 1`` of every head and masks those past ``lengths``;
    query head ``h * G + g`` uses KV head ``h``. Tests only.
    """
    B, Hq, D = q.shape
    Hkv = starts.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    offsets = torch.arange(max_length, device=q.device)
    occupied = offsets[None, None, :] < lengths[:, :, None]
    rows = (starts[:, :, None] + offsets).clamp(max=k_cache.shape[0] - 1)
    keys, values = k_cache[rows].float(), v_cache[rows].float()  # [B, Hkv, max_length, D]
    scores = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, Hkv, G, D), keys) * scale
    scores = scores.masked_fill(~occupied[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Free rows may hold anything (even NaN): zero them so that 0 * garbage cannot leak in.
    values = torch.where(occupied[..., None], values, 0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values)
    return out.reshape(B, Hq, D).to(q.dtype)
