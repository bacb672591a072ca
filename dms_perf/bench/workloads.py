"""Needle-in-a-haystack prompts of an exact token count.

* With a tokenizer (a local path or object): real filler text, one needle sentence holding a secret
  code at a chosen depth, a question, all inside the tokenizer's chat template; the expected answer
  is the code. Parts are tokenized separately and joined, so the prompt has exactly
  ``context_length`` ids.
* Without one: seeded random token ids of exactly ``context_length`` with the needle's ids planted at
  the same depth, so that timing matches the text workload.

A batch (``needle_batch``) is B distinct prompts of one length: sequence 0 is the single prompt above
(so batch-1 results stay comparable with earlier runs), sequence i > 0 has its own haystack (the next
draw of the seeded ids, or the filler started at another sentence) and, in the text workload, its own
secret code, so that each sequence is scored on its own answer. Batch B's prompts are the first B of
any larger batch.

Retrieval is scored only for a model with real weights; otherwise the result is the literal
``"n/a (random weights)"``, never a score.

``needle_prompts`` is the accuracy set (``dms-perf bench --accuracy N``): N text prompts of one length, the
needle at depths spread evenly from the start to the end of the haystack (``needle_depths``), each with its
own seeded code and filler start. ``exact_answer`` is its scoring rule.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

NOT_SCORED = "n/a (random weights)"

SECRET_CODE = "7391-ORCHID"
NEEDLE = f" The secret code for the blue door is {SECRET_CODE}."
# Sequence i > 0 of a batch: digits 7391 + CODE_STRIDE * i (mod 10^4, a stride coprime with 10^4, so
# distinct for 10^4 sequences) and the i-th flower of the cycle.
CODE_STRIDE = 2351
CODE_WORDS = ("ORCHID", "TULIP", "LILAC", "ASTER", "DAHLIA", "IRIS", "LOTUS", "POPPY", "JASMINE", "PEONY")
QUESTION = "What is the secret code for the blue door? Reply with the code only."

# Original filler prose (written for this project), cycled to any length. Sentences start with a
# space, as BPE tokenizers expect inside running text, since each part is tokenized on its own.
FILLER = (
    " The harbour town woke slowly, with gulls circling above the fish market.",
    " A baker on the corner pulled the first loaves from a brick oven.",
    " Rain had washed the cobblestones overnight, and they shone in the early light.",
    " Children walked to school in pairs, arguing about a football match.",
    " At the library, a clerk sorted returned books into neat wooden carts.",
    " The ferry sounded its horn twice before leaving for the northern islands.",
    " An old man repaired fishing nets on the pier, humming a tune nobody recognised.",
    " In the hills above the town, sheep grazed between low stone walls.",
    " The museum opened an exhibition of maps drawn by sailors two centuries ago.",
    " A cyclist stopped at the bridge to watch the tide turn in the estuary.",
    " Shopkeepers rolled up their shutters and set out crates of apples and pears.",
    " The weather station on the cliff recorded a gentle westerly wind.",
    " Two engineers inspected the lighthouse lamp and wrote notes in a logbook.",
    " By noon the square was full of people drinking coffee in the sun.",
    " A choir rehearsed in the chapel, their voices carrying across the green.",
    " Evening brought a cool breeze and the smell of woodsmoke from the chimneys.",
)

# Token ids of the "needle" in the id-only workload: a fixed, recognisable run of ids.
NEEDLE_IDS_RANDOM = (17, 4, 42, 99, 7, 256, 31, 8)


@dataclass(frozen=True)
class Workload:
    """One prompt: ``input_ids`` [1, context_length] int64 (CPU), where the needle is, what to answer."""

    input_ids: torch.Tensor
    needle_position: int  # index of the needle's first token in input_ids
    needle_ids: tuple[int, ...]
    question: str | None  # None for the id-only workload
    expected_answer: str | None
    tokenizer: Any = None
    needle_depth: float | None = None  # the depth asked for, in [0, 1] of the haystack

    @property
    def context_length(self) -> int:
        return self.input_ids.shape[-1]

    def retrieval(self, generated_ids, *, real_weights: bool) -> str:
        """``"pass"`` / ``"fail"`` when the weights are real and an answer is expected, else NOT_SCORED."""
        if not real_weights or self.expected_answer is None or self.tokenizer is None:
            return NOT_SCORED
        ids = generated_ids.flatten().tolist() if torch.is_tensor(generated_ids) else list(generated_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return "pass" if _squash(self.expected_answer) in _squash(text) else "fail"


@dataclass(frozen=True)
class NeedleBatch:
    """B prompts of one length (``needle_batch``), decoded together as one batch cell."""

    sequences: tuple[Workload, ...]

    def __post_init__(self):
        if not self.sequences:
            raise ValueError("a NeedleBatch needs at least one prompt")
        lengths = {w.context_length for w in self.sequences}
        if len(lengths) != 1:
            raise ValueError(f"the prompts of a batch must have one length, got {sorted(lengths)}")

    @property
    def batch(self) -> int:
        return len(self.sequences)

    @property
    def context_length(self) -> int:
        return self.sequences[0].context_length

    @property
    def prompts(self) -> list[torch.Tensor]:
        """Each sequence's ``input_ids`` [1, context_length]."""
        return [w.input_ids for w in self.sequences]

    def first(self, batch: int) -> NeedleBatch:
        """The batch of the first ``batch`` prompts."""
        if not 1 <= batch <= self.batch:
            raise ValueError(f"batch must be in [1, {self.batch}], got {batch}")
        return NeedleBatch(self.sequences[:batch])

    def retrieval(self, generated_ids, *, real_weights: bool) -> str:
        """Each sequence scored on its own answer (``Workload.retrieval``) from its row of ``generated_ids``
        [B, T] ([T] for one prompt): one prompt gives that result, a batch ``"k/B pass"``, NOT_SCORED if
        unscored."""
        if torch.is_tensor(generated_ids) and generated_ids.dim() == 1:
            generated_ids = generated_ids[None]
        rows = list(generated_ids)
        if len(rows) != self.batch:
            raise ValueError(f"expected generated ids for {self.batch} sequences, got {len(rows)}")
        results = [w.retrieval(ids, real_weights=real_weights) for w, ids in zip(self.sequences, rows, strict=True)]
        if self.batch == 1 or NOT_SCORED in results:
            return results[0]
        return f"{results.count('pass')}/{self.batch} pass"


def exact_answer(text: str, answer: str) -> bool:
    """Whether generated ``text`` is exactly ``answer``: read as its letters and digits alone (lower case),
    it starts with the answer's, and the answer's last one is not followed directly by another letter or
    digit. Spaces and punctuation are free (tokenizers decode ``7391-ORCHID`` as ``7391 - ORCHID`` or
    ``7 3 9 1-ORCHID``), and so is what follows the answer (``7391-ORCHID.``); a sentence before it (``The
    code is 7391-ORCHID``), another code or a longer word (``7391-ORCHIDS``) is not exact."""
    wanted = _squash(answer)
    lower = text.lower()
    kept = [i for i, c in enumerate(lower) if c in _ALNUM]
    if not wanted or "".join(lower[i] for i in kept[: len(wanted)]) != wanted:
        return False
    end = kept[len(wanted) - 1] + 1
    return end == len(lower) or lower[end] not in _ALNUM


_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def _squash(text: str) -> str:
    """Letters and digits only, lower case: tokenizers differ in how they space '7391-ORCHID'."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _check(context_length: int, needle_depth: float) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if not 0.0 <= needle_depth <= 1.0:
        raise ValueError(f"needle_depth must be in [0, 1], got {needle_depth}")


def needle_workload(context_length: int, *, tokenizer=None, needle_depth: float = 0.5, vocab_size: int | None = None,
                    seed: int = 0) -> Workload:
    """A needle-in-a-haystack prompt of exactly ``context_length`` tokens.

    ``tokenizer``: a transformers tokenizer or a local path to one (text workload); None gives the
    id-only workload, which needs ``vocab_size``. ``needle_depth`` in [0, 1]: 0 = start, 1 = end of the
    haystack.
    """
    return needle_batch(context_length, 1, tokenizer=tokenizer, needle_depth=needle_depth, vocab_size=vocab_size,
                        seed=seed).sequences[0]


def needle_batch(context_length: int, batch: int, *, tokenizer=None, needle_depth: float = 0.5,
                 vocab_size: int | None = None, seed: int = 0) -> NeedleBatch:
    """``batch`` distinct needle-in-a-haystack prompts of exactly ``context_length`` tokens each (the module
    docstring says how they differ); the first is ``needle_workload``'s. Arguments as ``needle_workload``."""
    _check(context_length, needle_depth)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("the id-only workload (no tokenizer) needs vocab_size")
        gen = torch.Generator().manual_seed(seed)  # one stream: sequence i is the i-th draw
        return NeedleBatch(tuple(_id_workload(context_length, needle_depth, vocab_size, gen) for _ in range(batch)))
    tokenizer = load_tokenizer(tokenizer)
    return NeedleBatch(tuple(_text_workload(context_length, needle_depth, tokenizer, i) for i in range(batch)))


def needle_depths(n: int) -> list[float]:
    """``n`` needle depths spread evenly over the haystack, both ends included: 0, 1/(n-1), ..., 1 (0.5 for
    one prompt)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of prompts must be a positive int, got {n!r}")
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


# Codes are drawn from these many digit strings (0000-9999), without repeats within one set of prompts.
CODE_DIGITS = 10_000


def needle_prompts(context_length: int, n: int, *, tokenizer, seed: int = 0) -> list[Workload]:
    """``n`` needle prompts of exactly ``context_length`` tokens (the text workload), for accuracy.

    Prompt i has its needle at depth ``needle_depths(n)[i]``, its own code (distinct digits drawn with
    ``seed``, a flower of ``CODE_WORDS``) and its filler started at a sentence drawn with ``seed``; the
    question and template are ``needle_workload``'s. The same arguments give the same prompts; another seed
    other codes and fillers at the same depths. ``dms-perf bench --accuracy-prompts`` names this function by
    default (``dms_perf.bench.workloads:needle_prompts``); a replacement takes the same keyword arguments.
    """
    depths = needle_depths(n)
    _check(context_length, 0.0)
    if n > CODE_DIGITS:
        raise ValueError(f"at most {CODE_DIGITS} prompts have distinct codes, got {n}")
    if tokenizer is None:
        raise ValueError("needle_prompts needs a tokenizer: its prompts are text, scored on their answers")
    tokenizer = load_tokenizer(tokenizer)
    rng = random.Random(seed)
    digits = rng.sample(range(CODE_DIGITS), n)
    prompts = []
    for depth, number in zip(depths, digits, strict=True):
        code = f"{number:04d}-{rng.choice(CODE_WORDS)}"
        prompts.append(_text_workload(context_length, depth, tokenizer, code=code, start=rng.randrange(len(FILLER))))
    return prompts


def filler_tokens(tokenizer, length: int, *, seed: int = 0) -> torch.Tensor:
    """``length`` token ids [1, length] of the workload's ``FILLER`` prose, its sentences in a seeded random
    order (never one twice in a row), tokenized one by one as the prompts are: the default held-out text of
    the accuracy perplexity. Sixteen sentences repeat, so over a long text it measures how well a cache
    lets the model copy what it has seen."""
    _check(length, 0.0)
    tokenizer = load_tokenizer(tokenizer)
    sentences = [_encode(tokenizer, s) for s in FILLER]
    rng = random.Random(seed)
    ids: list[int] = []
    last = None
    while len(ids) < length:
        k = rng.choice([i for i in range(len(sentences)) if i != last])
        ids += sentences[k]
        last = k
    return torch.tensor([ids[:length]], dtype=torch.long)


def secret_code(sequence: int) -> str:
    """The code sequence ``sequence`` of a batch must retrieve (``SECRET_CODE`` for the first)."""
    if sequence == 0:
        return SECRET_CODE
    digits = (7391 + CODE_STRIDE * sequence) % 10_000
    return f"{digits:04d}-{CODE_WORDS[sequence % len(CODE_WORDS)]}"


def load_tokenizer(tokenizer):
    """A tokenizer object from a local path (or the object itself), checked to turn text into tokens.

    A checkpoint folder without tokenizer files gives transformers an empty tokenizer that encodes
    every text to no ids; the workload could never reach its length with it, so this raises
    ValueError naming the tokenizer instead.
    """
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        name = tokenizer
        if tokenizer.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(tokenizer)):
            raise ValueError(f"tokenizer {name!r}: no such directory")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    else:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if not _encode(tokenizer, NEEDLE) or not any(_encode(tokenizer, s) for s in FILLER):
        raise ValueError(
            f"tokenizer {name!r} ({type(tokenizer).__name__}) encodes the workload's text to no tokens: it has no "
            f"vocabulary (a checkpoint folder without tokenizer files?). Pass --tokenizer DIR with a real tokenizer"
        )
    return tokenizer


def _id_workload(context_length: int, needle_depth: float, vocab_size: int, gen: torch.Generator) -> Workload:
    needle = tuple(i % vocab_size for i in NEEDLE_IDS_RANDOM)[:context_length]
    ids = torch.randint(0, vocab_size, (1, context_length), generator=gen)
    at = round(needle_depth * (context_length - len(needle)))
    ids[0, at : at + len(needle)] = torch.tensor(needle)
    return Workload(ids, at, needle, None, None, needle_depth=needle_depth)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _template_around(tokenizer) -> tuple[list[int], list[int]]:
    """Ids before and after the haystack: chat template (if any) + question + generation prompt."""
    marker = "\u2063HAYSTACK\u2063"
    content = f"{marker}\n\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False,  # Qwen3: answer directly; other templates ignore it
        )
    else:
        rendered = f"{content}\nAnswer:"
    before, after = rendered.split(marker)
    return _encode(tokenizer, before), _encode(tokenizer, after)


def _text_workload(context_length: int, needle_depth: float, tokenizer, sequence: int = 0, *,
                   code: str | None = None, start: int | None = None) -> Workload:
    """Sequence ``sequence`` of a batch: its own code, its filler started at sentence ``sequence``; or the
    given ``code`` with the filler started at sentence ``start``."""
    prefix, suffix = _template_around(tokenizer)
    code = secret_code(sequence) if code is None else code
    needle = _encode(tokenizer, NEEDLE.replace(SECRET_CODE, code))
    budget = context_length - len(prefix) - len(suffix) - len(needle)
    if budget < 0:
        raise ValueError(
            f"context_length {context_length} is too short for the text workload: the template, question and "
            f"needle alone take {context_length - budget} tokens"
        )
    sentences = [_encode(tokenizer, s) for s in FILLER]
    target = round(needle_depth * budget)
    haystack: list[int] = []
    k = (sequence if start is None else start) % len(sentences)
    # Whole sentences before the needle (it starts on a sentence boundary at or before the target).
    while len(haystack) + len(sentences[k % len(sentences)]) <= target:
        haystack += sentences[k % len(sentences)]
        k += 1
    needle_position = len(prefix) + len(haystack)
    haystack += needle
    while len(haystack) < budget + len(needle):
        haystack += sentences[k % len(sentences)]
        k += 1
    haystack = haystack[: budget + len(needle)]
    ids = torch.tensor([prefix + haystack + suffix], dtype=torch.long)
    return Workload(ids, needle_position, tuple(needle), QUESTION, code, tokenizer, needle_depth)
