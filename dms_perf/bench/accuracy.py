"""Accuracy beside speed and memory (``dms-perf bench --accuracy N``): what a method keeps, measured on the
cell whose time and KV bytes the same run records.

For one (context, method) cell, through the method's own cache path (its press prefill, its DMS eviction, the
engine it decodes on), on the model the cell was timed on:

* **retrieval**: N needle prompts of exactly the context length from a prompt source (``needle_prompts`` by
  default, any function named ``module:function`` taking the same keywords), each greedy-decoded for a few
  tokens (``answer_tokens``); the accuracy is the fraction whose answer is exact (``exact_answer``).
* **perplexity**: the first ``context`` tokens of held-out text (a text file, or ``filler_tokens``) prefilled
  as the method prefills a prompt, then the next E tokens fed one at a time (teacher forcing) through the
  method's decode, eviction on where it evicts: exp of the mean next-token loss of those E tokens. Every
  method of the registry decodes one token at a time over the cache its prefill left, so the loss is that of
  its compressed cache; a cell where this fails reports n/a with the reason.

Both never raise for a failing cell: ``measure_accuracy`` returns the fields that join the cell's row, its
``accuracy_status`` "ok" or why not.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dms_perf.bench.generation import failure_status, generate_once, prefill_prompt, press_during_run, release_memory
from dms_perf.bench.workloads import exact_answer, filler_tokens

DEFAULT_PROMPTS = "dms_perf.bench.workloads:needle_prompts"
# Tokens decoded past the longest answer: the end of the answer (a full stop, an end of turn) may take some.
ANSWER_SLACK = 2


@dataclass(frozen=True)
class RetrievalPrompt:
    """One scored prompt: ``input_ids`` [1, context] int64, the exact answer, the needle's depth (or None)."""

    input_ids: torch.Tensor
    answer: str
    depth: float | None


def load_prompt_source(spec: str | None) -> Callable[..., Sequence[Any]]:
    """The function named ``module:function`` (default ``DEFAULT_PROMPTS``), imported; ValueError in one line
    when it cannot be. It is called as ``source(context_length=..., n=..., tokenizer=..., seed=...)`` and
    returns n prompts, each with ``input_ids`` [1, context_length] and its answer in ``expected_answer`` (the
    suite's ``Workload``) or ``code`` (a trainer's held-out prompt); a ``needle_depth`` or ``depth`` is kept."""
    spec = spec or DEFAULT_PROMPTS
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--accuracy-prompts {spec!r}: expected module:function, e.g. {DEFAULT_PROMPTS}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--accuracy-prompts {spec}: cannot import {module_name}: {exc}") from None
    source = getattr(module, name, None)
    if not callable(source):
        raise ValueError(f"--accuracy-prompts {spec}: {module_name} has no function {name!r}")
    return source


def build_prompts(source, context_length: int, n: int, *, tokenizer, seed: int) -> list[RetrievalPrompt]:
    """``n`` prompts of ``context_length`` tokens from ``source`` (``load_prompt_source``), checked: as many as
    asked, each of that length and with an answer; ValueError naming what is wrong."""
    items = list(source(context_length=context_length, n=n, tokenizer=tokenizer, seed=seed))
    if len(items) != n:
        raise ValueError(f"the prompt source gave {len(items)} prompts, not {n}")
    prompts = []
    for i, item in enumerate(items):
        ids = getattr(item, "input_ids", None)
        answer = getattr(item, "expected_answer", None) or getattr(item, "code", None)
        if not torch.is_tensor(ids) or tuple(ids.shape) != (1, context_length):
            shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"prompt {i}: input_ids {shape}, not [1, {context_length}]")
        if not isinstance(answer, str) or not answer:
            raise ValueError(f"prompt {i}: no answer (expected_answer or code)")
        depth = getattr(item, "needle_depth", None)
        prompts.append(RetrievalPrompt(ids, answer, getattr(item, "depth", None) if depth is None else depth))
    return prompts


def answer_tokens(tokenizer, prompts: Sequence[RetrievalPrompt]) -> int:
    """Tokens to decode per prompt: the longest answer's (as it follows a space) plus ``ANSWER_SLACK``."""
    longest = max(len(tokenizer.encode(" " + p.answer, add_special_tokens=False)) for p in prompts)
    return longest + ANSWER_SLACK


def heldout_tokens(tokenizer, length: int, *, text_file=None, seed: int = 0) -> torch.Tensor:
    """[1, length] ids of held-out text: the start of ``text_file`` (UTF-8, tokenized whole, no special
    tokens), or ``filler_tokens`` without one. ValueError naming the file when it cannot be read or holds
    fewer tokens."""
    if text_file is None:
        return filler_tokens(tokenizer, length, seed=seed)
    from pathlib import Path

    try:
        text = Path(text_file).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"--perplexity-text {text_file}: cannot read it: {exc.strerror or exc}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < length:
        raise ValueError(f"--perplexity-text {text_file}: {len(ids)} tokens, fewer than the {length} the longest "
                         "context and --perplexity-tokens need")
    return torch.tensor([ids[:length]], dtype=torch.long)


def retrieval(model, method, prompts: Sequence[RetrievalPrompt], *, tokenizer, new_tokens: int, device,
              on_prompt: Callable[[int, int], None] | None = None) -> list[bool]:
    """Whether each prompt's greedy answer (``new_tokens`` tokens through the method's path, ``generate_once``
    with a press built for that prompt) is exact."""
    passed = []
    method.prepare(model)
    for i, prompt in enumerate(prompts):
        if on_prompt is not None:
            on_prompt(i, len(prompts))
        ids = prompt.input_ids.to(device)
        run = generate_once(model, ids, new_tokens=new_tokens, press=method.press_for(model, ids),
                            press_on_engine=method.family.press_on_engine)
        text = tokenizer.decode(run.generated_ids.tolist(), skip_special_tokens=True)
        passed.append(exact_answer(text, prompt.answer))
    return passed


def teacher_forced_loss(model, method, prefix: torch.Tensor, continuation: torch.Tensor) -> float:
    """Summed next-token loss (nats, fp32) of ``continuation`` [1, E] after ``prefix`` [1, C]: the prefix
    prefilled as the method prefills a prompt (``prefill_prompt``, its press built on the prefix), then each
    continuation token fed at its position through the method's decode; the prefill's last logits predict
    the first token, each step's the next."""
    method.prepare(model)
    press = method.press_for(model, prefix)
    on_engine = method.family.press_on_engine
    steps = continuation.shape[1]
    reserve = max(model.dms_capacity_step, steps) if hasattr(model, "make_dms_cache") else None
    with torch.inference_mode(), press_during_run(model, press, press_on_engine=on_engine):
        out, cache = prefill_prompt(model, prefix, press=press, press_on_engine=on_engine, capacity_step=reserve)
        logits = [out.logits[:, -1].float()]
        for t in range(steps - 1):
            position = torch.full((1, 1), prefix.shape[1] + t, device=prefix.device)
            out = model(input_ids=continuation[:, t:t + 1], past_key_values=cache, position_ids=position,
                        use_cache=True)
            logits.append(out.logits[:, -1].float())
        loss = torch.nn.functional.cross_entropy(torch.cat(logits), continuation[0], reduction="sum")
    return float(loss)


def measure_accuracy(model, method, *, prompts: Sequence[RetrievalPrompt], new_tokens: int, heldout: torch.Tensor,
                     context: int, perplexity_tokens: int, tokenizer, device,
                     on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The accuracy fields of the (``context``, ``method``) row; never raises for a failing cell.

    ``retrieval_accuracy`` = exact answers / prompts (``retrieval_exact`` of ``retrieval_prompts``), with
    ``retrieval_passed`` (1/0 per prompt, in order) and ``retrieval_depths``; ``perplexity`` of the
    ``perplexity_tokens`` tokens after the first ``context`` of ``heldout`` (``teacher_forced_loss``), or None
    with ``perplexity_status`` saying why. ``accuracy_status`` is "ok" when retrieval was scored.
    """
    fields: dict[str, Any] = {"retrieval_prompts": len(prompts), "answer_tokens": new_tokens,
                              "perplexity_tokens": perplexity_tokens}

    def progress(i, n):
        if on_progress is not None:
            on_progress(f"accuracy {i + 1}/{n}")

    try:
        passed = retrieval(model, method, prompts, tokenizer=tokenizer, new_tokens=new_tokens, device=device,
                           on_prompt=progress)
    except Exception as exc:  # one failing cell must not stop the matrix
        fields["accuracy_status"] = failure_status(exc)
    else:
        fields.update(accuracy_status="ok", retrieval_exact=sum(passed), retrieval_accuracy=sum(passed) / len(passed),
                      retrieval_passed=[int(p) for p in passed], retrieval_depths=[p.depth for p in prompts])
    release_memory()
    if on_progress is not None:
        on_progress("perplexity")
    window = heldout[:, : context + perplexity_tokens].to(device)
    try:
        loss = teacher_forced_loss(model, method, window[:, :context], window[:, context:])
        perplexity = math.exp(loss / perplexity_tokens)
    except Exception as exc:  # OverflowError included: a loss no perplexity can be written for
        fields.update(perplexity=None, perplexity_status=f"n/a: {failure_status(exc)}")
    else:
        fields.update(perplexity=perplexity, perplexity_status="ok")
    release_memory()
    return fields


class AccuracyPlan:
    """What ``dms-perf bench --accuracy N`` scores every (context, method) cell with: ``n`` prompts per context
    from ``source`` (built once per context and shared by the methods), the held-out tokens (enough for the
    longest context and ``perplexity_tokens``) and the tokenizer that decodes the answers."""

    def __init__(self, *, source, n: int, tokenizer, heldout: torch.Tensor, perplexity_tokens: int, seed: int):
        self.source, self.n, self.tokenizer, self.seed = source, n, tokenizer, seed
        self.heldout, self.perplexity_tokens = heldout, perplexity_tokens
        self._prompts: dict[int, tuple[list[RetrievalPrompt], int]] = {}

    def prompts(self, context: int) -> tuple[list[RetrievalPrompt], int]:
        """(the prompts of ``context``, tokens to decode for each); ValueError when the source cannot make them."""
        if context not in self._prompts:
            prompts = build_prompts(self.source, context, self.n, tokenizer=self.tokenizer, seed=self.seed)
            self._prompts[context] = prompts, answer_tokens(self.tokenizer, prompts)
        return self._prompts[context]

    def measure(self, model, method, context: int, *, device, on_progress=None) -> dict[str, Any]:
        """``measure_accuracy`` of one cell; a context the source cannot make prompts for is an
        ``accuracy_status`` error."""
        try:
            prompts, new_tokens = self.prompts(context)
        except Exception as exc:
            return {"accuracy_status": f"error: prompts: {type(exc).__name__}: {exc}".splitlines()[0][:240]}
        return measure_accuracy(model, method, prompts=prompts, new_tokens=new_tokens, heldout=self.heldout,
                                context=context, perplexity_tokens=self.perplexity_tokens, tokenizer=self.tokenizer,
                                device=device, on_progress=on_progress)
