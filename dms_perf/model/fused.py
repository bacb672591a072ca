"""Fewer kernels per decode step: Liger-Kernel's fused Triton RMSNorm, SwiGLU and RoPE on one Qwen3-DMS
model instance, and fused q/k/v and gate/up projections (``fuse_projections``).

A decode step of the 8B model is thousands of small launches (norms, RoPE, SiLU, casts) besides its
GEMVs; Liger-Kernel fuses exactly these for transformers' Qwen3. Only the given model is patched:
transformers' module-level classes are restored afterwards, so a vanilla model built later is what a
plain transformers user gets. Where Liger's kernels cannot run (no CUDA device: Triton's interpreter)
or Liger is not installed, the model keeps transformers' modules, which compute the same.
"""

from __future__ import annotations

import logging

import torch
from transformers.models.qwen3 import modeling_qwen3

from dms_perf._runtime import HAS_CUDA, INTERPRET
from dms_perf.ops.linear import decode_linear


def fused_kernels_unavailable() -> str | None:
    """Why Liger's kernels cannot be used here, or None when they can."""
    if not HAS_CUDA or INTERPRET:
        return "no CUDA device (Triton's interpreter does not run Liger's kernels)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc})"
    return None


# The Liger ops a fused model calls (RMSNorm, SwiGLU, RoPE, fused add + RMSNorm).
LIGER_OPS = ("rms_norm", "swiglu", "rope", "fused_add_rms_norm")


def find_liger_backends() -> None:
    """Let Liger find its backends for ``LIGER_OPS`` now, without its warnings.

    Liger looks for each op's backends (Triton, CuTe DSL, cuTile, Ascend) on the op's first call and logs a
    warning for each one that is not installed, so every run printed them mid-generation. Found here with
    that one logger quieted; what failed stays in ``liger_kernel.backends.registry.get_discovery_failures()``.
    """
    try:
        from liger_kernel.backends.registry import list_registered
    except ImportError:  # a Liger without the backend registry finds nothing on first calls either
        return
    registry_log = logging.getLogger("liger_kernel.backends.registry")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        for op in LIGER_OPS:
            list_registered(op)
    finally:
        registry_log.setLevel(level)


def apply_fused_kernels(model) -> bool:
    """Patch ``model``'s RMSNorms (incl. q/k norm), MLPs (SwiGLU) and its attention's RoPE with Liger's
    kernels, and fuse each layer's residual add into its post-attention norm (``AddNormDecoderLayer``);
    returns whether it did (``model.dms_fused_kernels`` says so too)."""
    model.dms_fused_kernels = False
    if fused_kernels_unavailable() is not None:
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    find_liger_backends()
    names = ("Qwen3RMSNorm", "Qwen3MLP", "apply_rotary_pos_emb")
    saved = {name: getattr(modeling_qwen3, name) for name in names}
    try:
        apply_liger_kernel_to_qwen3(
            rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True,
            model=model,
        )
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen3, name, value)
    for layer in model.model.layers:
        layer.self_attn.rotary_fn = liger_rotary_pos_emb
        layer.__class__ = AddNormDecoderLayer
    model.dms_fused_kernels = True
    return True


class AddNormDecoderLayer(modeling_qwen3.Qwen3DecoderLayer):
    """transformers' Qwen3 decoder layer with the residual add after attention and the post-attention
    RMSNorm in one launch (Liger's fused add + RMSNorm, over the layer's own norm weight), and the residual
    add after a fused MLP inside its down projection (``GateUpMLP.add_into``)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        from liger_kernel.ops import LigerFusedAddRMSNormFunction

        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, position_embeddings=position_embeddings, **kwargs,
        )
        norm = self.post_attention_layernorm
        hidden_states, residual = LigerFusedAddRMSNormFunction.apply(
            hidden_states, residual, norm.weight, norm.variance_epsilon, 0.0, "llama", False
        )
        if isinstance(self.mlp, GateUpMLP):
            return self.mlp.add_into(residual, hidden_states)  # ``residual`` is Liger's new tensor: ours
        return residual + self.mlp(hidden_states)


class GateUpMLP(torch.nn.Module):
    """A Qwen3 MLP whose gate and up projections are one GEMM (``fuse_projections`` swaps an MLP instance
    to this class; its parameters stay, ``gate_proj`` / ``up_proj`` being views of the fused weight)."""

    dms_gate_up_weight: torch.Tensor

    def _activation(self, x):
        # A decode step's few rows: one launch for the GEMM and the activation where decode_linear routes
        # gate/up to skinny_linear; else the GEMM, then silu_mul on its fused layout or torch on CPU.
        return decode_linear(x, self.dms_gate_up_weight, projection="gate_up", silu_mul=True)

    def forward(self, x):
        return self.down_proj(self._activation(x))

    def add_into(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` with the residual add inside the down projection: in the epilogue of
        ``skinny_linear`` where ``decode_linear`` routes the down projection to it, else in cuBLAS's GEMM
        (``addmm_``, beta = 1, written into ``residual``, which must be the caller's own). Either way no
        launch of its own, and the sum is rounded once, from the fp32 accumulator, instead of twice."""
        down = self.down_proj
        act = self._activation(x)
        if down.bias is not None:
            return residual + down(act)
        return decode_linear(act, down.weight, projection="down", residual=residual, residual_in_place=True)


def _fused_weight(linears) -> torch.Tensor | None:
    """One weight matrix holding ``linears``' rows in order; each linear's weight becomes a view of it."""
    if any(linear.bias is not None for linear in linears):
        return None
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
    first = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[first : first + rows], requires_grad=linear.weight.requires_grad)
        first += rows
    return weight


def fuse_projections(model, *, mlp: bool = True) -> bool:
    """Concatenate every layer's q/k/v weights and gate/up weights once, so that each is one GEMM (on a
    decode step, one GEMV reading the three matrices back to back instead of three launches).

    ``q_proj`` / ``k_proj`` / ``v_proj`` / ``gate_proj`` / ``up_proj`` become views of the fused weights:
    no extra memory, the same ``state_dict``, and transformers' own attention (a press's passthrough
    prefill) still works. Call after the model is on its device and in its dtype (the fused weights are
    not parameters, so ``.to()`` would not move them). Projections with a bias are left as they are;
    ``mlp=False`` fuses the attention's only (the MLP keeps Liger's SwiGLU, if applied).
    Returns whether any layer was fused (``model.dms_fused_projections`` says so too).
    """
    fused = False
    for layer in model.model.layers:
        attention = layer.self_attn
        weight = _fused_weight([attention.q_proj, attention.k_proj, attention.v_proj])
        if weight is not None:
            attention.dms_qkv_weight = weight
            fused = True
        if mlp and getattr(model.config, "hidden_act", "silu") in ("silu", "swish"):
            weight = _fused_weight([layer.mlp.gate_proj, layer.mlp.up_proj])
            if weight is not None:
                layer.mlp.dms_gate_up_weight = weight
                layer.mlp.__class__ = GateUpMLP
                layer.mlp.__dict__.pop("forward", None)  # Liger binds its forward on the instance
                fused = True
    model.dms_fused_projections = fused
    return fused


def apply_engine_fusions(model) -> None:
    """Everything the decode engine fuses: Liger's kernels where they run, then fused projections."""
    apply_fused_kernels(model)
    fuse_projections(model)
