"""``retrofit``: teach a Qwen3-DMS model to make its eviction decisions (docs/training.md).

One step: the frozen teacher's logits on a batch, the student's training forward with relaxed decisions
(``dms_perf.train.forward``), loss = KL distillation + one-sided eviction penalty towards the ramped
target (``dms_perf.train.losses``), one AdamW update of the trainable weights. Every step is recorded
with its measured eviction rate: the hard decisions ``logit > 0`` that inference would take.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from dms_perf.model.qwen3_dms import Qwen3DMSForCausalLM
from dms_perf.train.forward import dms_training_forward
from dms_perf.train.losses import answer_weights, distillation_loss, eviction_penalty, target_compression

# "decision": only the q_proj rows of the borrowed channels (the decision logits; the model otherwise unchanged);
# "q": the q projections of every layer (the borrowed channel's weights and the queries that lose it);
# "all": every weight of the model.
TRAINABLE = ("decision", "q", "all")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step. ``eviction_rate`` is measured (hard decisions on the step's batch, before the
    update); ``evict_prob`` is the mean relaxed probability that the penalty sees."""

    step: int  # 1-based
    target_compression: float
    target_eviction: float
    loss: float
    kl: float
    penalty: float
    evict_prob: float
    eviction_rate: float
    seconds: float  # since the first step began

    @property
    def compression(self) -> float:
        """Tokens per kept token implied by the measured rate, ignoring the window: ``1 / (1 - rate)``."""
        return 1.0 / max(1.0 - self.eviction_rate, 1e-12)


@dataclass
class RetrofitResult:
    model: Qwen3DMSForCausalLM
    history: list[StepRecord]
    settings: dict = field(default_factory=dict)

    def history_dicts(self) -> list[dict]:
        return [asdict(record) for record in self.history]


def borrowed_rows(config) -> list[int]:
    """Rows of ``q_proj.weight`` that produce the borrowed channel: channel ``D - 1`` of query head ``h * G``
    for each KV head h (docs/DMS.md, "Decisions")."""
    group = config.num_attention_heads // config.num_key_value_heads
    dim = config.head_dim
    return [(h * group) * dim + dim - 1 for h in range(config.num_key_value_heads)]


def zero_borrowed_channel(model: Qwen3DMSForCausalLM) -> None:
    """Set the borrowed channel's q_proj rows (and bias) to zero: every decision logit starts at
    ``-dms_initial_alpha_offset`` (nothing evicted) and the channel's old values leave the query norm.
    The gradient still reaches those rows (q_norm's derivative there is ``weight / rms``)."""
    rows = borrowed_rows(model.config)
    with torch.no_grad():
        for layer in model.model.layers:
            q_proj = layer.self_attn.q_proj
            q_proj.weight[rows] = 0
            if q_proj.bias is not None:
                q_proj.bias[rows] = 0


def trainable_parameters(model: Qwen3DMSForCausalLM, train: str) -> list[torch.nn.Parameter]:
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {TRAINABLE}, got {train!r}")
    if train == "all":
        return list(model.parameters())
    # "decision" trains the same tensors with every other row's gradient masked (_decision_rows_only).
    return [p for layer in model.model.layers for p in layer.self_attn.q_proj.parameters()]


def _decision_rows_only(model) -> list:
    """Gradient hooks that keep only the borrowed rows' gradient of every q_proj weight and bias (AdamW then
    leaves the other rows exactly as they are: zero moments give zero updates)."""
    rows = torch.tensor(borrowed_rows(model.config))
    hooks = []
    for layer in model.model.layers:
        for p in layer.self_attn.q_proj.parameters():
            keep = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=torch.float32, device=p.device)
            keep[rows.to(p.device)] = 1
            hooks.append(p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype)))
    return hooks


def retrofit(
    student: Qwen3DMSForCausalLM,
    teacher: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    compression_ratio: float,
    steps: int,
    window: int | None = None,
    lr: float = 1e-5,
    ramp_steps_per_unit: float = 100,
    tau: float = 0.1,
    penalty_weight: float = 1.0,
    answer_weight: float = 1.0,
    train: str = "decision",
    zero_borrowed: bool = True,
    grad_clip: float = 1.0,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 10,
) -> RetrofitResult:
    """Train ``student`` in place to evict ``1 - 1/compression_ratio`` of the tokens; returns it with its history.

    Args:
        student: the Qwen3-DMS model to train (its ``dms_alpha_scale`` / ``dms_initial_alpha_offset`` stay
            as they are; ``window`` sets ``dms_window_size``). bf16/fp16 weights train with fp32 copies of the
            trainable ones under autocast and are cast back at the end.
        teacher: the frozen original model, called as ``teacher(input_ids=..., use_cache=False).logits``
            (e.g. vanilla Qwen3 with the same weights, or a Qwen3-DMS model with eviction off).
        batches: ``[B, N]`` token ids, at least ``steps`` of them; N must exceed ``window + 1`` (otherwise no
            key is ever old enough to be evicted). With ``answer_weight`` other than 1, pairs ``(ids, answers)``
            instead, ``answers`` ``[B, N]`` bool True at answer tokens (``Corpus.batch_with_answers``).
        compression_ratio: final ratio (>= 1); the target eviction rate ends at ``1 - 1/compression_ratio``.
        ramp_steps_per_unit: steps per unit of compression ratio of the linear ramp from 1x (0: no ramp).
        tau: Gumbel-sigmoid temperature.
        penalty_weight: weight of the one-sided L1 eviction penalty against the KL term.
        answer_weight: weight of the KL at the positions that predict an answer token (``answer_weights``),
            1 elsewhere: a retrieval answer is a few tokens of a long sequence.
        train: "decision" (the default: only the borrowed channel's q_proj rows, which make the decisions;
            attention otherwise stays the original model's), "q" (the q projections) or "all".
        zero_borrowed: zero the borrowed channel's q_proj rows first (``zero_borrowed_channel``); False to
            go on from a model that already decides (a DMS checkpoint).
        grad_clip: max gradient norm (0: no clipping).
        gradient_checkpointing: recompute each layer in the backward pass (long sequences on one GPU).
        seed: seeds the Gumbel noise.
        log: called with a progress line every ``log_every`` steps and after the last.
    """
    _check(student, compression_ratio, steps, window, lr, ramp_steps_per_unit, tau, penalty_weight, train,
           grad_clip, log_every)
    if not answer_weight > 0:
        raise ValueError(f"answer_weight must be > 0, got {answer_weight!r}")
    if teacher is student:
        raise ValueError("teacher and student are one model: the teacher must be a frozen copy of the original")
    device = next(student.parameters()).device
    if window is not None:
        student.config.dms_window_size = window
    window = student.config.dms_window_size
    if zero_borrowed:
        zero_borrowed_channel(student)
    settings = {
        "compression_ratio": float(compression_ratio), "steps": steps, "window": window, "lr": lr,
        "ramp_steps_per_unit": ramp_steps_per_unit, "tau": tau, "penalty_weight": penalty_weight,
        "answer_weight": answer_weight, "train": train,
        "zero_borrowed": zero_borrowed, "grad_clip": grad_clip, "seed": seed,
        "dms_alpha_scale": student.config.dms_alpha_scale,
        "dms_initial_alpha_offset": student.config.dms_initial_alpha_offset,
    }

    params = trainable_parameters(student, train)
    compute_dtype = params[0].dtype
    hooks = _decision_rows_only(student) if train == "decision" else []
    previous_grad = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in params:  # fp32 master weights; the forward runs in the model's dtype under autocast
        p.data = p.data.float()
        p.requires_grad_(True)
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32
                else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    teacher.eval()
    student.train()
    history: list[StepRecord] = []
    batches = iter(batches)
    start = time.perf_counter()
    try:
        for step in range(steps):
            try:
                input_ids = next(batches)
            except StopIteration:
                raise ValueError(f"batches ran out after {step} of {steps} steps") from None
            weights = None
            if answer_weight != 1:
                if not (isinstance(input_ids, tuple) and len(input_ids) == 2):
                    raise ValueError("answer_weight needs batches of (ids, answers) pairs "
                                     "(Corpus.batch_with_answers)")
                input_ids, answers = input_ids
                weights = answer_weights(answers, answer_weight).to(device)
            input_ids = _checked_batch(input_ids, window, student.config.vocab_size).to(device)
            if weights is not None and weights.shape != input_ids.shape:
                raise ValueError(f"answers {tuple(weights.shape)} and ids {tuple(input_ids.shape)} differ in shape")
            ratio = target_compression(step, compression_ratio, ramp_steps_per_unit)
            target = 1.0 - 1.0 / ratio
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
            with autocast:
                out = dms_training_forward(student, input_ids, tau=tau, generator=generator,
                                           gradient_checkpointing=gradient_checkpointing)
            kl = distillation_loss(out.logits, teacher_logits, weights)
            penalty = eviction_penalty(out.evict_prob, target)
            loss = kl + penalty_weight * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            record = StepRecord(step + 1, ratio, target, loss.item(), kl.item(), penalty.item(),
                                float(out.evict_prob.detach().float().mean()), out.eviction_rate,
                                time.perf_counter() - start)
            history.append(record)
            if log is not None and (record.step % log_every == 0 or record.step == steps):
                log(format_record(record, steps))
    finally:
        for hook in hooks:
            hook.remove()
        for p in params:
            p.data = p.data.to(compute_dtype)
            p.grad = None
        for p, flag in previous_grad.items():
            p.requires_grad_(flag)
        student.eval()
    return RetrofitResult(student, history, settings)


def format_record(record: StepRecord, steps: int) -> str:
    """``step 100/1000  target 1.99x (evict 0.497)  evicted 0.481 (1.93x)  kl 0.0123  penalty 0.0016  3.2 s``"""
    width = len(str(steps))
    return (f"step {record.step:>{width}}/{steps}  target {record.target_compression:.2f}x "
            f"(evict {record.target_eviction:.3f})  evicted {record.eviction_rate:.3f} ({record.compression:.2f}x)  "
            f"kl {record.kl:.4g}  penalty {record.penalty:.4g}  {record.seconds:.1f} s")


def _checked_batch(input_ids, window: int, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"a batch must be an integer tensor of token ids, got {type(input_ids).__name__}"
                        + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    if input_ids.dim() != 2:
        raise ValueError(f"a batch must be [B, N] token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] <= window + 1:
        raise ValueError(f"sequences of {input_ids.shape[1]} tokens leave no key outside the window of {window}: "
                         f"nothing could be evicted (the sequence length must be > window + 1)")
    return input_ids


def _check(student, compression_ratio, steps, window, lr, ramp, tau, penalty_weight, train, grad_clip,
           log_every) -> None:
    if not isinstance(student, Qwen3DMSForCausalLM):
        raise TypeError(f"retrofit trains a Qwen3DMSForCausalLM, got {type(student).__name__}")
    if not (isinstance(compression_ratio, (int, float)) and math.isfinite(compression_ratio)
            and compression_ratio >= 1):
        raise ValueError(f"compression_ratio must be a finite number >= 1, got {compression_ratio!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    for name, value in (("lr", lr), ("tau", tau)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, value in (("ramp_steps_per_unit", ramp), ("penalty_weight", penalty_weight), ("grad_clip", grad_clip)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {TRAINABLE}, got {train!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
