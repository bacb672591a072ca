"""``x @ W.T`` for the few rows of a decode step (one token per sequence, up to ``MAX_ROWS``).

A decode step's GEMMs have 1-32 rows: each is a stream of the weight matrix, bound by memory. On the
H200 cuBLAS picks tall tiles for these shapes (96 CTAs for the fused gate/up, 32 split-K CTAs plus a
reduce launch for the down projection) and reads the 8B model's projection weights at about 3.3-3.7 TB/s
of the card's ~4.25 (benchmarks/NOTES.md, "Session of 2026-12-02"). Here each program owns a narrow block
of output columns over the whole K, with no split-K reduction; block sizes are autotuned per shape. The
epilogue adds a residual (the layer's skip connection) or applies ``silu(gate) * up`` to the fused gate/up
projection, whose gate rows come first: the program reads the gate and the up rows of its columns and
writes the activation, never the projection, so neither is a launch of its own. ``decode_linear`` routes
each projection to it or to cuBLAS by ``SKINNY_PROJECTIONS``, set from the decode-step benchmarks.
Accumulation is fp32, rounded once at the store. ``naive.py`` holds the fp64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_perf._runtime import INTERPRET
from dms_perf.ops.activation import silu_mul as silu_mul_launch

# Rows (tokens) up to which the kernel serves: one tile of rows; more go to cuBLAS (F.linear), where a
# GEMM is no longer a plain stream of the weights.
MAX_ROWS = 32
# The engine's GPU dtypes. fp32 goes to cuBLAS: its tiles of the configs below would need more shared
# memory than an SM has (fp32 models serve tests only).
_DTYPES = (torch.float16, torch.bfloat16)
# The engine's projections, as decode_linear's callers name them.
PROJECTIONS = ("qkv", "o", "gate_up", "down")
# The projections decode_linear sends to this kernel (on CUDA, where it applies); the others go to cuBLAS.
# benchmarks/test_decode_step.py times each on both, replayed from CUDA graphs: on the H100 the kernel took
# 0.87-0.96 of cuBLAS's time on all four at 1 and 8 rows, and tied on o_proj at 32 (benchmarks/NOTES.md,
# "Session of 2026-12-06"). Read at every call.
SKINNY_PROJECTIONS = frozenset({"qkv", "o", "gate_up", "down"})


def _configs():
    if INTERPRET:  # the interpreter runs each config in Python: one small one
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # The winners of a sweep over BLOCK_N {16, 32, 64} x BLOCK_K {256, 512} x stages {3, 4} on the 8B
    # model's projections at 1, 8 and 32 rows (H200, benchmarks/NOTES.md); few, as each is compiled.
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
        for n, k, s in ((32, 256, 4), (32, 512, 4), (32, 512, 3), (64, 256, 3), (64, 256, 4))
    ]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M", "SILU_MUL", "HAS_RESIDUAL"])
@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SILU_MUL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    # With SILU_MUL the weight has 2 N rows: gate rows 0..N-1, then up rows N..2N-1.
    up_rows = w_ptr + (cols + N).to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if SILU_MUL:
            u = tl.load(up_rows + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up)
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def skinny_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``skinny_linear`` serves this product: at most ``MAX_ROWS`` rows, a weight with stride 1
    along K, one 16-bit floating dtype for both."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (
        0 < rows <= MAX_ROWS and x.dtype in _DTYPES and weight.dtype == x.dtype and weight.dim() == 2
        and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1] and x.device == weight.device
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
                  silu_mul: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[..., K]`` of at most ``MAX_ROWS`` rows and ``weight`` ``[N, K]``.

    ``silu_mul``: ``weight`` is the fused gate/up projection (gate rows first); returns
    ``silu(gate) * up`` ``[..., N / 2]``. ``residual``: added to the result (same shape). ``out``: a
    contiguous ``[rows, width]`` tensor of ``x.dtype`` to write (default: a new one). fp32 accumulation
    of the 16-bit products, one rounding to ``x.dtype``.
    """
    if not skinny_linear_applies(x, weight):
        raise ValueError(
            f"skinny_linear takes x [..., K] of 1..{MAX_ROWS} rows and a weight [N, K] with stride 1 along K, "
            f"one dtype of {_DTYPES}; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
            f"{weight.dtype} strides {weight.stride()}"
        )
    width = weight.shape[0]
    if silu_mul:
        if width % 2:
            raise ValueError(f"silu_mul needs an even number of weight rows (gate then up), got {width}")
        width //= 2
    K = x.shape[-1]
    flat = x.reshape(-1, K)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if out is None:
        out = torch.empty((flat.shape[0], width), dtype=x.dtype, device=x.device)
    elif out.shape != (flat.shape[0], width) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(flat.shape[0], width)} {x.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    res = None
    if residual is not None:
        if residual.shape != (*x.shape[:-1], width):
            raise ValueError(f"residual must be {(*x.shape[:-1], width)}, got {tuple(residual.shape)}")
        res = residual.reshape(-1, width)
        if res.stride(-1) != 1:
            res = res.contiguous()
    block_m = 16 if flat.shape[0] <= 16 else 32
    _skinny_linear_kernel[lambda meta: (triton.cdiv(width, meta["BLOCK_N"]),)](
        flat, weight, out if res is None else res, out, flat.shape[0], width, K,
        flat.stride(0), weight.stride(0), 0 if res is None else res.stride(0), out.stride(0),
        BLOCK_M=block_m, SILU_MUL=silu_mul, HAS_RESIDUAL=res is not None,
    )
    return out.view(*x.shape[:-1], width)


def uses_skinny_linear(x: torch.Tensor, weight: torch.Tensor, projection: str) -> bool:
    """Whether ``decode_linear`` gives projection ``projection`` (one of ``PROJECTIONS``) to ``skinny_linear``
    on CUDA: it is in ``SKINNY_PROJECTIONS`` and the kernel applies to ``x`` and ``weight``."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    return projection in SKINNY_PROJECTIONS and skinny_linear_applies(x, weight)


def torch_linear(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
                 silu_mul: bool = False, residual_in_place: bool = False) -> torch.Tensor:
    """``decode_linear``'s path off the kernel, the same arithmetic on cuBLAS (``F.linear``, then
    ``silu_mul``'s launch on CUDA) or torch: ``residual_in_place`` adds the product into ``residual`` in
    cuBLAS's GEMM (``addmm_``, no launch of its own; the caller must own it)."""
    if residual is not None and residual_in_place and not silu_mul and residual.is_contiguous():
        residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return residual
    out = torch.nn.functional.linear(x, weight)
    if silu_mul:
        if out.is_cuda:
            out = silu_mul_launch(out)
        else:  # the same arithmetic in torch (the interpreter is slow)
            gate, up = out.chunk(2, dim=-1)
            out = torch.nn.functional.silu(gate) * up
    return out if residual is None else residual + out


def decode_linear(x: torch.Tensor, weight: torch.Tensor, *, projection: str,
                  residual: torch.Tensor | None = None, silu_mul: bool = False,
                  residual_in_place: bool = False) -> torch.Tensor:
    """``x @ weight.T`` (then ``silu(gate) * up`` over its halves, then ``+ residual``) for the engine's
    projection ``projection`` (``PROJECTIONS``): on ``skinny_linear`` on CUDA where ``uses_skinny_linear``
    says so, else ``torch_linear`` (cuBLAS / torch, the same arithmetic; ``residual_in_place`` applies to
    it only, the kernel writes a new tensor). For every method that runs on the engine."""
    if uses_skinny_linear(x, weight, projection) and x.is_cuda:
        return skinny_linear(x, weight, residual=residual, silu_mul=silu_mul)
    return torch_linear(x, weight, residual=residual, silu_mul=silu_mul, residual_in_place=residual_in_place)
