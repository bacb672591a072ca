"""Record a trained DMS checkpoint's kept fraction per (layer, KV head), for the decode benchmarks' "trained"
spread (``benchmarks/test_decode_step.py``): real DMS models evict unevenly across heads, unlike random
weights whose eviction is calibrated to one ratio.

    python -m benchmarks.eviction_pattern --model models/qwen3-synth-mid-dms-8x \\
        --out benchmarks/eviction_patterns/qwen3-synth-mid-dms-8x.json

Held-out prose of the training generator (``dms_perf.train.data``, a seed no training uses) is prefilled with
eviction on, ``--documents`` times; a head's kept fraction is the rows its cache holds over the tokens seen,
averaged over the documents. Runs on a CPU in seconds for the committed small checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PATTERN_DIR = Path(__file__).parent / "eviction_patterns"


def kept_fractions(model, tokenizer, *, tokens: int, documents: int, seed: int) -> list[list[float]]:
    """``[layers][kv_heads]`` mean fraction of the ``tokens`` prompt tokens each head's cache holds."""
    from dms_perf.train.data import Corpus, Mix

    corpus = Corpus(tokenizer, seed, Mix(retrieval=0.0))
    device = next(model.parameters()).device
    sums = None
    with torch.inference_mode():
        for _ in range(documents):
            cache = model.make_dms_cache(pooled=False)
            model(input_ids=corpus.batch(tokens, 1).to(device), past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            held = torch.stack([cache.head_lengths(i)[0].double() for i in range(len(cache.layers))]) / tokens
            sums = held if sums is None else sums + held
    return (sums / documents).tolist()


def main(argv: list[str] | None = None) -> int:
    from dms_perf.bench.workloads import load_tokenizer
    from dms_perf.model.qwen3_dms import load_model
    from dms_perf.train.evaluate import HELDOUT_SEED

    parser = argparse.ArgumentParser(prog="python -m benchmarks.eviction_pattern",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a Qwen3-DMS checkpoint directory with its tokenizer")
    parser.add_argument("--out", required=True, metavar="JSON")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt tokens per document")
    parser.add_argument("--documents", type=int, default=4)
    args = parser.parse_args(argv)
    model = load_model(args.model, backend="triton", dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(args.model)
    fractions = kept_fractions(model, tokenizer, tokens=args.tokens, documents=args.documents, seed=HELDOUT_SEED)
    flat = [f for layer in fractions for f in layer]
    record = {
        "model": args.model, "tokens": args.tokens, "documents": args.documents, "text_seed": HELDOUT_SEED,
        "window": model.config.dms_window_size, "kept_fraction": fractions,
        "mean": sum(flat) / len(flat), "max_over_mean": max(flat) / (sum(flat) / len(flat)),
        "command": "python -m benchmarks.eviction_pattern " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.out}: mean kept {record['mean']:.3f}, max over mean {record['max_over_mean']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
