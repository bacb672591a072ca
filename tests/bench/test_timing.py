"""measure_generation: failures become rows and the matrix goes on; medians; KV accounting. The timing
helpers: one median (pytest-benchmark's, per call) for every figure, do_bench's as a cross-check only;
the graph capture."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch

from dms_perf.bench import timing
from dms_perf.bench.generation import GenerationRun, generate_once, kv_cache_stats, measure_generation, summarize_runs
from dms_perf.bench.methods import load_model_for, resolve_method
from dms_perf.bench.timing import TimerDisagreement, bench, graph_replays, median_call_ms
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
    with pytest.raises(ValueError, match="calls_per_graph > 1 needs cuda_graph=True"):
        median_call_ms(lambda: None, calls_per_graph=8)


class _FakeBenchmark:
    """pytest-benchmark's fixture as ``bench`` uses it: ``pedantic`` runs the rounds and stores ``median``."""

    disabled = False
    name = "fake"

    def __init__(self, median_s: float):
        self.extra_info, self.calls = {}, 0
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=median_s))

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range((rounds + warmup_rounds) * iterations):
            fn()
        self.calls += (rounds + warmup_rounds) * iterations


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """``bench``'s GPU path on the CPU: no device to synchronize, graphs replaced by the plain call."""
    monkeypatch.setattr(timing, "HAS_CUDA", True)
    monkeypatch.setattr(timing, "synchronize", lambda: None)
    monkeypatch.setattr(timing, "graph_replays", lambda fn, calls_per_graph=1: fn)


@pytest.mark.parametrize("calls_per_graph", [1, 8])
def test_the_figure_is_pytest_benchmarks_median_per_call(as_if_on_cuda, monkeypatch, calls_per_graph):
    """Return value and ``median_ms`` are the stored median (per call); do_bench's, here twice as long, is
    recorded as the cross-check and its disagreement warned about, never used as the figure."""
    replay_s = 2e-3 * calls_per_graph  # 2 ms a call
    monkeypatch.setattr(timing, "do_bench_ms", lambda fn: 2 * replay_s * 1e3)
    benchmark = _FakeBenchmark(replay_s)
    with pytest.warns(TimerDisagreement, match="ratio 0.50"):
        call_s = bench(benchmark, lambda: None, cuda_graph=True, calls_per_graph=calls_per_graph)
    assert call_s == pytest.approx(2e-3)
    info = benchmark.extra_info
    assert info["median_ms"] == pytest.approx(2.0) and info["calls_per_replay"] == calls_per_graph
    assert info["do_bench_median_ms"] == pytest.approx(4.0) and info["timer_agreement"] == pytest.approx(0.5)


def test_timers_that_agree_raise_no_warning(as_if_on_cuda, monkeypatch):
    monkeypatch.setattr(timing, "do_bench_ms", lambda fn: 1.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimerDisagreement)
        assert bench(_FakeBenchmark(1e-3), lambda: None) == pytest.approx(1e-3)


def test_references_are_timed_as_a_case_is(as_if_on_cuda, monkeypatch):
    """``median_call_ms``: rounds of back-to-back calls, warm-ups left out, the median per call (a slow
    warm-up and one slow round do not move it)."""
    clock = {"s": 0.0, "calls": 0}
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["s"]))

    def call():
        clock["calls"] += 1
        clock["s"] += 0.1 if clock["calls"] <= 3 or clock["calls"] == 10 else 1e-3  # compilation, then 1 ms

    assert median_call_ms(call, rounds=5) == pytest.approx(1.0)
    clock["calls"] = 0
    assert median_call_ms(call, rounds=5, cuda_graph=True) == pytest.approx(1.0)
    clock["calls"] = 0  # a replay of 4 calls (the replay here is one call of 1 ms)
    assert median_call_ms(call, rounds=5, cuda_graph=True, calls_per_graph=4) == pytest.approx(0.25)


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


def test_device_spans_record_nothing_without_cuda():
    spans = timing.DeviceSpans(torch.device("cpu"))
    spans.begin()
    spans.end()
    assert not spans.enabled and spans.elapsed_ms() == []


@pytest.mark.gpu
def test_device_spans_time_each_span_on_the_device():
    """Spans around work the host does not wait for: one time each, in order; a span of a longer kernel
    (8x the matmul FLOPs) takes longer; a ``begin`` without an ``end`` adds nothing."""
    a = torch.randn(2048, 2048, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")
    a @ a, b @ b  # warm-up (cuBLAS handles, kernels)
    spans = timing.DeviceSpans(torch.device("cuda"))
    for x in (a, b, a):
        spans.begin()
        for _ in range(4):
            x @ x
        spans.end()
    spans.begin()
    times = spans.elapsed_ms()
    assert len(times) == 3 and all(t > 0 for t in times)
    assert times[1] > 3 * max(times[0], times[2])


def test_device_info_names_the_commit_that_runs(monkeypatch):
    """Every figure's machine record names its commit: the environment's where a tree was copied without
    git metadata, else the checkout's HEAD (a short hash, with -dirty when tracked files changed)."""
    import re

    from dms_perf.bench.device import source_commit

    monkeypatch.setenv("DMS_PERF_COMMIT", "abc1234")
    assert source_commit() == "abc1234"
    monkeypatch.delenv("DMS_PERF_COMMIT")
    commit = source_commit()
    if not (Path(__file__).resolve().parents[2] / ".git").exists():
        pytest.skip("this tree is no git checkout")
    assert commit is not None and re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", commit), commit
