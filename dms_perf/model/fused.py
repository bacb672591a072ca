"""Liger-Kernel's fused Triton RMSNorm, SwiGLU and RoPE on one Qwen3-DMS model instance.

A decode step of the 8B model is thousands of small launches (norms, RoPE, SiLU, casts) besides its
GEMVs; Liger-Kernel fuses exactly these for transformers' Qwen3. Only the given model is patched:
transformers' module-level classes are restored afterwards, so a vanilla model built later is what a
plain transformers user gets. Where Liger's kernels cannot run (no CUDA device: Triton's interpreter)
or Liger is not installed, the model keeps transformers' modules, which compute the same.
"""

from __future__ import annotations

from dms_perf._runtime import HAS_CUDA, INTERPRET


def fused_kernels_unavailable() -> str | None:
    """Why Liger's kernels cannot be used here, or None when they can."""
    if not HAS_CUDA or INTERPRET:
        return "no CUDA device (Triton's interpreter does not run Liger's kernels)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc})"
    return None


def apply_fused_kernels(model) -> bool:
    """Patch ``model``'s RMSNorms (incl. q/k norm), MLPs (SwiGLU) and its attention's RoPE with Liger's
    kernels; returns whether it did (``model.dms_fused_kernels`` says so too)."""
    model.dms_fused_kernels = False
    if fused_kernels_unavailable() is not None:
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.qwen3 import modeling_qwen3

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
    model.dms_fused_kernels = True
    return True
