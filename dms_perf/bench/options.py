"""Defaults and parsers shared by the pytest options (conftest.py) and the ``dms-perf`` CLI."""

from __future__ import annotations

import argparse
import textwrap

import torch

from dms_perf._runtime import HAS_CUDA

CPU_CONTEXT_LENGTHS = (64, 256, 1024)
GPU_CONTEXT_LENGTHS = (4096, 8192, 16384, 32768)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the method list kept one per line (the CLI's sub-command parsers). An
    option without a default (None) says in its own words what happens without it: no "(default: None)"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

    def _split_lines(self, text, width):  # method names such as dms-hub-triton stay whole on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


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
