"""fp64 reference of ``silu_mul`` (tests only)."""

from __future__ import annotations

import torch


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from the definition ``silu(x) = x / (1 + exp(-x))``, in fp64."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up
