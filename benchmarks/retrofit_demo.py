"""What a short retrofit buys on a tiny random Qwen3 (CPU, about a minute): held-out KL to the original
model with hard eviction at inference, against the same weights with the decision offset calibrated to the
same eviction rate (docs/DMS.md, "Random weights": the way the suite models DMS without the checkpoint).

    python -m benchmarks.retrofit_demo [--train decision] [--compression-ratio 2] [--steps 120] [--lr 2e-3]

Data: random sentences of the workload's filler text as word ids (no tokenizer). Rows (all on the same
held-out sequences, the teacher being the original vanilla Qwen3):
``retrofitted``: ``dms_perf.train.retrofit.retrofit`` from the original weights, borrowed rows zeroed first;
``calibrated``: the original weights as Qwen3-DMS, ``calibrate_dms`` to the retrofitted model's measured rate;
each also with eviction off, which isolates what the borrowed channel's zeroing (and, for train q/all, the
drift of the other weights) costs from what the evictions cost. Random weights: the numbers describe the
method's mechanics, not a language model's quality.
"""

from __future__ import annotations

import argparse
import time

import torch

from dms_perf.bench.workloads import FILLER
from dms_perf.model.calibrate import calibrate_dms
from dms_perf.model.qwen3_dms import build_model, tiny_config
from dms_perf.train.forward import dms_training_forward
from dms_perf.train.losses import distillation_loss
from dms_perf.train.retrofit import TRAINABLE, format_record, retrofit


def _sentences(count: int, generator: torch.Generator) -> torch.Tensor:
    """Word ids (one id per distinct word of the workload's filler text) of ``count`` random filler sentences:
    text with structure (repeated words and sentences) without a tokenizer."""
    vocab = {word: i for i, word in enumerate(sorted({w for line in FILLER for w in line.split()}))}
    picks = torch.randint(0, len(FILLER), (count,), generator=generator).tolist()
    return torch.tensor([vocab[w] for i in picks for w in FILLER[i].split()])


def _held_out_kl(model, teacher_logits, ids) -> tuple[float, float]:
    """(eviction rate, KL(teacher || model)) of the model's own inference forward ("math" backend)."""
    model.set_dms_backend("math")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        rate = dms_training_forward(model, ids, hard=True).eviction_rate  # the same decisions (test_forward.py)
    return rate, float(distillation_loss(logits, teacher_logits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", choices=TRAINABLE, default="decision")
    parser.add_argument("--compression-ratio", type=float, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = tiny_config(dms_window_size=args.window)
    teacher = build_model(config, backend=None, seed=args.seed)
    student = build_model(config, backend="math", seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    text = _sentences(2000, generator)

    def batches():
        while True:
            starts = torch.randint(0, text.numel() - args.seq_len, (args.batch,), generator=generator).tolist()
            yield torch.stack([text[s : s + args.seq_len] for s in starts])

    start = time.perf_counter()
    result = retrofit(student, teacher, batches(), compression_ratio=args.compression_ratio, steps=args.steps,
                      lr=args.lr, ramp_steps_per_unit=4, tau=args.tau, train=args.train, seed=args.seed,
                      log=print, log_every=max(1, args.steps // 6))
    print(f"trained in {time.perf_counter() - start:.0f} s")

    held_out = _sentences(400, torch.Generator().manual_seed(99))[: 4 * args.seq_len].view(4, args.seq_len)
    with torch.no_grad():
        reference = teacher(held_out, use_cache=False).logits
    rows = []
    rate, kl = _held_out_kl(result.model, reference, held_out)
    rows.append((f"retrofitted (train {args.train})", rate, kl))
    result.model.set_dms_eviction(False)
    rows.append(("  the same, eviction off", 0.0, _held_out_kl(result.model, reference, held_out)[1]))
    calibrated = build_model(config, backend="math", seed=args.seed)
    calibrate_dms(calibrated, target_cr=1 / (1 - rate), input_ids=held_out)
    rows.append(("original weights, offset calibrated", *_held_out_kl(calibrated, reference, held_out)))
    calibrated.set_dms_eviction(False)
    rows.append(("  the same, eviction off", 0.0, _held_out_kl(calibrated, reference, held_out)[1]))
    print(format_record(result.history[-1], args.steps))
    print("\n| model | evicted (held out) | KL to the original |\n|---|---|---|")
    for name, evicted, divergence in rows:
        print(f"| {name} | {evicted:.3f} | {divergence:.5f} |")


if __name__ == "__main__":
    main()
