"""Defaults and parsers shared by the pytest options (conftest.py) and the ``dms-perf`` CLI."""

from __future__ import annotations

import argparse
import math
import textwrap

import torch

from dms_perf._runtime import HAS_CUDA

CPU_CONTEXT_LENGTHS = (64, 256, 1024)
GPU_CONTEXT_LENGTHS = (4096, 8192, 16384, 32768)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The model a command runs by default: the tiny random one on the CPU (Triton's interpreter), the
# Qwen3-8B-DMS shape in bf16 on a GPU.
CPU_MODEL = {"model": "tiny", "dtype": "float32"}
GPU_MODEL = {"model": "qwen3-8b", "dtype": "bfloat16"}
DEFAULT_TARGET_CR = 8


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the method list kept one per line (the CLI's sub-command parsers). An
    option without a default (None) says in its own words what happens without it: no "(default: None)"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

    def _split_lines(self, text, width):  # method names such as dms-hub-triton stay whole on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

def defaults_text(cpu: dict, gpu: dict) -> str:
    """A command's CPU and GPU defaults as option lines (``--methods`` on a line of its own), and which of
    them this machine uses."""
    lines = [f"defaults (this machine {'has a CUDA GPU: the GPU' if HAS_CUDA else 'has no CUDA GPU: the CPU'} ones):"]
    for label, d in (("CPU", cpu), ("GPU", gpu)):
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items() if k != "methods")
        lines.append(f"  {label} default: {options}")
        lines.append(f"  {' ' * len(label)}          --methods {d['methods']}")
    return "\n".join(lines)


def add_workload_options(parser: argparse.ArgumentParser, defaults: dict, *, methods_help: str) -> None:
    """``--contexts`` and ``--methods``, as ``bench`` and ``capacity`` take them."""
    parser.add_argument("--contexts", default=defaults["contexts"], metavar="LENGTHS",
                        help="comma-separated prompt lengths in tokens, e.g. 4k,8k,16k,32k or 4096 (a length "
                        "written twice runs once); each plus the tokens generated must fit the model's positions")
    parser.add_argument("--methods", default=defaults["methods"], metavar="NAMES", help=methods_help)


def add_model_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """``--model``, ``--dtype``, ``--target-cr`` and ``--seed``, as ``bench`` and ``capacity`` take them."""
    parser.add_argument("--model", default=defaults["model"], metavar="MODEL",
                        help="'tiny' (random tiny Qwen3), 'qwen3-8b' (random weights, Qwen3-8B-DMS shape), a local "
                        "checkpoint directory (holding config.json and the weights, e.g. Qwen3-8B-DMS-8x "
                        "downloaded) or a hub id such as nvidia/Qwen3-8B-DMS-8x (needs the hub or its local cache)")
    names = sorted(DTYPES)
    parser.add_argument("--dtype", choices=names, default=defaults["dtype"], metavar="DTYPE",
                        help=f"model weights and activations: {', '.join(names[:-1])} or {names[-1]}")
    parser.add_argument("--target-cr", type=float, default=DEFAULT_TARGET_CR, metavar="RATIO",
                        help="with random weights, calibrate DMS eviction to this compression ratio, above 1 "
                        "(docs/DMS.md); 0 keeps the config's offset. Ignored for checkpoints")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random weights and token ids")


def check_target_cr(value: float) -> float:
    """``--target-cr``: 0 (off: the config's offset) or a compression ratio > 1; ValueError naming the value."""
    if value == 0 or (math.isfinite(value) and value > 1):
        return value
    raise ValueError(f"--target-cr must be 0 (off) or > 1, got {value:g}")


def default_context_lengths() -> tuple[int, ...]:
    return GPU_CONTEXT_LENGTHS if HAS_CUDA else CPU_CONTEXT_LENGTHS


def parse_token_count(text: str) -> int:
    """``"4k"`` -> 4096, ``"1024"`` -> 1024, ``"1.5k"`` -> 1536."""
    s = text.strip().lower()
    mult = 1
    if s.endswith("k"):
        s, mult = s[:-1], 1024
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"not a token count: {text!r} (expected e.g. 4096 or 4k)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"not a positive whole token count: {text!r}")
    return int(value)


def parse_context_lengths(text: str | None) -> tuple[int, ...]:
    """``"4k,8k,4096"`` -> (4096, 8192): a length written twice (in any form) is one length, kept where it
    first appears; the defaults for an empty text."""
    if not text:
        return default_context_lengths()
    return tuple(dict.fromkeys(parse_token_count(t) for t in text.split(",") if t.strip()))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32), repeats dropped; ValueError naming the value for anything but positive
    whole numbers."""
    sizes: dict[int, None] = {}
    for part in (t.strip() for t in text.split(",")):
        if not part.isdecimal() or int(part) < 1:
            raise ValueError(f"--batch: not a batch size: {part!r} (expected positive whole numbers, e.g. 1,8,32)")
        sizes[int(part)] = None
    return tuple(sizes)


def parse_names(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


def test_dtypes() -> tuple[torch.dtype, ...]:
    """fp32/fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 ``tl.dot`` is wrong)."""
    return (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)


def position_limit(model: str) -> int | None:
    """``max_position_embeddings`` of ``model``'s config (``config_of``: a random model's, a checkpoint's or a
    cached hub id's); None where it cannot be read here (the model's own load then decides)."""
    from dms_perf.bench.methods import config_of

    try:
        limit = getattr(config_of(model), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None
    return limit if isinstance(limit, int) and limit > 0 else None


def positions_problem(model: str, contexts, new_tokens: int) -> str | None:
    """Why a context of ``contexts`` does not fit the model's positions with ``new_tokens`` generated after
    it (one line), or None."""
    limit = position_limit(model)
    too_long = [c for c in contexts if c + new_tokens > limit] if limit else []
    if not too_long:
        return None
    values = ", ".join(str(c) for c in too_long)
    return (f"--contexts {values}: a prompt and its --new-tokens {new_tokens} must fit the model's positions, but "
            f"--model {model} has {limit} (max_position_embeddings): contexts up to {limit - new_tokens} tokens")
