"""Left padding of variable-length rows: ``y[n, S - lengths[n]:] = x[n, :lengths[n]]``, zeros before.

The DMS hub prefill (docs/DMS.md, "The hub algorithm") left-pads the batch with a per-row Python
loop (``left_pad_one``); ``left_pad_2d_loop`` mirrors it, ``left_pad_2d_torch`` is the vectorized
baseline (both in ``baseline.py``) and ``left_pad_2d`` the Triton kernel (one launch, no host sync
with ``check_lengths=False``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf.ops._common import (
    as_bits,
    block_rows,
    cdiv,
    check_data,
    check_device_usable,
    check_grid_rows,
    check_index_tensor,
    host_check_values,
    next_power_of_2,
    tile_mask,
)


@triton.jit
def _left_pad_kernel(
    x_ptr, lengths_ptr, y_ptr, S, stride_xn, stride_xs,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, n) writes output rows ``[i*BLOCK_S, (i+1)*BLOCK_S)`` of row n; it reads only valid inputs."""
    n = tl.program_id(1).to(tl.int64)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + n).to(tl.int64), 0), S)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    src = s - (S - length)
    in_seq = s < S
    vals = tl.load(
        x_ptr + n * stride_xn + src[:, None] * stride_xs + d[None, :],
        mask=tile_mask(in_seq & (src >= 0), D, BLOCK_D),
        other=0,
    )
    tl.store(y_ptr + (n * S + s[:, None]) * D + d[None, :], vals, mask=tile_mask(in_seq, D, BLOCK_D))


def left_pad_2d(x: torch.Tensor, lengths: torch.Tensor, *, check_lengths: bool = True) -> torch.Tensor:
    """Right-align each row's valid prefix: ``y[n, S-lengths[n]:] = x[n, :lengths[n]]``, zeros before.

    Args:
        x: ``[N, S, D]``, any 1/2/4/8-byte dtype (fp32, fp16, bf16, ...), contiguous in the last dim
            (other strides are free). Row n's valid elements are ``x[n, :lengths[n]]``.
        lengths: ``[N]`` integer tensor on x's device, each in ``[0, S]``.
        check_lengths: check that every length lies in ``[0, S]`` (else ``ValueError``), at the cost of
            one host synchronization. Pass False where the caller guarantees the range: the launch is
            then asynchronous, and the kernel clamps lengths to ``[0, S]`` so it never reads out of bounds.

    Returns:
        ``y [N, S, D]`` contiguous, x's dtype. One Triton launch (docs/DMS.md, hub left padding).
    """
    check_data("x", x, ndim=3)
    check_index_tensor("lengths", lengths, x.shape[0], "x", x)
    check_device_usable("x", x)
    n_rows, seq_len, dim = x.shape
    check_grid_rows("N", n_rows)
    if check_lengths and n_rows:
        lo, hi, _ = host_check_values(lengths)
        if lo < 0 or hi > seq_len:
            raise ValueError(f"lengths must lie in [0, S={seq_len}], got values in [{lo}, {hi}]")
    y = torch.empty((n_rows, seq_len, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_s = block_rows(dim, x.element_size())
    grid = (cdiv(seq_len, block_s), n_rows)
    _left_pad_kernel[grid](
        as_bits(x), lengths, as_bits(y), seq_len, x.stride(0), x.stride(1),
        D=dim, BLOCK_S=block_s, BLOCK_D=next_power_of_2(dim),
    )
    return y
