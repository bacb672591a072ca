"""dms-perf: Triton kernels, a model and a benchmark suite for Dynamic Memory Sparsification (DMS).

What DMS does, as this package implements it, is specified in ``docs/DMS.md``. Layers, lowest first:
``dms_perf.rule`` (the DMS rule), ``dms_perf.ops`` (kernels and their references), ``dms_perf.model``
(Qwen3-DMS and its cache), ``dms_perf.bench`` (methods, timing, runs, report, CLI), ``dms_perf.ci``.
"""

from dms_perf import _runtime  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)

__version__ = "0.1.0"

# Public names, imported on first use so that importing the package stays cheap.
_LAZY = {
    "left_pad_2d": "dms_perf.ops",
    "scatter_by_index": "dms_perf.ops",
    "bool_gather_left_pad": "dms_perf.ops",
    "compact_by_bool": "dms_perf.ops",
    "dms_prefill_attention": "dms_perf.ops",
    "dms_decode_attention": "dms_perf.ops",
    "dms_decisions": "dms_perf.rule",
    "visibility_mask": "dms_perf.rule",
    "DMSCache": "dms_perf.model.cache",
    "kv_cache_bytes": "dms_perf.model.cache",
    "PagedKVPool": "dms_perf.model.paged",
    "apply_engine_fusions": "dms_perf.model.fused",
    "Qwen3DMSForCausalLM": "dms_perf.model.qwen3_dms",
    "build_model": "dms_perf.model.qwen3_dms",
    "load_model": "dms_perf.model.qwen3_dms",
    "tiny_config": "dms_perf.model.qwen3_dms",
    "qwen3_8b_config": "dms_perf.model.qwen3_dms",
    "calibrate_dms": "dms_perf.model.calibrate",
    "resolve_method": "dms_perf.bench.methods",
    "needle_workload": "dms_perf.bench.workloads",
    "measure_generation": "dms_perf.bench.generation",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dms_perf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
