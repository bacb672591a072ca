"""The training text generator and tokenizer: seeded, exact lengths, and blind to the evaluation text."""

from __future__ import annotations

import re

import pytest

from dms_perf.bench.workloads import FILLER, NEEDLE, QUESTION, SECRET_CODE
from dms_perf.train import data
from dms_perf.train.data import Corpus, TextGenerator, tokenizer_corpus
from dms_perf.train.evaluate import heldout_prompt
from dms_perf.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(seed=0, documents=400)


@pytest.fixture(scope="module")
def training_text(tokenizer):
    """Many documents of the training generator, decoded, plus the tokenizer's corpus."""
    corpus = Corpus(tokenizer, seed=5)
    docs = [tokenizer.decode(corpus.document(length)) for length in (256, 512, 1024) for _ in range(60)]
    return "\n".join(docs + list(tokenizer_corpus(seed=5, documents=200)))


def test_generator_is_deterministic_for_a_seed(tokenizer):
    one, two, other = (Corpus(tokenizer, seed).batch(300, 6) for seed in (3, 3, 4))
    assert one.equal(two)
    assert not one.equal(other)
    sentences = [[TextGenerator(7).prose_sentence() for _ in range(20)] for _ in range(2)]
    assert sentences[0] == sentences[1]


@pytest.mark.parametrize("length", [128, 257, 2048])
@pytest.mark.parametrize("retrieval", [0.0, 1.0])
def test_documents_have_the_exact_length(tokenizer, length, retrieval):
    corpus = Corpus(tokenizer, seed=1, mix=data.Mix(retrieval=retrieval))
    assert corpus.batch(length, 4).shape == (4, length)


def test_retrieval_documents_answer_their_questions(tokenizer):
    corpus = Corpus(tokenizer, seed=2, mix=data.Mix(retrieval=1.0))
    for _ in range(20):
        text = tokenizer.decode(corpus.retrieval_document(512))
        answers = re.findall(r"(?:Answer|A): (\S+)\n", text)
        assert answers, text[-300:]
        for answer in answers:
            assert text.count(answer) >= 2, f"{answer!r} is answered but never stated"
        assert text.endswith(data.EOS)


def test_training_words_cannot_make_the_suite_filler():
    """Every sentence of the suite's FILLER and of the held-out filler holds a word the training generator never
    writes (so none can come out of it whole)."""
    known = data.training_words()
    for sentence in (*FILLER, *data.HELDOUT_FILLER):
        assert set(data._words(sentence)) - known, sentence


def test_the_suite_needle_phrasing_is_trained_and_its_code_words_are_not(training_text):
    """The suite's needle and question are written by training templates ("secret code", "Reply with the code
    only."); its flower code words never appear, so retrieving them is copying unseen words."""
    assert "The secret code for " in training_text and "? Reply with the code only." in training_text
    code_word = SECRET_CODE.split("-")[1]
    assert code_word in data.HELDOUT_CODE_WORDS and code_word not in training_text
    assert QUESTION.endswith("? Reply with the code only.") and NEEDLE.startswith(" The secret code for ")


def test_random_code_words_never_hold_a_heldout_word():
    import random

    rng = random.Random(0)
    words = [data.random_code_word(rng) for _ in range(20_000)]
    assert len(set(words)) > 15_000 and all(w.isupper() and 3 <= len(w) <= 8 for w in words)
    assert not [w for w in words if any(h in w for h in data.HELDOUT_CODE_WORDS)]


def test_training_text_holds_no_evaluation_text(training_text):
    for sentence in (*FILLER, *data.HELDOUT_FILLER):
        assert sentence.strip() not in training_text
    for template in (*data.HELDOUT_FACT_TEMPLATES, *data.HELDOUT_QUESTION_TEMPLATES):
        for fixed in re.split(r"\{[^}]*\}", template):
            if len(fixed.split()) >= 3:
                assert fixed.strip() not in training_text, fixed
    for word in (*data.HELDOUT_CODE_WORDS, *data.HELDOUT_ATTRIBUTES):
        assert word not in training_text, word


def test_heldout_prompts_have_the_exact_length_and_their_code(tokenizer):
    for seed, depth in enumerate((0.0, 0.3, 1.0)):
        prompt = heldout_prompt(tokenizer, 700, depth, seed)
        assert prompt.input_ids.shape == (1, 700)
        text = tokenizer.decode(prompt.input_ids[0])
        assert prompt.code in text and text.endswith("\nAnswer:")


def test_tokenizer_round_trips_and_is_seeded(tokenizer):
    again = train_tokenizer(seed=0, documents=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    for text in (NEEDLE, " ".join(FILLER), "Mira Holloway's pin is 0042-CEDAR.\n\nQ: x?\nA: 7"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    digits = tokenizer.tokenize(" 7391")
    assert digits[1:] == list("7391")


def test_saved_tokenizer_loads_with_transformers_and_the_suite(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from dms_perf.bench.workloads import load_tokenizer, needle_workload
    from dms_perf.train.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode(NEEDLE, add_special_tokens=False) == tokenizer.encode(NEEDLE, add_special_tokens=False)
    assert loaded.eos_token == data.EOS
    load_tokenizer(str(tmp_path))
    assert needle_workload(512, tokenizer=str(tmp_path)).context_length == 512
