"""Rebuild the DMS retrofits of a small base model from seeds, and measure them:
``python -m dms_perf.train.retrofit_build --base models/qwen3-synth-mid --out models --ratios 2,4,8``.

For each ratio CR it writes ``OUT/<base name>-dms-<CR>x/`` (bf16 safetensors, config with the ``dms_*``
fields, the base's tokenizer, ``retrofit.json`` with the settings and per-step history). The training text is
the training generator (``dms_perf.train.data.Corpus``, the default mix) at seeds ``DATA_SEED + k`` for batch
k, apart from the pretraining seeds (``dms_perf.train.pretrain.Batches``) and from ``EVAL_SEED``.

``--eval`` then scores the dense base, each retrofit and a random-decision baseline at the same eviction
rate on held-out prose (``EVAL_SEED``) and writes ``OUT/<base name>-dms-eval.json`` (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

# Batch k of a retrofit's data comes from generator seed DATA_SEED + k (pretraining uses seeds below 5e9
# for recipe seed 0-4: (seed * 1000 + phase) * 1e6 + k).
DATA_SEED = 70_000_000_000
# Held-out evaluation text: a seed neither pretraining nor the retrofit uses.
EVAL_SEED = 90_000_000_017


def data_batches(tokenizer, *, seq_len: int, batch: int, seed: int = DATA_SEED, answers: bool = False):
    """Endless ``[batch, seq_len]`` batches of the training mix, batch k from generator seed ``seed + k``;
    ``answers``: ``(ids, answers)`` pairs instead (``Corpus.batch_with_answers``, for ``answer_weight``)."""
    from dms_perf.train.data import Corpus

    k = 0
    while True:
        corpus = Corpus(tokenizer, seed + k)
        yield corpus.batch_with_answers(seq_len, batch) if answers else corpus.batch(seq_len, batch)
        k += 1


def heldout_documents(tokenizer, *, documents: int, length: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """``[documents, length]`` prose documents of the training generator at a seed no training uses."""
    from dms_perf.train.data import Corpus, Mix

    corpus = Corpus(tokenizer, seed, Mix(retrieval=0.0))
    return torch.cat([corpus.batch(length, 1) for _ in range(documents)])


def retrofit_one(base: Path, out: Path, ratio: float, *, window: int, seq_len: int, batch: int, steps: int,
                 ramp: float, lr: float, seed: int, device: str = "cpu", train: str = "decision",
                 answer_weight: float = 1.0, log=print) -> dict:
    from transformers import AutoTokenizer

    from dms_perf.train.checkpoint import load_for_retrofit, save_retrofitted
    from dms_perf.train.retrofit import retrofit

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    models = load_for_retrofit(base, window=window, dtype=torch.float32, device=device)
    started = time.perf_counter()
    batches = data_batches(tokenizer, seq_len=seq_len, batch=batch, answers=answer_weight != 1)
    result = retrofit(models.student, models.teacher, batches, compression_ratio=ratio, steps=steps, window=window,
                      lr=lr, ramp_steps_per_unit=ramp, seed=seed, train=train, answer_weight=answer_weight, log=log,
                      log_every=25)
    seconds = time.perf_counter() - started
    model = result.model.to(device="cpu", dtype=torch.bfloat16)
    record = {**result.settings, "seq_len": seq_len, "batch": batch, "data_seed": DATA_SEED,
              "train_seconds": round(seconds, 1), "source": str(base),
              "machine": {"date": str(date.today()), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "load_average": os.getloadavg()},
              "history": result.history_dicts()}
    save_retrofitted(model, out, source=base, compression_ratio=ratio, record=record)
    log(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {seconds:.0f}s")
    return record


def kept_fraction(evicted: torch.Tensor, window: int) -> float:
    """Fraction of the N prefilled tokens still in the cache after the prefill, over layers and KV heads.

    ``evicted``: ``[L, B, H, N - 1]`` (token j marked by token j+1's decision). Token j is gone once it is
    marked and more than ``window`` tokens old at the last position N - 1; the newest token is always kept.
    """
    n = evicted.shape[-1] + 1
    age = (n - 1) - torch.arange(n - 1, device=evicted.device)
    gone = evicted.bool() & (age > window)
    return 1.0 - float(gone.float().sum(-1).mean()) / n


@torch.inference_mode()
def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="sum")
    return loss.item(), ids[:, 1:].numel()


@torch.inference_mode()
def measure(directory: Path, docs: torch.Tensor, *, evict: bool) -> dict:
    """Perplexity of ``directory`` loaded with ``load_model`` (Qwen3-DMS, "math" backend, fp32), eviction on or
    off, and its measured decisions (the hard training forward, which takes the inference decisions)."""
    from dms_perf.model.qwen3_dms import load_model

    return _measure_model(load_model(str(directory), backend="math", dtype=torch.float32), docs, evict=evict)


@torch.inference_mode()
def _measure_model(model, docs: torch.Tensor, *, evict: bool) -> dict:
    from dms_perf.train.forward import dms_training_forward

    model.set_dms_eviction(evict)
    window = model.config.dms_window_size
    total = count = 0
    marked, kept, gap = [], [], 0.0
    for row in docs:
        ids = row[None]
        logits = model(input_ids=ids, use_cache=False).logits
        nll, n = _nll(logits, ids)
        total, count = total + nll, count + n
        hard = dms_training_forward(model, ids, hard=True)
        evicted = hard.evicted if evict else torch.zeros_like(hard.evicted)
        marked.append(float(evicted.float().mean()))
        kept.append(kept_fraction(evicted, window))
        if evict:  # the training forward and the model's own prefill agree (tests/train/test_forward.py)
            gap = max(gap, float((hard.logits - logits).abs().max()))
    return {"perplexity": math.exp(total / count), "marked": sum(marked) / len(marked),
            "kept": sum(kept) / len(kept), "window": window, "training_forward_max_gap": gap}


@torch.inference_mode()
def measure_random(base: Path, docs: torch.Tensor, rate: float, *, window: int, seed: int = 0) -> dict:
    """The base model with decisions drawn at random (Bernoulli ``rate``, independently per layer, KV head and
    token) under the DMS rule with ``window``: untrained DMS at the same eviction rate.

    Done with the training forward: the borrowed rows are zero, so every decision logit is
    ``-dms_initial_alpha_offset``; with the offset at ``log((1 - rate) / rate)``, logistic noise and a tiny
    temperature, each decision is 1 with probability ``rate`` and otherwise 0 (to within 1e-30).
    """
    from dms_perf.train.checkpoint import load_for_retrofit
    from dms_perf.train.forward import dms_training_forward

    student = load_for_retrofit(base, window=window, dtype=torch.float32).student
    student.config.dms_initial_alpha_offset = math.log((1 - rate) / rate)
    generator = torch.Generator().manual_seed(seed)
    total = count = 0
    marked, kept = [], []
    for row in docs:
        ids = row[None]
        out = dms_training_forward(student, ids, tau=1e-4, generator=generator)
        nll, n = _nll(out.logits, ids)
        total, count = total + nll, count + n
        evicted = out.evict_prob > 0.5
        marked.append(float(evicted.float().mean()))
        kept.append(kept_fraction(evicted, window))
    return {"perplexity": math.exp(total / count), "marked": sum(marked) / len(marked),
            "kept": sum(kept) / len(kept), "window": window, "decisions": f"random, rate {rate:.4f}, seed {seed}"}


@torch.inference_mode()
def measure_untrained(base: Path, docs: torch.Tensor, rate: float, *, window: int, seed: int = 0) -> dict:
    """Untrained DMS on the base: its zero decision rows drawn at random (``draw_decision_rows``, as
    ``dms-calibrated`` does), the offset calibrated (``calibrate_dms``) to mark ``rate`` of the decisions on
    ``docs`` themselves, then measured as a retrofit (``measure``): decisions that read the hidden state
    through weights no training shaped."""
    from dms_perf.model.calibrate import calibrate_dms, draw_decision_rows
    from dms_perf.model.qwen3_dms import load_model
    from dms_perf.train.checkpoint import retrofit_config

    model = load_model(str(base), backend="math", dtype=torch.float32, config=retrofit_config(base, window=window))
    draw_decision_rows(model, seed)
    model.set_dms_eviction(True)
    calibrate_dms(model, target_cr=1 / (1 - rate), input_ids=docs)
    row = _measure_model(model, docs, evict=True)
    row["decisions"] = f"decision rows drawn at random (seed {seed}), offset calibrated to rate {rate:.4f}"
    return row


def evaluate_all(base: Path, retrofits: dict[float, Path], *, documents: int, length: int, log=print) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    docs = heldout_documents(tokenizer, documents=documents, length=length)
    started = time.perf_counter()
    rows = {"dense": measure(base, docs, evict=False), "base, eviction on": measure(base, docs, evict=True)}
    log(f"dense {rows['dense']}")
    log(f"base, eviction on {rows['base, eviction on']}")
    for ratio, directory in retrofits.items():
        row = measure(directory, docs, evict=True)
        rows[f"DMS {ratio:g}x"] = row
        log(f"DMS {ratio:g}x {row}")
        rand = measure_random(base, docs, max(row["marked"], 1e-6), window=row["window"])
        rows[f"random {ratio:g}x"] = rand
        log(f"random {ratio:g}x {rand}")
        untrained = measure_untrained(base, docs, max(row["marked"], 1e-6), window=row["window"])
        rows[f"untrained {ratio:g}x"] = untrained
        log(f"untrained {ratio:g}x {untrained}")
    if retrofits:  # every token outside the window evicted: the most any decision rule could lose here
        window = rows[f"DMS {next(iter(retrofits)):g}x"]["window"]
        rows["window only"] = measure_random(base, docs, 1 - 1e-12, window=window)
        rows["window only"]["decisions"] = "every token evicted (a sliding window)"
        log(f"window only {rows['window only']}")
    return {"heldout_seed": EVAL_SEED, "documents": documents, "length": length, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1), "date": str(date.today()),
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms_perf.train.retrofit_build", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, metavar="DIR", help="the Qwen3 base checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="where <base name>-dms-<CR>x/ go")
    parser.add_argument("--ratios", default="2,4,8", help="compression ratios, comma-separated")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ramp", type=float, default=25, help="steps per unit of compression ratio")
    parser.add_argument("--hold", type=int, default=100, help="steps after the ramp (steps = ramp * (CR - 1) + hold)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="the Gumbel noise seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the retrofits train")
    parser.add_argument("--train", choices=("decision", "all"), default="decision",
                        help="decision: only the borrowed q_proj rows (the decisions); all: every weight, as the paper")
    parser.add_argument("--answer-weight", type=float, default=1.0, metavar="W",
                        help="weight of the distillation KL where the next token is a retrieval answer (1: plain mean)")
    parser.add_argument("--skip-train", action="store_true", help="only --eval the existing retrofits")
    parser.add_argument("--eval", action="store_true", help="measure perplexity and kept fraction afterwards")
    parser.add_argument("--eval-documents", type=int, default=8)
    parser.add_argument("--eval-length", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if not args.answer_weight > 0:
        parser.error(f"--answer-weight must be > 0, got {args.answer_weight}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base, out = Path(args.base), Path(args.out)
    ratios = [float(r) for r in args.ratios.split(",")]
    retrofits = {r: out / f"{base.name}-dms-{r:g}x" for r in ratios}
    started = time.perf_counter()
    if not args.skip_train:
        for ratio, directory in retrofits.items():
            steps = int(round(args.ramp * (ratio - 1))) + args.hold
            print(f"retrofit {base} -> {directory}: CR {ratio:g}, window {args.window}, {steps} steps of "
                  f"{args.batch} x {args.seq_len}, ramp {args.ramp:g}/unit, lr {args.lr:g}, training {args.train}"
                  + (f", answer weight {args.answer_weight:g}" if args.answer_weight != 1 else ""), flush=True)
            retrofit_one(base, directory, ratio, window=args.window, seq_len=args.seq_len, batch=args.batch,
                         steps=steps, ramp=args.ramp, lr=args.lr, seed=args.seed, device=args.device, train=args.train,
                         answer_weight=args.answer_weight, log=lambda s: print(s, flush=True))
    if args.eval:
        result = evaluate_all(base, retrofits, documents=args.eval_documents, length=args.eval_length,
                              log=lambda s: print(s, flush=True))
        (out / f"{base.name}-dms-eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
