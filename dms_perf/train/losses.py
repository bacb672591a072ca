"""The retrofit's loss terms and its compression schedule (docs/training.md, "The recipe").

Loss = ``distillation_loss`` (KL from the frozen original model's next-token distribution to the
student's) + ``penalty_weight * eviction_penalty`` (one-sided L1: only an eviction rate below the target
costs anything). The target rises with ``target_compression``: from 1x by one unit of compression ratio
every ``steps_per_unit`` steps, up to the final ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_compression(step: int, compression_ratio: float, steps_per_unit: float) -> float:
    """The compression ratio aimed at in ``step`` (0-based): ``min(cr, 1 + step / steps_per_unit)``;
    ``steps_per_unit == 0`` aims at the final ratio from the first step."""
    if steps_per_unit == 0:
        return float(compression_ratio)
    return float(min(compression_ratio, 1.0 + step / steps_per_unit))


def target_eviction_rate(step: int, compression_ratio: float, steps_per_unit: float) -> float:
    """Fraction of tokens to evict in ``step``: ``1 - 1 / target_compression(...)`` (0 at 1x, 7/8 at 8x)."""
    return 1.0 - 1.0 / target_compression(step, compression_ratio, steps_per_unit)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)`` of the next-token distributions, in fp32.

    ``[B, N, vocab]`` each; the teacher's logits carry no gradient. ``sum p_t (log p_t - log p_s)``.
    ``weights``: ``[B, N]`` >= 0 per position, a weighted mean instead (``answer_weights``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student_log = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    per_token = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    if weights is None:
        return per_token.mean()
    if weights.shape != per_token.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must be [B, N] = {tuple(per_token.shape)}")
    weights = weights.to(per_token)
    return (weights * per_token).sum() / weights.sum()


def answer_weights(answers: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """``[B, N]`` distillation weights: ``answer_weight`` at the positions whose next token is an answer's
    (``answers[b, t + 1]``: the logits at t predict token t + 1), 1 elsewhere. A retrieval answer is a few
    tokens of a long sequence, so its KL barely counts in a plain mean; this lets it count."""
    if answers.dtype != torch.bool or answers.dim() != 2:
        raise ValueError(f"answers must be [B, N] bool, got {answers.dtype} of shape {tuple(answers.shape)}")
    if not answer_weight > 0:
        raise ValueError(f"answer_weight must be > 0, got {answer_weight!r}")
    weights = torch.ones(answers.shape, dtype=torch.float32, device=answers.device)
    weights[:, :-1][answers[:, 1:]] = float(answer_weight)
    return weights


def eviction_penalty(evict_prob: torch.Tensor, target: float) -> torch.Tensor:
    """``max(0, target - mean eviction probability)``, per sequence, averaged over the batch.

    ``evict_prob``: ``[L, B, Hkv, N - 1]`` from ``dms_training_forward`` (every layer, KV head and token of
    a sequence counts the same).
    """
    per_sequence = evict_prob.float().mean(dim=(0, 2, 3))
    return torch.clamp(target - per_sequence, min=0.0).mean()
