"""The committed base model (models/qwen3-synth-mid, trained on an H100: docs/models.md): loads with
``load_model``, is a language model of the generated text, scores what its eval.json records on the suite's
needles as Qwen3-DMS with eviction off, and is one model for the suite's vanilla and dense DMS paths.

Its recorded retrieval is 100 % at 1K on the suite's needles (docs/models.md): the retrieval test is a
regression check on the recorded figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dms_perf.model.qwen3_dms import build_model, load_model
from dms_perf.train.evaluate import perplexity, retrieval_accuracy, retrieval_prompts
from dms_perf.train.pretrain import borrowed_rows

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "qwen3-synth-mid"
CONTEXT = 1024
PROMPTS = 20  # two needle depths (0 and 1), ten codes each
# 20 prompts score within this of the 100-prompt figure in eval.json (bf16 on the GPU; fp32 here).
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(CHECKPOINT))


@pytest.fixture(scope="module")
def dense_dms():
    model = load_model(str(CHECKPOINT), backend="hub", dtype=torch.float32)
    model.set_dms_eviction(False)
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return retrieval_prompts(tokenizer, CONTEXT, PROMPTS, which="suite")


def test_checkpoint_is_small_and_records_its_scores():
    size = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert size < 8e6
    scores = json.loads((CHECKPOINT / "eval.json").read_text())
    assert scores["eviction"] is False and scores["prompts"] >= 100


def test_checkpoint_scores_its_recorded_retrieval(dense_dms, tokenizer, prompts):
    recorded = json.loads((CHECKPOINT / "eval.json").read_text())["retrieval"]["suite"][str(CONTEXT)]
    accuracy = retrieval_accuracy(dense_dms, tokenizer, prompts)
    assert abs(accuracy - recorded) <= TOLERANCE


def test_checkpoint_models_the_generated_text_and_random_weights_do_not(dense_dms, tokenizer):
    random_model = build_model(dense_dms.config, backend="hub", seed=0)
    random_model.set_dms_eviction(False)
    assert perplexity(dense_dms, tokenizer, documents=2, length=512) < 20
    assert perplexity(random_model, tokenizer, documents=2, length=512) > 500


def test_random_weights_retrieve_nothing(dense_dms, tokenizer, prompts):
    random_model = build_model(dense_dms.config, backend="hub", seed=0)
    random_model.set_dms_eviction(False)
    assert retrieval_accuracy(random_model, tokenizer, prompts[:5]) == 0.0


def test_vanilla_and_dense_dms_are_one_model(dense_dms, prompts):
    """The borrowed rotation pair's q_proj rows are zero, so zeroing the channel changes nothing."""
    rows = borrowed_rows(dense_dms.config)
    for layer in dense_dms.model.layers:
        assert not layer.self_attn.q_proj.weight[rows].any()
    vanilla = load_model(str(CHECKPOINT), backend=None, dtype=torch.float32)
    ids = prompts[0].input_ids[:, :300]
    with torch.inference_mode():
        expected = vanilla(input_ids=ids, use_cache=False).logits
        got = dense_dms(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
