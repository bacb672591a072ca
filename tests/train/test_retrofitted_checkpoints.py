"""The committed DMS retrofits of the base model (models/qwen3-synth-mid-dms-{2,4,8}x, docs/models.md):
each loads with ``load_model``, runs with eviction on, marks about ``1 - 1/CR`` of the tokens of held-out
text and keeps its perplexity near the dense base's; the base itself, with eviction on, marks nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dms_perf.model.qwen3_dms import load_model
from dms_perf.train.forward import dms_training_forward
from dms_perf.train.retrofit_build import heldout_documents

MODELS = Path(__file__).resolve().parents[2] / "models"
BASE = MODELS / "qwen3-synth-mid"
LENGTH = 512
# Marked fraction within this of 1 - 1/CR on the short held-out text (measured on 8 x 1024 tokens: within 0.05).
RATE_TOLERANCE = 0.1
# Perplexity bound relative to the dense base on the same text. On 8 x 1024 held-out tokens the retrofits
# measured at most 1.008 times dense (4x); 1.02 leaves a margin for the shorter text here. Random decisions at
# the same rates measured 1.05-1.12 times dense there (docs/models.md), so the bound tells decisions apart.
RATIO_BOUND = 1.02


@pytest.fixture(scope="module")
def ids():
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    return heldout_documents(tokenizer, documents=1, length=LENGTH)


def _run(directory: Path, ids: torch.Tensor, evict: bool):
    model = load_model(str(directory), backend="math", dtype=torch.float32)
    model.set_dms_eviction(evict)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
        marked = float(dms_training_forward(model, ids, hard=True).evicted.float().mean())
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return model, math.exp(loss.item()), marked


@pytest.fixture(scope="module")
def dense(ids):
    return _run(BASE, ids, evict=False)[1]


def test_base_with_eviction_on_evicts_nothing(ids, dense):
    _, ppl, marked = _run(BASE, ids, evict=True)
    assert marked == 0.0
    assert ppl == pytest.approx(dense, rel=1e-4)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_retrofit_evicts_its_target_and_keeps_perplexity(ids, dense, ratio):
    directory = MODELS / f"qwen3-synth-mid-dms-{ratio}x"
    assert sum(f.stat().st_size for f in directory.iterdir()) < 7e6
    model, ppl, marked = _run(directory, ids, evict=True)
    assert model.config.dms_cr == ratio and model.config.dms_window_size == 64
    assert abs(marked - (1 - 1 / ratio)) <= RATE_TOLERANCE
    assert ppl <= dense * RATIO_BOUND


def test_untrained_dms_on_the_base_marks_its_rate_and_loses_more_than_a_retrofit(ids, dense):
    """The base with its zero decision rows drawn at random and calibrated to 4x's rate (retrofit_build's
    "untrained" rows): it marks that rate (so the rows were drawn: zero rows mark all or nothing) and its
    perplexity is above the retrofits' bound (on 8 x 1024 tokens it measured 1.04 times dense)."""
    from dms_perf.train.retrofit_build import measure_untrained

    row = measure_untrained(BASE, ids, 0.75, window=64)
    assert abs(row["marked"] - 0.75) <= 0.02 and row["kept"] < 0.5
    assert row["perplexity"] > dense * RATIO_BOUND


def test_answer_batches_mark_the_answers_of_the_retrieval_documents():
    """``data_batches(answers=True)`` (``--answer-weight``): the ids of ``answers=False``, seed for seed, with a
    mask that marks some of them and leaves most unmarked."""
    from dms_perf.train.retrofit_build import data_batches

    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    plain = data_batches(tokenizer, seq_len=256, batch=4)
    paired = data_batches(tokenizer, seq_len=256, batch=4, answers=True)
    for _ in range(3):
        ids, answers = next(paired)
        assert torch.equal(ids, next(plain)) and answers.shape == ids.shape and answers.dtype == torch.bool
    assert 0 < float(answers.float().mean()) < 0.2


def test_score_checkpoints_scores_with_eviction_on_and_off(tmp_path):
    """``benchmarks/score_checkpoints.py`` on the CPU at a short context: retrieval, perplexity and suite
    retrieval with eviction switched off, as fractions of the prompts asked for; the base evicts nothing
    either way (its borrowed rows are zero), so its two suite figures agree."""
    from benchmarks.score_checkpoints import main

    out = tmp_path / "scores.json"
    dms = str(MODELS / "qwen3-synth-mid-dms-8x")
    assert main([str(BASE), dms, "--out", str(out), "--contexts", "256", "--prompts", "4", "--device", "cpu"]) == 0
    scores = json.loads(out.read_text())
    base = scores[str(BASE)]
    assert base["suite_without_eviction"]["256"] == base["retrieval"]["suite"]["256"]
    for result in scores.values():
        assert result["backend"] == "math" and result["prompts"] == 4 and result["perplexity"] > 1
        for by_context in result["retrieval"].values():
            assert set(by_context) == {"256"} and by_context["256"] * 4 in (0, 1, 2, 3, 4)
        assert set(result["suite_without_eviction"]) == {"256"}
    assert base["kept_suite"]["256"] == 1.0 and 0 < scores[dms]["kept_suite"]["256"] < 0.9


def test_score_checkpoints_suite_only_scores_the_suite_alone(tmp_path):
    """``--suite-only``: the suite's retrieval at each context and nothing else; the same figure as the full
    scoring's suite retrieval on the same prompts."""
    from benchmarks.score_checkpoints import main

    full, alone = tmp_path / "full.json", tmp_path / "alone.json"
    common = [str(BASE), "--contexts", "256", "--prompts", "3", "--device", "cpu"]
    assert main([*common, "--out", str(full)]) == 0 and main([*common, "--out", str(alone), "--suite-only"]) == 0
    got, want = json.loads(alone.read_text())[str(BASE)], json.loads(full.read_text())[str(BASE)]
    assert set(got) == {"retrieval", "backend", "dtype", "prompts", "seconds"} and set(got["retrieval"]) == {"suite"}
    assert got["retrieval"]["suite"] == want["retrieval"]["suite"]


@pytest.mark.parametrize(("args", "message"), [
    (["--contexts", "1k"], "comma-separated integers"),
    (["--prompts", "0"], "must be positive"),
    (["--models-dir-that-is-not"], "unrecognized arguments"),
])
def test_score_checkpoints_refuses_bad_input(tmp_path, capsys, args, message):
    from benchmarks.score_checkpoints import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(BASE), "--out", str(tmp_path / "s.json"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_score_checkpoints_refuses_a_directory_without_a_checkpoint(tmp_path, capsys):
    from benchmarks.score_checkpoints import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err
