"""Needle-in-a-haystack workloads: exact lengths, the needle where it is said to be, honest scoring; batches
of distinct prompts, each scored on its own code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_perf.bench.workloads import (
    FILLER,
    NEEDLE,
    NOT_SCORED,
    QUESTION,
    SECRET_CODE,
    NeedleBatch,
    needle_batch,
    needle_workload,
    secret_code,
)
from tests.bench.word_tokenizer import word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.mark.parametrize("length", [1, 7, 8, 9, 100, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_id_workload_has_exact_length_and_planted_needle(length, depth):
    w = needle_workload(length, needle_depth=depth, vocab_size=300, seed=4)
    assert w.input_ids.shape == (1, length) and w.input_ids.dtype == torch.long
    assert w.context_length == length
    assert int(w.input_ids.min()) >= 0 and int(w.input_ids.max()) < 300
    n = len(w.needle_ids)
    assert n == min(8, length)
    assert w.input_ids[0, w.needle_position : w.needle_position + n].tolist() == list(w.needle_ids)
    assert w.needle_position == round(depth * (length - n))
    assert w.question is None and w.expected_answer is None


def test_id_workload_is_seeded():
    a, b, c = (needle_workload(512, vocab_size=1000, seed=s).input_ids for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("length", [60, 61, 200, 999])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_text_workload_has_exact_length_template_needle_and_question(tokenizer, length, depth):
    w = needle_workload(length, tokenizer=tokenizer, needle_depth=depth)
    ids = w.input_ids[0].tolist()
    assert len(ids) == length
    needle = tokenizer.encode(NEEDLE, add_special_tokens=False)
    assert ids[w.needle_position : w.needle_position + len(needle)] == needle
    assert list(w.needle_ids) == needle
    text = tokenizer.decode(ids)
    assert text.startswith("<| user |>") and text.endswith("<| assistant |>")
    assert tokenizer.decode(tokenizer.encode(QUESTION, add_special_tokens=False)) in text
    assert w.expected_answer == SECRET_CODE and w.question == QUESTION
    # The needle sits within one filler sentence of the requested depth inside the haystack.
    prefix = len(tokenizer.encode("<|user|> ", add_special_tokens=False))
    suffix = len(tokenizer.encode(f"\n\n{QUESTION} <|end|><|assistant|>", add_special_tokens=False))
    haystack = length - prefix - suffix - len(needle)
    longest_sentence = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in FILLER)
    target = prefix + depth * haystack
    assert target - longest_sentence <= w.needle_position <= target


def test_text_workload_too_short_raises(tokenizer):
    with pytest.raises(ValueError, match="too short for the text workload"):
        needle_workload(20, tokenizer=tokenizer)


def test_retrieval_is_scored_only_with_real_weights(tokenizer):
    w = needle_workload(200, tokenizer=tokenizer)
    answer = tokenizer.encode(f"The code is {SECRET_CODE}.", add_special_tokens=False)
    wrong = tokenizer.encode("The code is other words.", add_special_tokens=False)
    assert w.retrieval(torch.tensor(answer), real_weights=True) == "pass"
    assert w.retrieval(wrong, real_weights=True) == "fail"
    assert w.retrieval(torch.tensor(answer), real_weights=False) == NOT_SCORED == "n/a (random weights)"
    ids_only = needle_workload(200, vocab_size=tokenizer.vocab_size)
    assert ids_only.retrieval(answer, real_weights=True) == NOT_SCORED  # nothing to compare with


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(context_length=0, vocab_size=10), ValueError, "positive"),
        (dict(context_length=10, vocab_size=10, needle_depth=1.5), ValueError, "needle_depth"),
        (dict(context_length=10, vocab_size=10, needle_depth=-0.1), ValueError, "needle_depth"),
        (dict(context_length=10), ValueError, "vocab_size"),
        (dict(context_length=10.0, vocab_size=10), TypeError, "int"),
        (dict(context_length=True, vocab_size=10), TypeError, "int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        needle_workload(**kwargs)


class _EmptyTokenizer:
    """What transformers builds for a checkpoint folder without tokenizer files: every text -> no ids."""

    name_or_path = "ckpt-without-tokenizer"
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return []


def test_tokenizer_that_yields_no_tokens_is_refused_at_once():
    from dms_perf.bench.workloads import load_tokenizer

    with pytest.raises(ValueError, match="'ckpt-without-tokenizer'.*encodes the workload's text to no tokens"):
        load_tokenizer(_EmptyTokenizer())


def test_checkpoint_folder_without_tokenizer_files_raises_instead_of_hanging(tmp_path):
    """The haystack filler used to loop forever on such a tokenizer; a child process bounds the wait."""
    from dms_perf.model.qwen3_dms import tiny_config

    tiny_config().save_pretrained(tmp_path)  # config.json only: transformers' empty Qwen2 tokenizer
    code = f"from dms_perf.bench.workloads import needle_workload; needle_workload(100, tokenizer={str(tmp_path)!r})"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("needle_workload hangs on a tokenizer that encodes nothing")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: tokenizer ") and "encodes the workload's text to no tokens" in last
    assert str(tmp_path) in last


# --- batches of distinct prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True])
def test_a_batch_is_distinct_prompts_of_one_length_and_starts_with_the_single_prompt(tokenizer, text):
    kwargs = {"tokenizer": tokenizer} if text else {"vocab_size": 300, "seed": 4}
    batch = needle_batch(200, 5, needle_depth=0.4, **kwargs)
    assert batch.batch == 5 and batch.context_length == 200
    assert [p.shape for p in batch.prompts] == [(1, 200)] * 5
    assert len({tuple(p[0].tolist()) for p in batch.prompts}) == 5
    single = needle_workload(200, needle_depth=0.4, **kwargs)  # batch 1 is the prompt of earlier results
    first = batch.sequences[0]
    assert torch.equal(first.input_ids, single.input_ids)
    assert (first.needle_position, first.expected_answer) == (single.needle_position, single.expected_answer)
    # a smaller batch is the first prompts of a larger one
    smaller = needle_batch(200, 2, needle_depth=0.4, **kwargs)
    for head in (smaller, batch.first(2)):
        assert head.batch == 2 and all(torch.equal(a, b) for a, b in zip(head.prompts, batch.prompts[:2], strict=True))
    for w in batch.sequences:  # each prompt holds its own needle where it says
        n = len(w.needle_ids)
        assert w.input_ids[0, w.needle_position : w.needle_position + n].tolist() == list(w.needle_ids)


def test_each_sequence_of_a_text_batch_has_its_own_code(tokenizer):
    batch = needle_batch(200, 12, tokenizer=tokenizer)
    codes = [w.expected_answer for w in batch.sequences]
    assert codes[0] == SECRET_CODE == secret_code(0) and codes == [secret_code(i) for i in range(12)]
    assert len(set(codes)) == 12
    assert len({secret_code(i).split("-")[0] for i in range(10_000)}) == 10_000  # digits alone distinct


class _LetterTokenizer:
    """Every character its own id: encodes any code, so that each sequence's answer can be written."""

    name_or_path = "letters"
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_batch_retrieval_scores_each_sequence_on_its_own_code():
    batch = needle_batch(400, 3, tokenizer=_LetterTokenizer())
    answers = [f"It is {secret_code(0)}.", f"It is {secret_code(0)}.", f"It is {secret_code(2)}."]
    longest = max(len(a) for a in answers)
    ids = torch.tensor([[ord(c) for c in a.ljust(longest)] for a in answers])
    # sequence 1 answered sequence 0's code: a fail
    assert batch.retrieval(ids, real_weights=True) == "2/3 pass"
    assert batch.retrieval(ids, real_weights=False) == NOT_SCORED
    assert batch.first(2).retrieval(ids[:2], real_weights=True) == "1/2 pass"
    assert batch.first(1).retrieval(ids[0], real_weights=True) == "pass"  # batch 1 as before
    assert NeedleBatch(batch.sequences[1:2]).retrieval(ids[1], real_weights=True) == "fail"
    with pytest.raises(ValueError, match="for 3 sequences, got 2"):
        batch.retrieval(ids[:2], real_weights=True)


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_bad_batch(batch):
    with pytest.raises(ValueError, match="batch must be a positive int"):
        needle_batch(10, batch, vocab_size=10)


def test_a_batch_needs_prompts_of_one_length():
    with pytest.raises(ValueError, match=r"one length, got \[10, 12\]"):
        NeedleBatch((needle_workload(10, vocab_size=10), needle_workload(12, vocab_size=10)))
    with pytest.raises(ValueError, match="at least one prompt"):
        NeedleBatch(())
    with pytest.raises(ValueError, match=r"batch must be in \[1, 2\], got 3"):
        needle_batch(10, 2, vocab_size=10).first(3)
