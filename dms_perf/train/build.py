"""Rebuild the tokenizer and a base model from seeds: ``python -m dms_perf.train.build --out DIR``.

Writes ``DIR/tokenizer/`` and ``DIR/<model name>/`` (model.safetensors, config.json, the tokenizer,
training.json with the loss log and the per-phase retrieval curve, eval.json with the final scores),
a checkpoint ``dms_perf.model.qwen3_dms.load_model`` loads as it is. The final scores are taken through
Qwen3-DMS with eviction off, from the saved (bf16) weights. docs/models.md has the recipes and results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dms_perf.train.pretrain import RECIPES, pretrain, save_checkpoint
from dms_perf.train.tokenizer import save_tokenizer, train_tokenizer

# Prompts per (set, context) in the curve taken after each phase (the final evaluation uses --eval-prompts).
CURVE_PROMPTS = 30


def evaluate_checkpoint(directory: Path, contexts, *, device: str, prompts: int, log=print) -> dict:
    """Scores of the saved checkpoint, loaded with ``load_model`` as Qwen3-DMS, eviction off."""
    from dms_perf.model.qwen3_dms import load_model
    from dms_perf.train.evaluate import evaluate

    cuda = device == "cuda"
    model = load_model(str(directory), backend="triton" if cuda else "hub",
                       dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    model.set_dms_eviction(False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    started = time.perf_counter()
    scores = evaluate(model, tokenizer, contexts, n=prompts)
    scores.update(prompts=prompts, backend=model.dms_backend, dtype=str(model.dtype), eviction=False,
                  seconds=round(time.perf_counter() - started, 1))
    log(f"final: {json.dumps(scores)}")
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms_perf.train.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--size", choices=sorted(RECIPES), default="small",
                        help="small: CPU, minutes; mid and base: one GPU (see docs/models.md)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="tokenizer, weights and data seed")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 can be faster on a busy shared CPU)")
    parser.add_argument("--eval-prompts", type=int, default=100, metavar="N",
                        help="retrieval prompts per set and context in the final evaluation (0: none)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with open(out / "build.log", "a") as f:
            f.write(line + "\n")

    recipe = RECIPES[args.size](args.seed)
    workers = args.workers if args.workers is not None else (min(8, (os.cpu_count() or 2) - 2) if args.device == "cuda"
                                                             else 0)
    log(f"{date.today()} {platform.node()} {platform.processor() or platform.machine()} "
        f"{os.cpu_count()} cores ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"device {args.device}, recipe {recipe.name}: {recipe.steps} steps, {recipe.tokens / 1e6:.1f}M tokens")

    started = time.perf_counter()
    tokenizer = train_tokenizer(args.seed)
    save_tokenizer(tokenizer, out / "tokenizer")
    log(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - started:.1f}s")

    from dms_perf.train.evaluate import retrieval_accuracy, retrieval_prompts

    def curve(model, steps, phase):
        # The checkpoint of the last finished phase, so that a run cut short (a time limit) leaves one.
        save_checkpoint(model, tokenizer, out / recipe.name)
        length = max(phase.length, 256)  # the shortest prompts the held-out set fits in
        return {f"{which}@{length}": retrieval_accuracy(
            model, tokenizer, retrieval_prompts(tokenizer, length, CURVE_PROMPTS, which=which))
            for which in ("heldout", "suite")}

    model, record = pretrain(recipe, tokenizer, device=args.device, workers=workers, log=log, on_phase_end=curve)
    record["machine"] = {"date": str(date.today()), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "torch": torch.__version__, "load_average": os.getloadavg(),
                         "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    directory = save_checkpoint(model, tokenizer, out / recipe.name, record=record)
    log(f"saved {directory} ({sum(f.stat().st_size for f in directory.iterdir()) / 1e6:.1f} MB); "
        f"training {record['train_seconds']:.0f}s")
    if args.eval_prompts:
        scores = evaluate_checkpoint(directory, recipe.eval_contexts, device=args.device, prompts=args.eval_prompts,
                                     log=log)
        (directory / "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
    log(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
