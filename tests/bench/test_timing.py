"""measure_generation: failures become rows and the matrix goes on; medians; KV accounting. The timing
helpers' graph capture."""

from __future__ import annotations

import pytest
import torch

from dms_perf.bench.generation import GenerationRun, generate_once, kv_cache_stats, measure_generation, summarize_runs
from dms_perf.bench.methods import load_model_for, resolve_method
from dms_perf.bench.timing import bench, graph_replays
from dms_perf.bench.workloads import needle_workload

VANILLA = resolve_method("vanilla")


@pytest.fixture(scope="module")
def model():
    return load_model_for("tiny", VANILLA, dtype=torch.float32, device="cpu")[0]


def _fail_on_call(model, monkeypatch, call: int, exc: Exception):
    """Make the ``call``-th forward of ``model`` raise ``exc`` (a forced failure mid-generation)."""
    real = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OOM"),
        (RuntimeError("CUDA error: out of memory"), "OOM"),
        (RuntimeError("boom\nsecond line"), "error: RuntimeError: boom"),
    ],
)
def test_failure_becomes_a_row_and_the_next_cell_runs(model, monkeypatch, exc, status):
    workload = needle_workload(64, vocab_size=model.config.vocab_size)
    calls = _fail_on_call(model, monkeypatch, call=3, exc=exc)  # inside the warm-up's decode
    row = measure_generation(model, workload, VANILLA, new_tokens=4, repeats=2, warmup=1)
    assert calls["n"] == 3
    assert row == {"context": 64, "method": "vanilla", "batch": 1, "new_tokens": 4, "status": status}
    monkeypatch.undo()
    again = measure_generation(model, workload, VANILLA, new_tokens=4, repeats=1, warmup=0)
    assert again["status"] == "ok" and again["generated_tokens"] == 4


def test_generate_once_counts_and_times(model):
    ids = needle_workload(50, vocab_size=model.config.vocab_size).input_ids
    run = generate_once(model, ids, new_tokens=5)
    assert run.generated_ids.shape == (5,) and run.generated_ids.dtype == torch.long
    assert run.prefill_s > 0 and run.decode_s > 0
    cfg = model.config
    slots = cfg.num_hidden_layers * cfg.num_key_value_heads * (50 + 4)
    assert run.kept_slots == run.dense_slots == slots
    assert run.kv_bytes == 2 * slots * cfg.head_dim * 4  # fp32 keys and values


def test_single_token_has_no_decode_speed(model):
    row = measure_generation(model, needle_workload(32, vocab_size=512), VANILLA, new_tokens=1, repeats=1, warmup=0)
    assert row["status"] == "ok" and row["generated_tokens"] == 1 and row["decode_tok_s"] is None


def test_kv_cache_stats_counts_hidden_keys_of_dmspress(model):
    """Keys listed in ``masked_key_indices`` stay in memory but are not attended: not kept."""
    ids = torch.randint(0, 512, (1, 40))
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    attn = model.model.layers[1].self_attn
    try:
        attn.masked_key_indices = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([3, 4, 5]))
        kv_bytes, kept, dense = kv_cache_stats(model, cache, seen_tokens=40)
    finally:
        attn.masked_key_indices = None
    cfg = model.config
    assert dense == cfg.num_hidden_layers * cfg.num_key_value_heads * 40
    assert kept == dense - 3
    assert kv_bytes == 2 * dense * cfg.head_dim * 4


def _run(prefill, decode, new_tokens=5):
    return GenerationRun(prefill, decode, new_tokens, torch.zeros(new_tokens, dtype=torch.long), None, 100, 10, 40)


def test_summarize_takes_medians():
    runs = [_run(1.0, 4.0), _run(3.0, 2.0), _run(2.0, 8.0)]
    row = summarize_runs(runs, context_length=1000, retrieval="n/a (random weights)")
    assert row["prefill_s"] == 2.0 and row["prefill_tok_s"] == 500.0
    assert row["decode_tok_s"] == 4 / 4.0
    assert row["total_s"] == 5.0  # median of 5, 5, 10
    assert row["compression"] == 4.0 and row["kv_bytes"] == 100
    assert row["runs_total_s"] == [5.0, 5.0, 10.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(repeats=0), "repeats=0"), (dict(warmup=-1), "warmup=-1"), (dict(new_tokens=0), "new_tokens=0")],
)
def test_bad_repeats(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_generation(model, needle_workload(8, vocab_size=512), VANILLA, **kwargs)


def test_bad_new_tokens(model):
    with pytest.raises(ValueError, match="new_tokens"):
        generate_once(model, torch.zeros(1, 4, dtype=torch.long), new_tokens=0)


def test_back_to_back_calls_need_graphs():
    with pytest.raises(ValueError, match="calls_per_graph > 1 needs cuda_graph=True"):
        bench(object(), lambda: None, calls_per_graph=8)


@pytest.mark.gpu
def test_graph_replays_captures_back_to_back_calls():
    """Each replay runs ``calls_per_graph`` captured calls, each on the next rotating input set."""
    sets = [torch.zeros(4, device="cuda") for _ in range(6)]
    next_set = iter(sets * 4).__next__  # 6 warm-up calls, then 6 captured
    replay = graph_replays(lambda: next_set().add_(1), count=2, calls_per_graph=3)
    torch.cuda.synchronize()
    before = [t.clone() for t in sets]
    replay()  # the first graph: the first three sets captured
    torch.cuda.synchronize()
    assert [int(t[0] - b[0]) for t, b in zip(sets, before, strict=True)] == [1, 1, 1, 0, 0, 0]
    replay()  # the second graph: the next three
    torch.cuda.synchronize()
    assert [int(t[0] - b[0]) for t, b in zip(sets, before, strict=True)] == [1] * 6
