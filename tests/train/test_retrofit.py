"""The retrofit loop, its loss terms and ramp, and the checkpoint it writes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from dms_perf.model.qwen3_dms import build_model, load_model, tiny_config
from dms_perf.train.checkpoint import HISTORY_FILE, load_for_retrofit, save_retrofitted
from dms_perf.train.losses import (
    answer_weights,
    distillation_loss,
    eviction_penalty,
    target_compression,
    target_eviction_rate,
)
from dms_perf.train.retrofit import borrowed_rows, retrofit
from tests.bench.word_tokenizer import word_tokenizer
from tests.model.recorders import record_decisions

SEQ, WINDOW = 48, 16


def _batches(vocab_size, seed, batch=1):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab_size, (batch, SEQ), generator=generator)


def _inference_eviction_rate(model, ids) -> float:
    """Fraction of tokens the model's own inference forward ("math" backend) marks: decisions of tokens 1..N-1."""
    model.set_dms_backend("math")
    recorded = record_decisions(model)
    with torch.no_grad():
        model(ids, use_cache=False)
    for layer in model.model.layers:
        layer.self_attn.q_norm._forward_hooks.clear()
    return float(torch.stack([chunks[0][..., 1:] for chunks in recorded]).float().mean())


@pytest.fixture(scope="module")
def retrofitted():
    """A tiny random model (the rows of the borrowed channel zeroed: nothing marked) retrofitted to 2x."""
    config = tiny_config()
    student = build_model(config, backend="math", seed=0)
    teacher = build_model(config, backend=None, seed=0)  # vanilla Qwen3, the same weights
    before = {name: p.clone() for name, p in student.named_parameters()}
    lines = []
    result = retrofit(student, teacher, _batches(config.vocab_size, seed=1), compression_ratio=2, steps=8,
                      window=WINDOW, lr=1e-2, ramp_steps_per_unit=2, tau=0.3, seed=0, log=lines.append, log_every=4)
    return result, before, lines


def test_ramp_rises_one_unit_per_steps_per_unit_up_to_the_final_ratio():
    assert [target_compression(s, 8, 100) for s in (0, 50, 100, 700, 900)] == [1.0, 1.5, 2.0, 8.0, 8.0]
    assert target_compression(0, 8, 0) == 8.0
    assert target_eviction_rate(0, 8, 100) == 0.0
    assert target_eviction_rate(700, 8, 100) == pytest.approx(0.875)
    assert target_eviction_rate(10, 1, 100) == 0.0


def test_losses():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="sum") / 10
    assert float(distillation_loss(student, teacher)) == pytest.approx(float(expected), rel=1e-5)
    probs = torch.zeros(3, 2, 4, 9)  # [L, B, Hkv, N-1]
    probs[:, 0] = 0.5
    probs[:, 1] = 0.9
    # one-sided: the sequence above the target costs nothing
    assert float(eviction_penalty(probs, 0.75)) == pytest.approx((0.25 + 0.0) / 2)
    assert float(eviction_penalty(probs, 0.2)) == 0.0


def test_answer_weights_weigh_the_positions_that_predict_an_answer():
    answers = torch.tensor([[False, False, True, True, False], [False, False, False, False, True]])
    weights = answer_weights(answers, 10.0)
    # the logits at t predict token t + 1: positions 1, 2 (row 0) and 3 (row 1); the last position never
    assert weights.tolist() == [[1, 10, 10, 1, 1], [1, 1, 1, 10, 1]]
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    per_token = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                         reduction="none").sum(-1)
    assert float(distillation_loss(student, teacher, weights)) == pytest.approx(
        float((per_token * weights).sum() / weights.sum()), rel=1e-5)
    assert float(distillation_loss(student, teacher, torch.ones(2, 5))) == pytest.approx(
        float(distillation_loss(student, teacher)), rel=1e-6)
    with pytest.raises(ValueError, match="answer_weight must be > 0"):
        answer_weights(answers, 0.0)
    with pytest.raises(ValueError, match="weights"):
        distillation_loss(student, teacher, torch.ones(2, 4))


def test_answer_weighted_retrofit_takes_id_answer_pairs():
    """``answer_weight`` != 1 trains on (ids, answers) pairs, weighting the answers' KL: the first step's KL is
    the weighted mean (a step of 0 learning rate changes nothing, so both runs see the same logits); plain ids
    are refused with a message."""
    config = tiny_config(num_hidden_layers=1)
    ids = next(_batches(config.vocab_size, seed=3, batch=2))
    answers = torch.zeros_like(ids, dtype=torch.bool)
    answers[:, 30:33] = True
    kls = {}
    for weight in (1.0, 50.0):
        student, teacher = build_model(config, backend="math", seed=0), build_model(config, backend=None, seed=0)
        batches = [(ids, answers)] if weight != 1 else [ids]
        result = retrofit(student, teacher, batches, compression_ratio=2, steps=1, window=WINDOW, lr=1e-12,
                          ramp_steps_per_unit=0, tau=0.3, seed=0, answer_weight=weight)
        kls[weight] = result.history[0].kl
        assert result.settings["answer_weight"] == weight
    assert kls[50.0] != pytest.approx(kls[1.0], rel=1e-3)
    student, teacher = build_model(config, backend="math", seed=0), build_model(config, backend=None, seed=0)
    with pytest.raises(ValueError, match=r"answer_weight needs batches of \(ids, answers\) pairs"):
        retrofit(student, teacher, [ids], compression_ratio=2, steps=1, window=WINDOW, answer_weight=5.0)


def test_retrofit_moves_the_measured_eviction_rate_to_the_target(retrofitted):
    result, before, lines = retrofitted
    model, history = result.model, result.history
    assert [r.step for r in history] == list(range(1, 9))
    assert history[0].target_eviction == 0.0 and history[-1].target_eviction == 0.5
    assert history[0].eviction_rate == 0.0  # measured before the first update: the zeroed channel marks nothing
    assert len(lines) == 2 and lines[-1].startswith("step 8/8  target 2.00x (evict 0.500)")
    # Measured with the model's own inference forward on tokens it was not trained on.
    held_out = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(99))
    rate = _inference_eviction_rate(model, held_out)
    assert 0.3 < rate < 0.8, rate
    assert all(0 <= r.kl < 1 for r in history)
    # train="decision": only the borrowed channel's q_proj rows moved
    rows = borrowed_rows(model.config)
    others = [r for r in range(model.config.num_attention_heads * model.config.head_dim) if r not in rows]
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad  # as it was before
        if "q_proj" in name:
            assert torch.equal(p[others], before[name][others]) and not torch.equal(p[rows], before[name][rows])
        else:
            assert torch.equal(p, before[name]), name


def test_saved_checkpoint_loads_and_generates(retrofitted, tmp_path):
    result, _, _ = retrofitted
    source = tmp_path / "source"
    word_tokenizer().save_pretrained(source)
    out = save_retrofitted(result.model, tmp_path / "out", source=source, compression_ratio=2,
                           record={**result.settings, "history": result.history_dicts()})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["dms_window_size"], config["dms_cr"], config["dms_initial_alpha_offset"]) == (WINDOW, 2, 5.0)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / HISTORY_FILE).read_text())
    assert len(record["history"]) == 8 and record["train"] == "decision"
    loaded = load_model(out, backend="hub", dtype=torch.float32)
    ids = torch.randint(0, config["vocab_size"], (1, 40))
    with torch.no_grad():
        tokens = loaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        expected = result.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert tokens.shape == (1, 46) and torch.equal(tokens, expected)


def test_reduced_precision_trains_fp32_copies_and_casts_back():
    """bf16 weights, train="q": the q projections train in fp32 under autocast and return to bf16."""
    config = tiny_config(num_hidden_layers=1)
    student = build_model(config, backend="math", dtype=torch.bfloat16)
    teacher = build_model(config, backend=None, dtype=torch.bfloat16)
    q_before = student.model.layers[0].self_attn.q_proj.weight.clone()
    result = retrofit(student, teacher, _batches(config.vocab_size, seed=2), compression_ratio=2, steps=2,
                      lr=1e-2, ramp_steps_per_unit=1, train="q", seed=0)
    q_after = result.model.model.layers[0].self_attn.q_proj.weight
    others = [r for r in range(q_after.shape[0]) if r not in borrowed_rows(config)]
    assert q_after.dtype == torch.bfloat16 and not torch.equal(q_after[others], q_before[others])
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())


def _tiny_pair():
    config = tiny_config(num_hidden_layers=1)
    return build_model(config, backend="math"), build_model(config, backend=None), config


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"compression_ratio": 0.5}, ValueError, "compression_ratio must be a finite number >= 1, got 0.5"),
    ({"window": -1}, ValueError, "window must be an int >= 0, got -1"),
    ({"window": SEQ - 1}, ValueError, "leave no key outside the window of 47"),
    ({"steps": 0}, ValueError, "steps must be an int >= 1"),
    ({"tau": 0.0}, ValueError, "tau must be > 0"),
    ({"train": "k"}, ValueError, "train must be one of"),
    ({"steps": 3, "batches": 2}, ValueError, "batches ran out after 2 of 3 steps"),
    ({"student": "vanilla"}, TypeError, "retrofit trains a Qwen3DMSForCausalLM, got Qwen3ForCausalLM"),
    ({"teacher": "student"}, ValueError, "teacher and student are one model"),
])
def test_bad_inputs_are_clear_errors(changes, error, message):
    student, teacher, config = _tiny_pair()
    batches = _batches(config.vocab_size, seed=0)
    if "batches" in changes:
        batches = [next(batches) for _ in range(changes.pop("batches"))]
    if changes.pop("student", None) == "vanilla":
        student = teacher
    if changes.pop("teacher", None) == "student":
        teacher = student
    kwargs = {"compression_ratio": 2, "steps": 1, "window": WINDOW, **changes}
    with pytest.raises(error, match=message):
        retrofit(student, teacher, batches, **kwargs)


def test_loading_a_missing_or_foreign_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_for_retrofit(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        load_for_retrofit(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="only Qwen3 checkpoints"):
        load_for_retrofit(tmp_path / "llama")


def test_a_plain_qwen3_checkpoint_gets_the_dms_fields_and_a_vanilla_teacher(tmp_path):
    plain = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    Qwen3ForCausalLM(plain).save_pretrained(tmp_path)
    models = load_for_retrofit(tmp_path, window=8, dtype=torch.float32)
    assert not models.source_is_dms and type(models.teacher) is Qwen3ForCausalLM
    config = models.student.config
    assert (config.dms_alpha_scale, config.dms_initial_alpha_offset, config.dms_window_size) == (100.0, 5.0, 8)
