"""fp64 reference of ``skinny_linear`` (tests only)."""

from __future__ import annotations

import torch


def skinny_linear_reference(x, weight, *, residual=None, silu_mul=False):
    """``x @ weight.T`` in fp64, then ``silu(gate) * up`` over its halves (gate first) when ``silu_mul``,
    then ``+ residual``; ``silu(a) = a / (1 + exp(-a))``."""
    out = x.double() @ weight.double().T
    if silu_mul:
        gate, up = out.chunk(2, dim=-1)
        out = gate / (1 + torch.exp(-gate)) * up
    if residual is not None:
        out = out + residual.double()
    return out
