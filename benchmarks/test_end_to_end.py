"""End-to-end greedy generation per (context length, method), every method from the one registry.

GPU: random weights of the Qwen3-8B(-DMS) shape in bf16, DMS eviction calibrated to 8x, 32 new tokens
(as the committed ``dms-perf bench`` results; the 36 cells then fit one CI job), median of 3 rounds after
one warm-up. CPU smoke (``--benchmark-disable``): the tiny model, 4 tokens, once.
The pytest-benchmark figure is the whole generation (prefill + decode); the split (TTFT, decode tok/s),
peak VRAM, KV bytes and compression are in ``extra_info``: each case's row of the ``dms-perf bench``
tables, so ``dms-perf report <benchmark JSON>`` renders results.md and the plots from such a run.
Select with ``--context-lengths`` and ``--methods`` (e.g. ``--methods vanilla,dms-triton,snapkv:0.5``).
"""

from __future__ import annotations

import pytest
import torch

from dms_perf._runtime import HAS_CUDA, default_device
from dms_perf.bench.generation import generate_once, release_memory, summarize_runs
from dms_perf.bench.methods import DEFAULT_METHODS, DMS_BACKENDS, load_model_for, resolve_method
from dms_perf.bench.workloads import needle_workload

# Whole generations: mostly decode steps, whose time is Python on the host (benchmarks/NOTES.md).
pytestmark = pytest.mark.host_bound

MODEL = "qwen3-8b" if HAS_CUDA else "tiny"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
NEW_TOKENS = 32 if HAS_CUDA else 4
ROUNDS = 3 if HAS_CUDA else 1
WARMUP_ROUNDS = 1 if HAS_CUDA else 0
NEEDLE_DEPTH = 0.5
TARGET_CR = 8

# Methods sharing a backend run one after the other, so each model is built once.
_BACKEND_ORDER = (None, *DMS_BACKENDS)
METHODS = sorted(DEFAULT_METHODS, key=lambda n: _BACKEND_ORDER.index(resolve_method(n).backend))

_held: dict = {}  # the one model alive (an 8B model is 16 GB): backend -> (model, calibration)


def _model_for(method):
    if method.backend not in _held:
        _held.clear()
        release_memory()
        _held[method.backend] = load_model_for(MODEL, method, dtype=DTYPE, device=default_device(),
                                               target_cr=TARGET_CR)
    return _held[method.backend]


@pytest.fixture(scope="module", autouse=True)
def _free_model_at_end():
    yield
    _held.clear()
    release_memory()


@pytest.fixture(scope="module", params=METHODS)
def method(request):
    """Module-scoped so that pytest runs all context lengths of one method together."""
    return request.param


def test_end_to_end(benchmark, method, context_length):
    m = resolve_method(method)
    if context_length < m.min_context:
        pytest.skip(f"{m.name} needs a prompt of at least {m.min_context} tokens")
    model, calibration = _model_for(m)
    workload = needle_workload(context_length, vocab_size=model.config.vocab_size, needle_depth=NEEDLE_DEPTH)
    input_ids = workload.input_ids.to(default_device())
    m.prepare(model)
    press = m.press_for(model, input_ids)
    runs = []
    out_of_memory = False
    try:
        benchmark.pedantic(
            lambda: runs.append(generate_once(model, input_ids, new_tokens=NEW_TOKENS, press=press,
                                              press_on_engine=m.family.press_on_engine)),
            rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS,
        )
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    release_memory()
    if out_of_memory:
        pytest.skip(f"out of memory: {m.name} at {context_length} tokens")
    row = summarize_runs(runs[-ROUNDS:], context_length=context_length,
                         retrieval=workload.retrieval(runs[-1].generated_ids, real_weights=False))
    assert row["generated_tokens"] == NEW_TOKENS and row["compression"] >= 1.0
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("status", "runs_total_s")})
    benchmark.extra_info.update(model=MODEL, dtype=str(DTYPE).removeprefix("torch."), method=m.name,
                                weights="random weights", target_cr=TARGET_CR, needle_depth=NEEDLE_DEPTH,
                                warmup_runs=WARMUP_ROUNDS)
    calibration = m.calibration(model) or calibration  # dms-calibrated evicts by its own
    if calibration is not None and m.evicts:
        benchmark.extra_info["calibrated_marked_fraction"] = calibration.marked_fraction
