"""Row scatter along dim 0: ``out[index[m]] = src[m]``, restoring the original order after a permutation.

The DMS hub prefill (docs/DMS.md, "The hub algorithm") restores the batch order with a per-row
Python loop; ``scatter_by_index_loop`` mirrors it, ``scatter_by_index_torch`` is the vectorized
baseline (``index_copy_``; both in ``baseline.py``) and ``scatter_by_index`` the Triton kernel (one launch).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dms_perf._runtime import INTERPRET
from dms_perf.ops._common import (
    INDEX_DTYPES,
    as_bits,
    cdiv,
    check_data_dtype,
    check_device_usable,
    check_same_device,
    check_tensor,
    host_check_values,
    next_power_of_2,
)

# Elements per [BLOCK_M, BLOCK_R] tile: 16 KB of bf16 on the GPU.
TILE_ELEMS = 32768 if INTERPRET else 8192
MAX_BLOCK_R = 4096


@triton.jit
def _scatter_rows_kernel(
    src_ptr, index_ptr, out_ptr, M, R, n_col_blocks,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program p copies the tile (rows of block p // n_col_blocks, columns of block p % n_col_blocks)."""
    pid = tl.program_id(0)
    m = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = (pid % n_col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = m < M
    tile_ok = row_ok[:, None] & (r < R)[None, :]
    dst = tl.load(index_ptr + m, mask=row_ok, other=0).to(tl.int64)
    vals = tl.load(src_ptr + m.to(tl.int64)[:, None] * R + r[None, :], mask=tile_ok)
    tl.store(out_ptr + dst[:, None] * R + r[None, :], vals, mask=tile_ok)


def _check_index_values(index: torch.Tensor, n_out: int) -> None:
    """Range and uniqueness of ``index`` with one host synchronization."""
    lo, hi, duplicated = host_check_values(index)
    if lo < 0 or hi >= n_out:
        raise ValueError(f"index values must lie in [0, {n_out}) (out.shape[0]), got values in [{lo}, {hi}]")
    if duplicated:
        ordered = torch.sort(index).values
        repeated = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(f"index must not repeat a value (each output row is written once), {repeated} repeats")


def scatter_by_index(
    src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None, *, check_index: bool = True
) -> torch.Tensor:
    """``out[index[m]] = src[m]`` along dim 0 (the inverse of ``src = x[index]`` for a permutation).

    Args:
        src: ``[M, ...]`` contiguous, any 1/2/4/8-byte dtype.
        index: ``[M]`` integer tensor on src's device; values distinct and in ``[0, out.shape[0])``.
        out: optional contiguous ``[N, ...]`` destination (same dtype, device and trailing shape as src,
            ``N >= M``); rows not named by index keep their contents. Default: a new tensor shaped like src
            (then index must be a permutation of ``range(M)`` for every row to be written).
        check_index: check that index values are in range and distinct (``ValueError`` otherwise),
            at the cost of one host synchronization. Pass False where the caller knows index is a
            permutation (e.g. it came from ``argsort``): the launch is then asynchronous, and
            duplicate or out-of-range values are undefined behaviour (out-of-range ones write out of bounds).

    Returns:
        ``out``. One Triton launch.
    """
    check_tensor("src", src)
    if src.dim() == 0:
        raise ValueError("src must have at least one dimension (rows along dim 0), got a scalar")
    check_data_dtype("src", src)
    if not src.is_contiguous():
        raise ValueError(f"src must be contiguous, got strides {src.stride()}")
    check_tensor("index", index, ndim=1)
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"index must have an integer dtype, got {index.dtype}")
    n_src = src.shape[0]
    if index.shape[0] != n_src:
        raise ValueError(f"index must have {n_src} entries (one per row of src), got {index.shape[0]}")
    check_same_device("index", index, "src", src)
    if not index.is_contiguous():
        raise ValueError(f"index must be contiguous, got strides {index.stride()}")
    check_device_usable("src", src)
    if out is None:
        out = torch.empty_like(src)
    else:
        check_tensor("out", out)
        if out.dtype != src.dtype:
            raise TypeError(f"out has dtype {out.dtype} but src has {src.dtype}")
        if out.dim() != src.dim() or out.shape[1:] != src.shape[1:] or out.shape[0] < n_src:
            trailing = "".join(f", {n}" for n in src.shape[1:])
            raise ValueError(f"out must have shape [N >= {n_src}{trailing}], got {tuple(out.shape)}")
        check_same_device("out", out, "src", src)
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    row_elems = math.prod(src.shape[1:])
    if n_src == 0 or row_elems == 0:
        return out
    if check_index:
        _check_index_values(index, out.shape[0])
    block_r = min(next_power_of_2(row_elems), MAX_BLOCK_R)
    block_m = max(1, TILE_ELEMS // block_r)
    n_col_blocks = cdiv(row_elems, block_r)
    grid = (cdiv(n_src, block_m) * n_col_blocks,)
    _scatter_rows_kernel[grid](
        as_bits(src), index, as_bits(out), n_src, row_elems, n_col_blocks, BLOCK_M=block_m, BLOCK_R=block_r
    )
    return out
