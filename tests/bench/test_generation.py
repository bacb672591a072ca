"""kv_cache_stats on a DMSCache: slots come from the per-head lengths, not from the buffer's shape. Batches:
prefilled sequence by sequence, their caches joined, decoded together as the prompts would be alone."""

from __future__ import annotations

import pytest
import torch

from dms_perf._runtime import default_device
from dms_perf.bench.generation import (
    GenerationRun,
    generate_batch,
    generate_once,
    join_dense_caches,
    kv_cache_stats,
    measure_generation,
    summarize_runs,
)
from dms_perf.bench.methods import resolve_method
from dms_perf.bench.workloads import needle_batch
from dms_perf.model.qwen3_dms import build_model, tiny_config
from dms_perf.rule import visibility_mask
from tests.model.recorders import record_decisions


def test_kv_cache_stats_of_a_dms_cache_counts_heads_and_kept_tokens():
    config = tiny_config(dms_window_size=8)
    device = default_device()  # Triton kernels on CPU tensors need the interpreter, which GPU hosts do not use
    model = build_model(config, backend="hub", dtype=torch.float32, device=device, seed=0)
    prompt = torch.randint(0, config.vocab_size, (1, 96), device=device)
    cache = model.make_dms_cache()
    recorded = record_decisions(model)  # decisions recomputed from q_norm outputs, apart from the model
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    kv_bytes, kept, dense = kv_cache_stats(model, cache, seen_tokens=96)
    visible_to_next = [visibility_mask(d[0], 8, n_queries=1, n_keys=96, query_offset=95) for d in recorded]
    assert dense == config.num_hidden_layers * config.num_key_value_heads * 96
    assert kept == sum(int(v.sum()) for v in visible_to_next)
    # each head holds at least the window + 1 newest tokens and at most every token
    assert config.num_hidden_layers * config.num_key_value_heads * 9 <= kept <= dense
    assert kv_bytes > 0


# --- batches: per-sequence prefill, joined caches, one decode --------------------------------------------

BATCH_CONTEXT = 40  # > the tiny DMS window of 16; every press below accepts it


@pytest.fixture(scope="module")
def models(tiny_models):
    """The shared tiny models, with the method's switches set (``Method.prepare``)."""

    def get(method):
        model = tiny_models(method)
        method.prepare(model)
        return model

    return get


# vanilla, a kvpress press on vanilla, a DMS model, a press whose cache goes to the DMS engine
@pytest.mark.parametrize("name", ["vanilla", "knorm:0.5", "dms-hub", "knorm-triton:0.5"])
def test_a_batch_generates_what_its_prompts_generate_one_by_one(models, name):
    method = resolve_method(name)
    model = models(method)
    prompts = [p.to(model.device) for p in needle_batch(BATCH_CONTEXT, 3, vocab_size=512, seed=2).prompts]
    press = method.press_for(model, prompts[0])
    on_engine = method.family.press_on_engine
    run = generate_batch(model, prompts, new_tokens=4, press=press, press_on_engine=on_engine)
    alone = [generate_once(model, p, new_tokens=4, press=press, press_on_engine=on_engine) for p in prompts]
    assert run.batch == 3 and run.generated_ids.shape == (3, 4)
    assert torch.equal(run.generated_ids, torch.stack([a.generated_ids for a in alone]))
    # distinct prompts, distinct tokens: a join that repeated or swapped sequences would be seen
    assert len({tuple(a.generated_ids.tolist()) for a in alone}) == 3
    # the batch cache's slots are those of its sequences together
    assert run.kept_slots == sum(a.kept_slots for a in alone)
    assert run.dense_slots == sum(a.dense_slots for a in alone)


def test_a_batch_of_one_is_generate_once(models):
    model = models(resolve_method("vanilla"))
    ids = needle_batch(BATCH_CONTEXT, 1, vocab_size=512).prompts[0]
    batch, once = generate_batch(model, [ids], new_tokens=3), generate_once(model, ids, new_tokens=3)
    assert batch.generated_ids.shape == (1, 3) and once.generated_ids.shape == (3,)
    assert torch.equal(batch.generated_ids[0], once.generated_ids)
    assert (batch.batch, batch.kept_slots, batch.kv_bytes) == (once.batch, once.kept_slots, once.kv_bytes)


@pytest.mark.parametrize(("lengths", "match"), [((8, 9), "one length"), ((), "one or more")])
def test_generate_batch_refuses_prompts_of_different_lengths(models, lengths, match):
    model = models(resolve_method("vanilla"))
    with pytest.raises(ValueError, match=match):
        generate_batch(model, [torch.zeros(1, n, dtype=torch.long) for n in lengths], new_tokens=2)


def _dense_cache(*shapes):
    """A DynamicCache with one layer per [B, H, L, D] shape (keys = values = the layer index)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for index, shape in enumerate(shapes):
        cache.update(torch.full(shape, float(index)), torch.full(shape, float(index)), index)
    return cache


def test_join_dense_caches_concatenates_each_layer_along_the_batch():
    a, b = _dense_cache((1, 2, 5, 4), (1, 2, 3, 4)), _dense_cache((1, 2, 5, 4), (1, 2, 3, 4))
    a.layers[0].keys[0, 0, 0, 0] = 7.0  # the first sequence must come first
    joined = join_dense_caches([a, b])
    assert [tuple(layer.keys.shape) for layer in joined.layers] == [(2, 2, 5, 4), (2, 2, 3, 4)]
    assert joined.layers[0].keys[0, 0, 0, 0] == 7.0 and joined.layers[0].keys[1, 0, 0, 0] == 0.0
    assert torch.equal(joined.layers[1].values, torch.ones(2, 2, 3, 4))
    assert joined.get_seq_length(0) == 5 and joined.get_seq_length(1) == 3


@pytest.mark.parametrize(("other", "match"), [
    (((1, 2, 6, 4), (1, 2, 3, 4)), r"layer 0: the caches' keys differ .*\(1, 2, 5, 4\).*\(1, 2, 6, 4\)"),
    (((1, 2, 5, 4), (1, 1, 3, 4)), "layer 1: the caches' keys differ"),
    (((1, 2, 5, 4),), "number of layers"),
])
def test_join_dense_caches_refuses_caches_that_differ(other, match):
    with pytest.raises(ValueError, match=match):
        join_dense_caches([_dense_cache((1, 2, 5, 4), (1, 2, 3, 4)), _dense_cache(*other)])


def test_join_dense_caches_refuses_other_caches():
    from dms_perf.model.cache import DMSReferenceCache

    reference = DMSReferenceCache()  # a DynamicCache with decisions of its own, which a join would drop
    reference.append(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="DMSReferenceCache"):
        join_dense_caches([_dense_cache((1, 2, 5, 4)), reference])


def test_a_batch_row_has_the_batch_figures(models):
    method = resolve_method("vanilla")
    model = models(method)
    row = measure_generation(model, needle_batch(BATCH_CONTEXT, 4, vocab_size=512), method, new_tokens=3,
                             repeats=1, warmup=0)
    assert row["status"] == "ok", row
    assert (row["context"], row["method"], row["batch"], row["generated_tokens"]) == (BATCH_CONTEXT, "vanilla", 4, 3)
    assert row["prefill_tok_s"] == pytest.approx(4 * BATCH_CONTEXT / row["prefill_s"])
    assert row["decode_tok_s"] == pytest.approx(4 * row["decode_tok_s_per_seq"])
    assert row["ms_per_step"] == pytest.approx(1e3 / row["decode_tok_s_per_seq"])
    cfg = model.config
    assert row["kv_bytes"] == 4 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (BATCH_CONTEXT + 2) \
        * cfg.head_dim * 4
    assert row["retrieval"] == "n/a (random weights)"


def test_summarize_runs_of_a_batch():
    runs = [GenerationRun(2.0, 0.5, 6, torch.zeros(4, 6, dtype=torch.long), None, 100, 10, 40, batch=4)]
    row = summarize_runs(runs, context_length=1000, retrieval="3/4 pass")
    assert row["batch"] == 4 and row["prefill_tok_s"] == 4 * 1000 / 2.0
    assert (row["decode_tok_s"], row["decode_tok_s_per_seq"], row["ms_per_step"]) == (4 * 5 / 0.5, 5 / 0.5, 100.0)
    assert row["generated_tokens"] == 6 and row["retrieval"] == "3/4 pass"


def test_a_press_that_hides_keys_is_a_skipped_batch_row(models):
    """kvpress DMSPress hides keys per sequence (masked_key_indices, batch index 0): its caches cannot be
    joined, so a batch says so rather than decoding with the wrong keys hidden; batch 1 runs."""
    method = resolve_method("dmspress-knorm:0.5")
    model = models(method)
    workloads = needle_batch(64, 2, vocab_size=512)
    row = measure_generation(model, workloads, method, new_tokens=2, repeats=1, warmup=0)
    assert row["status"].startswith("skipped: batch 2: the press hides keys (kvpress masked_key_indices)"), row
    assert "prefill_s" not in row
    one = measure_generation(model, workloads.first(1), method, new_tokens=2, repeats=1, warmup=0)
    assert one["status"] == "ok" and one["batch"] == 1


# --- KV held and KV kept ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vanilla", "knorm:0.5", "dms-hub"])
def test_a_row_holds_kv_bytes_held_and_kept(models, name):
    """Held: what the cache holds, rows reserved for decoding included; kept: the keys and values still
    attended to, from which compression is computed. A dense cache (vanilla or shortened by a press) holds
    what it keeps; a DMS cache reserves decode rows, so it holds more than it keeps."""
    method = resolve_method(name)
    model = models(method)
    row = measure_generation(model, needle_batch(BATCH_CONTEXT, 1, vocab_size=512), method, new_tokens=3,
                             repeats=1, warmup=0)
    assert row["status"] == "ok", row
    cfg = model.config
    slot = 2 * cfg.head_dim * 4  # fp32 key and value of one token in one KV head
    dense_slots = cfg.num_hidden_layers * cfg.num_key_value_heads * (BATCH_CONTEXT + 2)
    assert row["kept_kv_bytes"] == pytest.approx(slot * dense_slots / row["compression"])
    if name == "dms-hub":
        assert row["kept_kv_bytes"] < row["kv_bytes"]
    else:
        assert row["kept_kv_bytes"] == row["kv_bytes"]


def test_kept_bytes_of_a_dms_generation_are_the_caches_kept_kv_bytes(models, monkeypatch):
    import dms_perf.bench.generation as generation

    method = resolve_method("dms-hub")
    model = models(method)
    seen = []
    real = generation.kv_cache_stats

    def stats(model, cache, **kwargs):
        seen.append(cache)
        return real(model, cache, **kwargs)

    monkeypatch.setattr(generation, "kv_cache_stats", stats)
    run = generate_once(model, needle_batch(BATCH_CONTEXT, 1, vocab_size=512).prompts[0], new_tokens=3)
    (cache,) = seen
    assert run.kept_kv_bytes == cache.kept_kv_bytes() < run.kv_bytes == cache.kv_bytes()


# --- progress inside a cell, and a cell interrupted after some repeats -------------------------------------


@pytest.mark.parametrize(("name", "warmup", "expected"), [
    ("vanilla", 2, ["warm-up 1/2", "warm-up 2/2", "repeat 1/2", "repeat 2/2"]),
    ("dms-triton", 1, ["warm-up 1/1", "repeat 1/2", "repeat 2/2"]),  # the engine's pool-sizing run is the warm-up
    ("dms-triton", 0, ["repeat 1/2", "repeat 2/2"]),  # none: the timed runs generate on the sizing pool
])
def test_on_run_names_each_generation_of_a_cell(models, name, warmup, expected):
    method = resolve_method(name)
    seen = []
    row = measure_generation(models(method), needle_batch(BATCH_CONTEXT, 1, vocab_size=512), method, new_tokens=2,
                             repeats=2, warmup=warmup, on_run=seen.append)
    assert row["status"] == "ok", row
    assert seen == expected


def test_ctrl_c_after_a_repeat_raises_the_partial_row(models, monkeypatch):
    import dms_perf.bench.generation as generation

    method = resolve_method("vanilla")
    real = generation.generate_batch
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second timed run, after one warm-up and one timed run
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", generate)
    with pytest.raises(generation.CellInterrupted) as info:
        measure_generation(models(method), needle_batch(BATCH_CONTEXT, 1, vocab_size=512), method, new_tokens=3,
                           repeats=4, warmup=1)
    row = info.value.row
    assert row["status"] == "interrupted after 1 of 4 repeats" and row["partial"] is True
    assert row["repeats"] == 1 and len(row["runs_total_s"]) == 1 and row["total_s"] == row["runs_total_s"][0]
    assert isinstance(info.value, KeyboardInterrupt)  # what a caller not knowing partial rows stops on
    # Ctrl-C before any timed run finished: nothing to keep, the plain KeyboardInterrupt
    calls.clear()
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as info:
        measure_generation(models(method), needle_batch(BATCH_CONTEXT, 1, vocab_size=512), method, new_tokens=3,
                           repeats=4, warmup=0)
    assert not isinstance(info.value, generation.CellInterrupted)


# --- long generations: the trace, peak KV held, quarter decode rates, progress in tokens ------------------


@pytest.mark.parametrize("name", ["vanilla", "dms-hub", "dms-triton"])
def test_a_row_traces_kv_and_decode_time_over_the_generation(models, name, monkeypatch):
    """Tokens generated rise through the trace to new_tokens; KV held never falls below what is kept and
    peaks at or above the end; elapsed decode seconds rise to the row's decode time."""
    import dms_perf.bench.generation as generation

    monkeypatch.setattr(generation, "TRACE_SPACING", 1)  # a point at every token of this short generation
    method = resolve_method(name)
    seen = []
    row = measure_generation(models(method), needle_batch(BATCH_CONTEXT, 1, vocab_size=512), method, new_tokens=9,
                             repeats=1, warmup=0, on_tokens=lambda done, total: seen.append((done, total)))
    assert row["status"] == "ok", row
    trace = row["trace"]
    assert trace["tokens"] == list(range(1, 10))  # 9 tokens: every one a point
    assert all(held >= kept > 0 for held, kept in zip(trace["kv_bytes"], trace["kept_kv_bytes"], strict=True))
    assert trace["kv_bytes"][-1] == row["kv_bytes"] and trace["kept_kv_bytes"][-1] == row["kept_kv_bytes"]
    assert row["peak_kv_bytes"] == max(trace["kv_bytes"]) >= row["kv_bytes"]
    assert trace["decode_s"] == sorted(trace["decode_s"]) and trace["decode_s"][0] >= 0
    assert row["ms_per_step"] * 8 / 1e3 == pytest.approx(trace["decode_s"][-1], rel=0.05)
    assert row["decode_tok_s_first_quarter"] > 0 and row["decode_tok_s_last_quarter"] > 0
    # no warm-up: the one timed run (on the engine, on its sizing pool) reports its tokens
    assert seen == [(n, 9) for n in range(1, 10)]


def test_the_trace_has_a_bounded_number_of_points(models, monkeypatch):
    import dms_perf.bench.generation as generation

    monkeypatch.setattr(generation, "TRACE_POINTS", 4)  # 17 tokens: a point every 4, as 1024 would every 16
    monkeypatch.setattr(generation, "TRACE_SPACING", 1)
    method = resolve_method("vanilla")
    prompts = needle_batch(BATCH_CONTEXT, 1, vocab_size=512).prompts
    run = generate_batch(models(method), prompts, new_tokens=17)
    # every 4th token, the first, the end and both quarter boundaries (4 steps each: after 5, from 13)
    assert run.trace["tokens"] == [1, 4, 5, 8, 12, 13, 16, 17]
    monkeypatch.setattr(generation, "TRACE_SPACING", 8)  # a short generation is not synchronized every step
    assert generate_batch(models(method), prompts, new_tokens=17).trace["tokens"] == [1, 5, 8, 13, 16, 17]
    assert run.quarter_steps == 4 and run.first_quarter_s > 0 and run.last_quarter_s > 0
    held = run.trace["kv_bytes"]
    assert held == sorted(held) and run.peak_kv_bytes == held[-1] == run.kv_bytes  # a dense cache only grows
