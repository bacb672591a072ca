"""Pretrain a small Qwen3 base model on the generated mix (``dms_perf.train.data``), from a seed.

Next-token loss (answer ids weighted more: ``Recipe.answer_weight``), AdamW, linear warm-up then cosine
decay, gradient clipping; a curriculum of phases from short to long documents (``Phase``). fp32 on CPU,
bf16 autocast on CUDA.

The borrowed channel. Qwen3-DMS reads its decisions from the last query channel of the first query head
of each KV group and zeroes that channel in attention, before and after RoPE (docs/DMS.md, "Decisions").
RoPE pairs channel ``D - 1`` with ``D/2 - 1``, so here the q_proj rows of both channels of those heads
are zero and stay zero during training (``borrowed_rows``). Then plain Qwen3 and Qwen3-DMS with eviction
off compute the same thing: the model trains as plain Qwen3 (SDPA, fast) and is evaluated as Qwen3-DMS
with identical results, and the suite's vanilla and dense DMS methods see one model. The decision input
``a`` starts at exactly 0 (``logit = -dms_initial_alpha_offset``: nothing marked); retrofitting DMS learns
those rows.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dms_perf.model.qwen3_dms import DMS_DEFAULTS
from dms_perf.train.data import Corpus, Mix


@dataclass(frozen=True)
class Shape:
    """A Qwen3 shape: GQA with ``heads`` query heads over ``kv_heads`` KV heads of ``head_dim``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 2048
    rope_theta: float = 10000.0
    max_positions: int = 4096


@dataclass(frozen=True)
class Phase:
    """``steps`` optimizer steps on batches of ``batch`` documents of ``length`` tokens, drawn with ``mix``
    (None: the recipe's)."""

    length: int
    batch: int
    steps: int
    mix: Mix | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything a pretraining run depends on, besides the tokenizer and the device."""

    name: str
    shape: Shape
    phases: tuple[Phase, ...]
    lr: float = 2e-3
    min_lr_fraction: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    seed: int = 0
    mix: Mix = field(default_factory=Mix)
    # q_norm / k_norm gains at initialization (None: (128 / head_dim) ** 0.25, so that a small head_dim
    # starts with the attention-logit range of Qwen3's head_dim 128) and their learning-rate multiplier:
    # with qk-norm the logit is at most sqrt(head_dim) * gain_q * gain_k, too flat at head_dim 32 to pick
    # one token out of thousands unless the gains grow.
    qk_norm_init: float | None = None
    norm_lr_scale: float = 5.0
    # Loss weight of answer ids (the codes after "Answer:") relative to every other id.
    answer_weight: float = 1.0
    eval_contexts: tuple[int, ...] = (1024,)

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def tokens(self) -> int:
        return sum(p.steps * p.batch * p.length for p in self.phases)


def model_config(shape: Shape, eos_token_id: int) -> Qwen3Config:
    """Qwen3 config of ``shape`` with the DMS fields at the checkpoint's defaults (docs/DMS.md)."""
    return Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        **DMS_DEFAULTS,
    )


def borrowed_rows(config: Qwen3Config) -> torch.Tensor:
    """q_proj output rows of the borrowed rotation pair (channels D/2-1 and D-1 of each KV group's first
    query head), int64."""
    d = config.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    heads = range(0, config.num_attention_heads, group)
    return torch.tensor([h * d + c for h in heads for c in (d // 2 - 1, d - 1)], dtype=torch.long)


def build(recipe: Recipe, eos_token_id: int, device: str | torch.device = "cpu") -> Qwen3ForCausalLM:
    """A fresh model of ``recipe.shape`` (seeded, fp32, train mode) with the borrowed rows at zero."""
    config = model_config(recipe.shape, eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(recipe.seed)
    model = Qwen3ForCausalLM(config).to(device)
    rows = borrowed_rows(config).to(device)
    gain = recipe.qk_norm_init if recipe.qk_norm_init is not None else (128 / config.head_dim) ** 0.25
    for layer in model.model.layers:
        weight = layer.self_attn.q_proj.weight
        with torch.no_grad():
            weight[rows] = 0
            layer.self_attn.q_norm.weight.fill_(gain)
            layer.self_attn.k_norm.weight.fill_(gain)
        weight.register_hook(lambda grad, rows=rows: grad.index_fill(0, rows, 0))
    return model.train()


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_fraction`` at the last step."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(recipe.steps - recipe.warmup, 1)
    floor = recipe.min_lr_fraction
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only; norm gains at ``norm_lr_scale`` times the learning rate
    (``lr_scale`` of their group, applied by ``pretrain``)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    norms = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay, "lr_scale": 1.0},
              {"params": norms, "weight_decay": 0.0, "lr_scale": recipe.norm_lr_scale}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


class Batches(torch.utils.data.Dataset):
    """Batch ``k`` of a phase, a function of (recipe seed, phase, k) only: the same data with any number
    of loader workers."""

    def __init__(self, tokenizer, recipe: Recipe, phase_index: int):
        self.tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.recipe = recipe
        self.phase_index = phase_index
        self.phase = recipe.phases[phase_index]

    def __len__(self) -> int:
        return self.phase.steps

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = (self.recipe.seed * 1000 + self.phase_index) * 1_000_000 + k
        mix = self.phase.mix or self.recipe.mix
        return Corpus(self.tokenizer, seed, mix).batch_with_answers(self.phase.length, self.phase.batch)


def weighted_loss(logits: torch.Tensor, ids: torch.Tensor, answers: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Next-token cross-entropy, each target id weighted ``answer_weight`` where ``answers`` else 1, divided
    by the total weight."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                               reduction="none")
    weights = 1.0 + (answer_weight - 1.0) * answers[:, 1:].flatten().float()
    return (losses * weights).sum() / weights.sum()


def pretrain(
    recipe: Recipe,
    tokenizer,
    *,
    device: str | torch.device = "cpu",
    workers: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 50,
    on_phase_end: Callable[[Qwen3ForCausalLM, int, Phase], dict] | None = None,
) -> tuple[Qwen3ForCausalLM, dict]:
    """Train a model on ``recipe``; returns it (eval mode) and a record: per-step loss every ``log_every``
    steps, seconds, tokens, and what ``on_phase_end(model, steps_done, phase)`` returned after each phase."""
    device = torch.device(device)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model = build(recipe, eos, device)
    opt = optimizer(model, recipe)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    record: dict = {"recipe": asdict(recipe), "device": str(device), "log": [], "phases": []}
    step, tokens, train_seconds = 0, 0, 0.0
    started = time.perf_counter()
    for index, phase in enumerate(recipe.phases):
        loader = torch.utils.data.DataLoader(Batches(tokenizer, recipe, index), batch_size=None, shuffle=False,
                                             num_workers=workers, pin_memory=cuda,
                                             persistent_workers=False, prefetch_factor=4 if workers else None)
        model.train()
        phase_start = time.perf_counter()
        for ids, answers in loader:
            ids, answers = ids.to(device, non_blocking=True), answers.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = learning_rate(recipe, step) * group["lr_scale"]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = weighted_loss(logits, ids, answers, recipe.answer_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += ids.numel()
            if step % log_every == 0 or step == recipe.steps:
                elapsed = time.perf_counter() - started
                record["log"].append({"step": step, "length": phase.length, "loss": round(loss.item(), 4),
                                      "lr": learning_rate(recipe, step - 1), "seconds": round(elapsed, 1)})
                log(f"step {step}/{recipe.steps} len {phase.length} loss {loss.item():.3f} "
                    f"lr {learning_rate(recipe, step - 1):.2e} {tokens / max(elapsed, 1e-9):.0f} tok/s {elapsed:.0f}s")
        train_seconds += time.perf_counter() - phase_start
        entry = {"phase": asdict(phase), "steps_done": step, "train_seconds": round(train_seconds, 1)}
        if on_phase_end is not None:
            model.eval()
            entry.update(on_phase_end(model, step, phase))
            log(f"after phase {index} (len {phase.length}, {step} steps, {train_seconds:.0f}s training): "
                f"{json.dumps({k: v for k, v in entry.items() if k != 'phase'})}")
        record["phases"].append(entry)
    record.update(steps=step, tokens=tokens, train_seconds=round(train_seconds, 1),
                  wall_seconds=round(time.perf_counter() - started, 1))
    return model.eval(), record


def save_checkpoint(model: Qwen3ForCausalLM, tokenizer, directory: str | Path, *, dtype=torch.bfloat16,
                    record: dict | None = None) -> Path:
    """model.safetensors + config.json (+ generation_config.json) + the tokenizer (+ training.json):
    a directory ``dms_perf.model.qwen3_dms.load_model`` loads as it is."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A converted copy: the model may go on training, and rounding its own weights to bf16 would change it.
    copy.deepcopy(model).to(dtype).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    if record is not None:
        (directory / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return directory


# A curriculum of difficulty: one fact per document first (copy the only code), then two (tell keys apart),
# then the general mix.
ONE_FACT = Mix(retrieval=1.0, max_facts=1, max_questions=1)
TWO_FACTS = Mix(retrieval=1.0, max_facts=2, max_questions=2, fact_spacing=48)


def small(seed: int = 0) -> Recipe:
    """1.0M parameters (4 layers, hidden 128, 4/2 heads of 32): 8 minutes of a busy 2-core CPU (docs/models.md)."""
    shape = Shape(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate=384)
    phases = (Phase(128, 16, 300, ONE_FACT), Phase(128, 16, 300, ONE_FACT), Phase(256, 8, 300, TWO_FACTS),
              Phase(512, 4, 250), Phase(1024, 4, 200))
    return Recipe("qwen3-synth-small", shape, phases, lr=3e-3, warmup=30, seed=seed, mix=Mix(0.9, 4, 4),
                  answer_weight=10.0, eval_contexts=(1024, 2048))


def base(seed: int = 0) -> Recipe:
    """14M parameters (8 layers, hidden 384, 8/2 heads of 64), contexts to 4K: one GPU, estimated 8-15 minutes
    (never run)."""
    shape = Shape(hidden=384, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1024, max_positions=8192)
    phases = (Phase(256, 64, 1000, ONE_FACT), Phase(256, 64, 1000, TWO_FACTS), Phase(512, 32, 1500),
              Phase(1024, 16, 1500), Phase(2048, 8, 1500), Phase(4096, 4, 1500))
    return Recipe("qwen3-synth-base", shape, phases, lr=1e-3, warmup=200, seed=seed, mix=Mix(0.9, 4, 4),
                  answer_weight=10.0, eval_contexts=(1024, 2048, 4096))


def mid(seed: int = 0) -> Recipe:
    """2.9M parameters (4 layers, hidden 256, 4/2 heads of 64): one GPU, minutes; its checkpoint and three DMS
    retrofits stay near 20 MB in all. Long single-fact and two-fact phases at a large batch first: the look-up
    (match the asked key, copy its code) did not form within 1,500 small-batch CPU steps (docs/models.md)."""
    shape = Shape(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=512)
    phases = (Phase(256, 64, 2500, ONE_FACT), Phase(256, 64, 1500, TWO_FACTS), Phase(512, 32, 2000),
              Phase(1024, 16, 2500), Phase(2048, 8, 2500))
    return Recipe("qwen3-synth-mid", shape, phases, lr=1.5e-3, warmup=200, seed=seed, mix=Mix(0.9, 4, 4),
                  answer_weight=10.0, eval_contexts=(1024, 2048))


RECIPES = {"small": small, "mid": mid, "base": base}
