"""The committed small model (models/qwen3-synth-small): loads with ``load_model``, retrieves held-out needles
as Qwen3-DMS with eviction off, and is one model for the suite's vanilla and dense DMS paths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dms_perf.model.qwen3_dms import build_model, load_model
from dms_perf.train.evaluate import retrieval_accuracy, retrieval_prompts
from dms_perf.train.pretrain import borrowed_rows

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "qwen3-synth-small"
CONTEXT = 1024
PROMPTS = 40
# The committed model's measured held-out accuracy at 1024 tokens is in its eval.json; the test asks for
# this much on its own 40 prompts.
FLOOR = 0.95


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
    return retrieval_prompts(tokenizer, CONTEXT, PROMPTS, seed=7)


def test_checkpoint_is_small_and_records_its_scores():
    size = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert size < 8e6
    scores = json.loads((CHECKPOINT / "eval.json").read_text())
    assert scores["eviction"] is False and scores["prompts"] >= 100


def test_checkpoint_retrieves_heldout_needles(dense_dms, tokenizer, prompts):
    started = time.perf_counter()
    accuracy = retrieval_accuracy(dense_dms, tokenizer, prompts)
    assert time.perf_counter() - started < 60
    assert accuracy >= FLOOR


def test_random_weights_retrieve_nothing(dense_dms, tokenizer, prompts):
    random_model = build_model(dense_dms.config, backend="hub", seed=0)
    random_model.set_dms_eviction(False)
    assert retrieval_accuracy(random_model, tokenizer, prompts[:10]) == 0.0


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
