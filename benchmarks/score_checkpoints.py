"""Score DMS checkpoints the way docs/models.md's retrofit trials were scored: retrieval on both sets at each
context, held-out perplexity, the fraction of a suite prompt's tokens the cache keeps after its prefill (10
prompts per context, ``kept_fraction`` of the hard training forward), and retrieval on the suite at the longest
context with eviction switched off (every borrowed q_proj row zeroed by ``zero_borrowed_channel``: each
decision logit is then ``-dms_initial_alpha_offset``, so nothing is marked, and the borrowed channel still
leaves attention). A
retrofit that misses with eviction on but retrieves with it off loses the needle to its decisions; one that
misses both ways lost it in its weights.

    python -m benchmarks.score_checkpoints --out scores.json --device cuda \\
        models/qwen3-synth-mid-dms-8x models/qwen3-synth-mid-dms-4x

On a GPU it runs the Triton backend in bf16; on a CPU the math backend in fp32 (the interpreter is too slow
for 100 prompts). A base whose borrowed rows are zero (the committed ``models/qwen3-synth-mid``) evicts nothing
either way, so its two suite figures agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def score(directory: str, *, contexts: tuple[int, ...], prompts: int, device: str, suite_only: bool = False) -> dict:
    from dms_perf.bench.workloads import load_tokenizer
    from dms_perf.model.qwen3_dms import load_model
    from dms_perf.train.evaluate import evaluate, retrieval_accuracy, retrieval_prompts
    from dms_perf.train.forward import dms_training_forward
    from dms_perf.train.retrofit import zero_borrowed_channel
    from dms_perf.train.retrofit_build import kept_fraction

    backend, dtype = ("triton", torch.bfloat16) if device == "cuda" else ("math", torch.float32)
    started = time.perf_counter()
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, backend=backend, dtype=dtype, device=device)
    if suite_only:  # retrieval on the suite alone: a larger sample of the figure the targets are set on
        suite = {c: retrieval_accuracy(model, tokenizer, retrieval_prompts(tokenizer, c, prompts, which="suite"))
                 for c in contexts}
        return {"retrieval": {"suite": suite}, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
                "prompts": prompts, "seconds": round(time.perf_counter() - started, 1)}
    result = evaluate(model, tokenizer, contexts, n=prompts)
    result.update(backend=backend, dtype=str(dtype).removeprefix("torch."), prompts=prompts)
    with torch.inference_mode():
        result["kept_suite"] = {}
        for context in contexts:
            ids = torch.cat([p.input_ids for p in retrieval_prompts(tokenizer, context, 10, which="suite")])
            evicted = dms_training_forward(model, ids.to(device), hard=True).evicted
            result["kept_suite"][context] = kept_fraction(evicted, model.config.dms_window_size)
    zero_borrowed_channel(model)
    longest = max(contexts)
    result["suite_without_eviction"] = {
        longest: retrieval_accuracy(model, tokenizer, retrieval_prompts(tokenizer, longest, prompts, which="suite"))
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="DIR", help="checkpoint directories, tokenizer included")
    parser.add_argument("--out", required=True, metavar="JSON")
    parser.add_argument("--contexts", default="1024,2048", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--prompts", type=int, default=100, help="retrieval prompts per set and context")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--suite-only", action="store_true",
                        help="retrieval on the suite set at each context only (no heldout set, perplexity, kept "
                        "fraction or eviction-off run): many prompts in less time")
    args = parser.parse_args(argv)
    try:
        contexts = tuple(int(c) for c in args.contexts.split(","))
    except ValueError:
        parser.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if args.prompts < 1 or min(contexts) < 1:
        parser.error("--prompts and every --contexts value must be positive")
    for directory in args.models:
        if not (Path(directory) / "config.json").is_file():
            parser.error(f"{directory}: no config.json (not a checkpoint directory)")
    scores = {}
    for directory in args.models:
        scores[directory] = score(directory, contexts=contexts, prompts=args.prompts, device=args.device,
                                  suite_only=args.suite_only)
        print(directory, json.dumps(scores[directory]), flush=True)
        Path(args.out).write_text(json.dumps(scores, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
