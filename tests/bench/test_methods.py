"""The method registry: every registered method runs end to end on a tiny model; names and errors."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.generation import generate_once, measure_generation
from dms_perf.bench.methods import DEFAULT_METHODS, FAMILIES, resolve_method, resolve_methods
from dms_perf.bench.workloads import needle_workload

CONTEXT = 96  # > SnapKV's 64-query window, > the tiny DMS window of 16
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def test_every_family_has_a_default_method():
    assert {resolve_method(n).family.name for n in DEFAULT_METHODS} == set(FAMILIES)


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_method_runs_end_to_end(models, method):
    m = resolve_method(method)
    model = models(m)
    workload = needle_workload(CONTEXT, vocab_size=model.config.vocab_size)
    row = measure_generation(model, workload, m, new_tokens=NEW_TOKENS, repeats=2, warmup=1)
    assert row["status"] == "ok", row
    assert row["method"] == m.name and row["context"] == CONTEXT
    assert row["generated_tokens"] == NEW_TOKENS and row["repeats"] == 2
    assert 0 < row["prefill_s"] <= row["total_s"]
    assert row["prefill_tok_s"] == pytest.approx(CONTEXT / row["prefill_s"])
    assert row["decode_tok_s"] > 0
    if HAS_CUDA:
        assert row["peak_vram_bytes"] > 0
    else:
        assert row["peak_vram_bytes"] is None  # no GPU: not measured, not faked
    assert row["retrieval"] == "n/a (random weights)"
    cfg = model.config
    dense_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (CONTEXT + NEW_TOKENS - 1) * cfg.head_dim * 4
    if m.name == "vanilla":
        assert row["compression"] == 1.0 and row["kv_bytes"] == dense_bytes
    elif m.family.name.startswith("dmspress"):  # DMSPress hides keys but keeps them in memory
        assert 1.5 < row["compression"] < 2.1 and row["kv_bytes"] == dense_bytes
    elif m.family.press_on_engine:  # the press's slots, held in DMSCache segments (with their spare rows)
        expected = (CONTEXT + NEW_TOKENS - 1) / (CONTEXT // 2 + NEW_TOKENS - 1)
        assert row["compression"] == pytest.approx(expected, rel=0.02)
    elif m.is_dms and not m.evicts:  # dense-triton: every token kept
        assert row["compression"] == 1.0
    elif m.family.calibrated:  # half of the decisions evict, outside the 16-token window: under 2x
        assert 1.5 < row["compression"] < 2.0
    elif m.is_dms:  # 8x eviction outside a 16-token window: well above 2x at 96 tokens
        assert row["compression"] > 2.5
    else:  # half of the prompt removed, decoded tokens appended uncompressed
        expected = (CONTEXT + NEW_TOKENS - 1) / (CONTEXT // 2 + NEW_TOKENS - 1)
        assert row["compression"] == pytest.approx(expected, rel=0.02)
        assert row["kv_bytes"] < dense_bytes


@pytest.mark.parametrize("method", ["vanilla", "knorm:0.5", "dms-triton", "dms-hub"])
def test_greedy_loop_matches_model_generate(models, method):
    """The timed loop (explicit positions over a possibly shorter cache) generates what generate() does."""
    m = resolve_method(method)
    model = models(m)
    ids = needle_workload(CONTEXT, vocab_size=model.config.vocab_size, seed=3).input_ids.to(model.device)
    press = m.press_for(model, ids)
    run = generate_once(model, ids, new_tokens=8, press=press)
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, CONTEXT:].cpu()
    assert run.generated_ids.shape == (8,)
    assert torch.equal(run.generated_ids, ref)


@pytest.mark.parametrize("press", ["knorm", "snapkv", "streamingllm", "expected-attention"])
def test_press_on_the_engine_decodes_as_the_press_on_transformers(models, press):
    """A press's compressed prefill handed to dense-triton's engine (DMSCache.from_dense, eviction off)
    generates the tokens the press gives on transformers' own decode, over the same kept slots."""
    eager, engine = resolve_method(f"{press}:0.5"), resolve_method(f"{press}-triton:0.5")
    vanilla, dms = models(eager), models(engine)
    engine.prepare(dms)
    ids = needle_workload(CONTEXT, vocab_size=vanilla.config.vocab_size, seed=7).input_ids.to(vanilla.device)
    a = generate_once(vanilla, ids, new_tokens=6, press=eager.press_for(vanilla, ids))
    b = generate_once(dms, ids, new_tokens=6, press=engine.press_for(dms, ids), press_on_engine=True)
    assert torch.equal(a.generated_ids, b.generated_ids)
    assert a.kept_slots == b.kept_slots < a.dense_slots == b.dense_slots


def test_dms_cache_from_a_cache_without_keys_is_refused():
    from transformers.cache_utils import DynamicCache

    from dms_perf.model.cache import DMSCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    assert DMSCache.from_dense(cache, window=2).head_lengths(0).tolist() == [[3, 3]]
    cache.layers[0].keys = None
    with pytest.raises(ValueError, match="no \\[B, H, L, D\\] keys"):
        DMSCache.from_dense(cache, window=2)


def test_press_with_ratio_zero_generates_like_vanilla(models):
    vanilla, snap = resolve_method("vanilla"), resolve_method("snapkv:0")
    model = models(vanilla)
    ids = needle_workload(CONTEXT, vocab_size=model.config.vocab_size, seed=5).input_ids.to(model.device)
    a = generate_once(model, ids, new_tokens=6)
    b = generate_once(model, ids, new_tokens=6, press=snap.press_for(model, ids))
    assert torch.equal(a.generated_ids, b.generated_ids)
    assert b.kept_slots == b.dense_slots


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_dmspress_threshold_reaches_the_ratio(models, ratio):
    m = resolve_method(f"dmspress-knorm:{ratio}")
    model = models(m)
    ids = needle_workload(256, vocab_size=model.config.vocab_size, seed=1).input_ids.to(model.device)
    run = generate_once(model, ids, new_tokens=1, press=m.press_for(model, ids))
    evicted = 1 - run.kept_slots / run.dense_slots
    assert evicted == pytest.approx(ratio, abs=0.03)


def test_snapkv_too_short_prompt_is_a_skipped_row(models):
    m = resolve_method("snapkv:0.5")
    model = models(m)
    row = measure_generation(model, needle_workload(64, vocab_size=512), m, new_tokens=2, repeats=1, warmup=0)
    assert row["status"].startswith("skipped: snapkv:0.5 needs a prompt of at least 65 tokens")


@pytest.mark.parametrize(
    ("name", "canonical", "backend", "ratio"),
    [
        ("vanilla", "vanilla", None, None),
        ("dms-triton", "dms-triton", "triton", None),
        ("dms-hub", "dms-hub", "hub", None),
        ("dms-flex", "dms-flex", "flex", None),
        ("snapkv", "snapkv:0.5", None, 0.5),
        (" knorm:0.250 ", "knorm:0.25", None, 0.25),
        ("expected-attention:0", "expected-attention:0", None, 0.0),
        ("dmspress-knorm:0.875", "dmspress-knorm:0.875", None, 0.875),
    ],
)
def test_resolve_method(name, canonical, backend, ratio):
    m = resolve_method(name)
    assert (m.name, m.backend, m.ratio) == (canonical, backend, ratio)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("snapkvv:0.5", "unknown method"),
        ("", "unknown method"),
        ("vanilla:0.5", "takes no parameter"),
        ("dms-triton:8", "takes no parameter"),
        ("snapkv:abc", "bad parameter"),
        ("knorm:1", "not in [0, 1)"),
        ("knorm:-0.1", "not in [0, 1)"),
    ],
)
def test_bad_method_name_lists_the_valid_ones(name, problem):
    with pytest.raises(ValueError, match="valid methods") as info:
        resolve_method(name)
    assert problem in str(info.value)
    for family in FAMILIES:
        assert family in str(info.value)


def test_resolve_methods_keeps_order_and_drops_repeats():
    assert [m.name for m in resolve_methods("knorm:0.5,vanilla,knorm,snapkv:0.5")] == ["knorm:0.5", "vanilla",
                                                                                          "snapkv:0.5"]
    with pytest.raises(ValueError, match="no methods"):
        resolve_methods(" , ")
    with pytest.raises(TypeError, match="str"):
        resolve_method(0.5)


def test_kvpress_missing_gives_a_clear_error(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress -> ImportError
    vanilla = resolve_method("vanilla")
    model = models(vanilla)
    ids = torch.zeros(1, 8, dtype=torch.long)
    assert vanilla.press_for(model, ids) is None  # methods without kvpress are unaffected
    with pytest.raises(ImportError, match="kvpress is not installed"):
        resolve_method("knorm:0.5").press_for(model, ids)
    row = measure_generation(model, needle_workload(CONTEXT, vocab_size=512), resolve_method("snapkv:0.5"),
                             new_tokens=2, repeats=1, warmup=0)
    assert row["status"].startswith("error: ImportError: kvpress is not installed")


def test_prepare_switches_a_shared_model_between_triton_methods(models):
    """dms-triton, dms-triton-eager and dense-triton share one model (one per backend in bench and the
    end-to-end benchmark): each method's ``prepare`` must set graphs and eviction, whatever ran before."""
    model = models(resolve_method("dms-triton"))
    expected = {"dense-triton": (True, False), "dms-triton-eager": (False, True), "dms-triton": (True, True)}
    for name, (graphs, evict) in expected.items():
        resolve_method(name).prepare(model)
        assert model.dms_cuda_graphs is graphs
        assert {layer.self_attn.dms_evict for layer in model.model.layers} == {evict}
        offset = model.model.layers[0].self_attn.alpha_offset
        assert offset == (model.config.dms_initial_alpha_offset if evict else float("inf"))
    resolve_method("vanilla").prepare(model)  # not a DMS method: leaves the switches alone
    assert model.dms_cuda_graphs is True


def test_prepare_sets_every_switch_a_method_depends_on(models):
    """Whatever an earlier method (or a test) left on the shared model, ``prepare`` puts back the state the
    method was built in: offset, borrowed channel, spare rows, no pool, no captured graph."""
    from dms_perf.bench.generation import engine_pool
    from dms_perf.model.cache import DEFAULT_CAPACITY_STEP

    method = resolve_method("dms-triton")
    model = models(method)
    loaded = model.config.dms_initial_alpha_offset
    model.config.dms_initial_alpha_offset = 0.0
    model.set_dms_borrowed_channel(False)
    model.dms_capacity_step = 3
    engine_pool(model, max_seqs=1, budget_bytes=2**22)
    model._decode_graph = object()
    method.prepare(model)
    assert model.config.dms_initial_alpha_offset == loaded and model.dms_backend == "triton"
    assert {layer.self_attn.dms_borrow_channel for layer in model.model.layers} == {True}
    assert model.dms_capacity_step == DEFAULT_CAPACITY_STEP
    assert model.dms_pool is None and model._decode_graph is None
    with pytest.raises(ValueError, match="dms-hub runs on a model without the decode engine's fusions"):
        resolve_method("dms-hub").prepare(model)  # fusions cannot be undone: not a dms-hub model


def test_untrained_dms_on_a_base_whose_decision_rows_are_zero():
    """The committed base checkpoint's decision rows are zero, so no offset can calibrate them: dms-calibrated
    draws them at random (seeded) and calibrates on those, so it marks about R of the decisions; the other DMS
    methods sharing the model get the checkpoint's zero rows back, and a second draw is the first."""
    from dms_perf.bench.methods import load_model_for
    from dms_perf.model.calibrate import decision_rows_are_zero
    from dms_perf.rule import decision_alphas

    base = str(Path(__file__).parents[2] / "models" / "qwen3-synth-mid")
    untrained, learnt = resolve_method("dms-calibrated:0.75"), resolve_method("dms-triton")
    model, _ = load_model_for(base, learnt, dtype=torch.float32, device="cpu", seed=3)
    assert model.dms_zero_decision_rows and decision_rows_are_zero(model)
    calibration = untrained.calibration(model)
    assert calibration.marked_fraction == pytest.approx(0.75, abs=0.02)
    assert calibration.decision_rows == "drawn at random (seed 3): the checkpoint's are all zero"

    def alphas(ids):
        captured = []
        hooks = [layer.self_attn.q_norm.register_forward_hook(
            lambda _m, _i, q: captured.append(decision_alphas(q.transpose(1, 2), model.config.num_key_value_heads)))
            for layer in model.model.layers]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        return torch.cat([c.flatten() for c in captured])

    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    untrained.prepare(model)
    drawn = alphas(ids)
    assert not decision_rows_are_zero(model) and drawn.std() > 0
    assert model.config.dms_initial_alpha_offset == calibration.alpha_offset
    learnt.prepare(model)
    assert decision_rows_are_zero(model) and not alphas(ids).any()
    untrained.prepare(model)
    assert torch.equal(alphas(ids), drawn)
