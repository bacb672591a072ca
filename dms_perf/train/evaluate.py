"""Retrieval accuracy and perplexity of a trained model on text it never saw (docs/models.md).

Two retrieval sets, each ``n`` seeded prompts of exactly ``context_length`` ids with the needle at depths
spread evenly from start to end of the haystack:

* ``"heldout"``: held-out fact and question phrasings and filler (``dms_perf.train.data.HELDOUT_*``), a
  random key and code per prompt, plus 0-2 distractor facts (other keys, same attribute).
* ``"suite"``: the suite's own needle prompts (``dms_perf.bench.workloads.needle_batch``: its ``FILLER``,
  ``NEEDLE`` and ``QUESTION``), ten codes per depth.

Both end as the suite's prompt does for a tokenizer without chat template: ``"\\n\\n<question>\\nAnswer:"``.
A prompt passes when the first word greedy decoding writes is exactly the code (``exact_match``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dms_perf.train.data import (
    HELDOUT_FACT_TEMPLATES,
    HELDOUT_FILLER,
    HELDOUT_QUESTION_TEMPLATES,
    Corpus,
    Mix,
    TextGenerator,
)

RETRIEVAL_SETS = ("heldout", "suite")
# Seeds of evaluation text, apart from any training seed the build uses (dms_perf.train.build).
HELDOUT_SEED = 1_000_003


@dataclass(frozen=True)
class RetrievalPrompt:
    input_ids: torch.Tensor  # [1, context_length] int64
    code: str
    depth: float


def depths(n: int) -> list[float]:
    """``n`` needle depths spread evenly over [0, 1]."""
    return [i / max(n - 1, 1) for i in range(n)]


def heldout_prompt(tokenizer, context_length: int, depth: float, seed: int) -> RetrievalPrompt:
    """One held-out needle prompt: the target fact near ``depth``, 0-2 distractors elsewhere."""
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    text = TextGenerator(seed, heldout=True)
    r = text.rng
    facts = text.facts(1 + r.randint(0, 2))
    target = facts[0]

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    question = target.sentence(r.choice(HELDOUT_QUESTION_TEMPLATES))
    tail = encode(f"\n\n{question}\nAnswer:")
    fact_ids = [encode(" " + f.sentence(r.choice(HELDOUT_FACT_TEMPLATES))) for f in facts]
    budget = context_length - len(tail) - sum(map(len, fact_ids))
    if budget < 0:
        raise ValueError(f"context_length {context_length} is too short for a held-out prompt")
    sentences = [encode(s) for s in HELDOUT_FILLER]
    filler: list[int] = []
    starts: list[int] = []
    k = r.randrange(len(sentences))
    while len(filler) < budget:
        starts.append(len(filler))
        filler += sentences[k % len(sentences)]
        k += 1
    filler = filler[:budget]
    wanted = [depth * budget] + [r.uniform(0, budget) for _ in facts[1:]]
    cuts = [max(s for s in starts if s <= w) for w in wanted]
    order = sorted(range(len(facts)), key=lambda i: (cuts[i], i))
    ids: list[int] = []
    at = 0
    for i in order:
        ids += filler[at : cuts[i]] + fact_ids[i]
        at = cuts[i]
    ids += filler[at:] + tail
    return RetrievalPrompt(torch.tensor([ids], dtype=torch.long), target.value, depth)


def retrieval_prompts(tokenizer, context_length: int, n: int = 100, *, which: str = "heldout",
                      seed: int = HELDOUT_SEED) -> list[RetrievalPrompt]:
    """``n`` prompts of ``context_length`` ids from the set ``which`` (``RETRIEVAL_SETS``)."""
    if which == "heldout":
        return [heldout_prompt(tokenizer, context_length, d, seed + i) for i, d in enumerate(depths(n))]
    if which == "suite":
        from dms_perf.bench.workloads import needle_batch

        per_depth = 10
        prompts = []
        for d in depths(math.ceil(n / per_depth)):
            batch = needle_batch(context_length, per_depth, tokenizer=tokenizer, needle_depth=d)
            prompts += [RetrievalPrompt(w.input_ids, w.expected_answer, d) for w in batch.sequences]
        return prompts[:n]
    raise ValueError(f"unknown retrieval set {which!r}; expected one of {RETRIEVAL_SETS}")


def first_word(text: str) -> str:
    words = text.split()
    return words[0].rstrip(".,;:!?") if words else ""


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[B, new_tokens] greedy continuation of unpadded prompts [B, L] (one length), with a cache."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    length = ids.shape[1]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    generated = [token]
    for step in range(1, new_tokens):
        positions = torch.full_like(token, length + step - 1)
        out = model(input_ids=token, past_key_values=cache, position_ids=positions, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    return torch.cat(generated, dim=1).cpu()


def retrieval_accuracy(model, tokenizer, prompts: list[RetrievalPrompt], *, batch: int = 10,
                       new_tokens: int | None = None) -> float:
    """Fraction of ``prompts`` whose greedy answer's first word is exactly the code."""
    if new_tokens is None:
        new_tokens = 2 + max(len(tokenizer.encode(" " + p.code, add_special_tokens=False)) for p in prompts)
    passed = 0
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        lengths = {p.input_ids.shape[1] for p in group}
        if len(lengths) != 1:
            raise ValueError(f"prompts of one batch must have one length, got {sorted(lengths)}")
        out = greedy(model, torch.cat([p.input_ids for p in group]), new_tokens)
        for p, row in zip(group, out, strict=True):
            passed += first_word(tokenizer.decode(row.tolist(), skip_special_tokens=True)) == p.code
    return passed / len(prompts)


@torch.inference_mode()
def perplexity(model, tokenizer, *, documents: int = 8, length: int = 1024, seed: int = HELDOUT_SEED) -> float:
    """exp(mean next-token loss) on ``documents`` prose documents of a generator seed no training uses."""
    corpus = Corpus(tokenizer, seed, Mix(retrieval=0.0))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for _ in range(documents):
        ids = corpus.batch(length, 1).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += loss.item()
        count += length - 1
    return math.exp(total / count)


def evaluate(model, tokenizer, context_lengths, *, n: int = 100, sets=RETRIEVAL_SETS, batch: int = 10,
             ppl_documents: int = 8) -> dict:
    """{"retrieval": {set: {context: accuracy}}, "perplexity": float} for ``model``."""
    scores: dict = {"retrieval": {}, "perplexity": perplexity(model, tokenizer, documents=ppl_documents)}
    for which in sets:
        scores["retrieval"][which] = {
            ctx: retrieval_accuracy(model, tokenizer, retrieval_prompts(tokenizer, ctx, n, which=which), batch=batch)
            for ctx in context_lengths
        }
    return scores

