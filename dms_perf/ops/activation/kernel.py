"""``silu(gate) * up`` read straight from the fused gate/up projection ``[..., 2 I]`` (gate first).

Liger-Kernel's SwiGLU kernel takes gate and up as two tensors of one row stride; the halves of one
fused GEMM's output share a row but not a layout it accepts, so it would copy both halves first (two
more launches per layer on a decode step). This kernel reads the halves in place: one launch, the same
arithmetic as transformers' ``Qwen3MLP`` and Liger (SiLU in fp32, rounded to the input dtype, times up).
``naive.py`` holds the fp64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + width + cols, mask=mask, other=0.0)
    silu = (gate * tl.sigmoid(gate)).to(up.dtype)
    tl.store(Y + row * stride_y + cols, silu * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` as a new ``[..., I]`` tensor (fp16 / bf16 / fp32)."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"silu_mul takes an fp16 / bf16 / fp32 tensor, got {getattr(gate_up, 'dtype', type(gate_up))}")
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul needs an even last dim (gate then up), got shape {tuple(gate_up.shape)}")
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)  # a view for the usual contiguous rows
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and width:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(width, BLOCK))](
            rows, out, rows.stride(0), out.stride(0), width, BLOCK=BLOCK, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], width)
