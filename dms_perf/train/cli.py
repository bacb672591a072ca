"""``dms-perf train``: retrofit a Qwen3 checkpoint with DMS and save the result (docs/training.md).

    dms-perf train --model ~/Qwen3-8B --data corpus/ --out qwen3-8b-dms-8x --compression-ratio 8

The CLI wires this in with ``add_parser(subparsers)``; ``run(args, parser)`` returns the exit code: 0, 2 for
a bad option, model, data or output directory (one line, before any model is loaded), 130 on Ctrl-C
(``dms_perf.bench.cli.main``).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.options import DTYPES, HelpFormatter, parse_token_count

HOLD_STEPS = 300  # default steps at the final ratio after the ramp: 1000 steps in all at 8x (~1K in the paper)
PLAIN_QWEN3_WINDOW = 512  # the released checkpoint's window, given to a plain Qwen3 checkpoint
TRAINED = {"decision": "the decision rows of q_proj", "q": "the q projections", "all": "every weight"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    device = "cuda" if HAS_CUDA else "cpu"
    parser = subparsers.add_parser(
        "train",
        help="retrofit a Qwen3 checkpoint with DMS (distillation from the original model) and save it",
        description=textwrap.fill(
            "Teach a Qwen3 (or Qwen3-DMS) checkpoint to evict KV entries: its borrowed query channel becomes the "
            "eviction logit, decisions are relaxed with a Gumbel-sigmoid, and the loss is the KL divergence from "
            "the frozen original model plus a one-sided penalty pulling the eviction rate up to a target that "
            "ramps from 1x to --compression-ratio. Writes a checkpoint directory that `dms-perf bench --model "
            "DIR` and load_model(DIR) take (safetensors, config with the dms_* fields, the tokenizer, "
            "retrofit.json with the per-step history). docs/training.md has the recipe. Exit status: 0, 2 for "
            "a bad option, --model, --data or --out (one line), 130 when interrupted (nothing is written).", 100),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Qwen3 or Qwen3-DMS checkpoint directory (config.json, weights, tokenizer files)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where to write the retrofitted checkpoint (a new or empty directory)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="training text: a text file or a directory of .txt files, tokenized with the "
                        "checkpoint's tokenizer and cut into random windows of --seq-len tokens")
    parser.add_argument("--compression-ratio", type=float, default=8, metavar="CR",
                        help="final compression ratio (>= 1): the eviction rate aimed at is 1 - 1/CR")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="DMS sliding window (recent tokens never evicted); default: the checkpoint's "
                        f"dms_window_size, {PLAIN_QWEN3_WINDOW} for a plain Qwen3 checkpoint")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimizer steps; default: the ramp to --compression-ratio plus "
                        f"{HOLD_STEPS} (1000 at 8x with the default ramp)")
    parser.add_argument("--ramp-steps-per-unit", type=float, default=100, metavar="N",
                        help="steps per unit of compression ratio of the target's linear ramp from 1x (0: "
                        "the final target from the first step)")
    parser.add_argument("--seq-len", default="4096", metavar="N",
                        help="tokens per training sequence, e.g. 4096 or 4k; must exceed --window + 1")
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-5, metavar="LR", help="AdamW learning rate")
    parser.add_argument("--tau", type=float, default=0.1, metavar="T", help="Gumbel-sigmoid temperature")
    parser.add_argument("--train", choices=("decision", "q", "all"), default="decision", metavar="WHICH",
                        help="weights to train: decision = only the q_proj rows of the borrowed channels, which "
                        "make the decisions (attention otherwise stays the original model's); q = the q "
                        "projections of every layer (~7%% of Qwen3-8B's weights); all = every weight")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if HAS_CUDA else "float32",
                        metavar="DTYPE", help="bfloat16, float16 or float32: weights and activations (trainable "
                        "weights keep fp32 copies); also the saved dtype")
    parser.add_argument("--device", default=device, metavar="DEVICE",
                        help="torch device, e.g. cuda, cuda:1 or cpu (on CUDA each layer is recomputed in "
                        "the backward pass to save memory)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the data windows and Gumbel noise")
    parser.add_argument("--log-every", type=int, default=10, metavar="N", help="progress line every N steps")
    parser.set_defaults(run=run, command_parser=parser)
    return parser


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit status 2."""


def run(args, parser) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from dms_perf.train.checkpoint import load_for_retrofit, save_retrofitted
    from dms_perf.train.retrofit import format_record, retrofit

    settings = _validate(args)
    tokenizer = _tokenizer(args.model)
    batches = _batches(args, tokenizer, settings)
    dtype = DTYPES[args.dtype]
    models = load_for_retrofit(args.model, window=settings["window"], dtype=dtype, device=args.device)
    on_cuda = torch.device(args.device).type == "cuda"
    print(f"retrofitting {args.model} to {settings['compression_ratio']:g}x: {settings['steps']} steps of "
          f"{args.batch} x {settings['seq_len']} tokens, window {settings['window']}, training "
          f"{TRAINED[args.train]}, {args.dtype} on {args.device}"
          f"{'' if models.source_is_dms else '; borrowed channel zeroed first'}", file=sys.stderr)
    result = retrofit(
        models.student, models.teacher, batches, compression_ratio=settings["compression_ratio"],
        steps=settings["steps"], window=settings["window"], lr=args.lr,
        ramp_steps_per_unit=args.ramp_steps_per_unit, tau=args.tau, train=args.train,
        zero_borrowed=not models.source_is_dms, gradient_checkpointing=on_cuda, seed=args.seed,
        log=lambda line: print(line, file=sys.stderr, flush=True), log_every=args.log_every,
    )
    record = {"source": str(args.model), "data": str(args.data), "seq_len": settings["seq_len"],
              "batch": args.batch, "dtype": args.dtype, "device": args.device, **result.settings,
              "history": result.history_dicts()}
    out = save_retrofitted(result.model, args.out, source=args.model,
                           compression_ratio=settings["compression_ratio"], record=record)
    last = result.history[-1]
    print(f"wrote {out}: last step evicted {last.eviction_rate:.3f} of the tokens ({last.compression:.2f}x before "
          f"the window; target {last.target_eviction:.3f}), KL to the original {last.kl:.4g}")
    print(format_record(last, settings["steps"]))
    return 0


def _validate(args) -> dict:
    from dms_perf.train.checkpoint import is_dms_config, read_config

    ratio = args.compression_ratio
    if not (math.isfinite(ratio) and ratio >= 1):
        raise UsageError(f"--compression-ratio must be >= 1, got {ratio:g}")
    if args.window is not None and args.window < 0:
        raise UsageError(f"--window must be >= 0, got {args.window}")
    if args.ramp_steps_per_unit < 0 or not math.isfinite(args.ramp_steps_per_unit):
        raise UsageError(f"--ramp-steps-per-unit must be >= 0, got {args.ramp_steps_per_unit:g}")
    try:
        seq_len = parse_token_count(str(args.seq_len))
    except ValueError as exc:
        raise UsageError(f"--seq-len: {exc}") from None
    for option, value in (("--batch", args.batch), ("--log-every", args.log_every)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    for option, value in (("--lr", args.lr), ("--tau", args.tau)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option} must be > 0, got {value:g}")
    _check_device(args.device)
    try:
        config = read_config(args.model)
    except ValueError as exc:
        raise UsageError(f"--model {exc}") from None
    window = args.window
    if window is None:
        window = config.dms_window_size if is_dms_config(config) else PLAIN_QWEN3_WINDOW
    if seq_len <= window + 1:
        raise UsageError(f"--seq-len {seq_len} leaves no token outside the window of {window}, so nothing could be "
                         f"evicted: use --seq-len above {window + 1} (a few windows long) or a smaller --window")
    if seq_len > config.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    steps = args.steps
    if steps is None:
        steps = math.ceil((ratio - 1) * args.ramp_steps_per_unit) + HOLD_STEPS
    _check_out(args.out, args.model)
    return {"compression_ratio": ratio, "window": window, "seq_len": seq_len, "steps": steps}


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a torch device (e.g. cuda, cuda:1, cpu)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device on this machine")
    if parsed.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: only cuda and cpu are supported")


def _check_out(out, model) -> None:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file, not a directory")
    if path.exists() and path.resolve() == Path(model).expanduser().resolve():
        raise UsageError(f"--out {out} is the --model directory: the source checkpoint would be overwritten")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"--out {out}: the directory is not empty (choose a new one, so no checkpoint is mixed "
                         "with another)")


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--model {model}: cannot load its tokenizer to read --data with: {exc}") from None
    if not tokenizer("a b c", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"--model {model}: its tokenizer encodes text to no tokens (no tokenizer files there?)")
    return tokenizer


def _batches(args, tokenizer, settings):
    from dms_perf.train.text import random_windows, read_texts, token_stream

    try:
        tokens = token_stream(read_texts(args.data), tokenizer)
    except ValueError as exc:
        raise UsageError(f"--data {exc}") from None
    if tokens.numel() < settings["seq_len"]:
        raise UsageError(f"--data {args.data}: {tokens.numel()} tokens, fewer than one sequence of "
                         f"{settings['seq_len']} (--seq-len)")
    return random_windows(tokens, settings["seq_len"], args.batch, seed=args.seed)
