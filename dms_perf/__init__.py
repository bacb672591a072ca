"""dms-perf: Triton kernels, a model and a benchmark suite for Dynamic Memory Sparsification (DMS).

The specification of DMS that this package implements is ``shared/DMS.md``.
"""

from dms_perf import _runtime  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)

__version__ = "0.1.0"

# Public names, imported on first use so that importing the package stays cheap.
_LAZY = {
    "left_pad_2d": "dms_perf.kernels.left_pad",
    "scatter_by_index": "dms_perf.kernels.scatter",
    "bool_gather_left_pad": "dms_perf.kernels.bool_gather",
    "compact_by_bool": "dms_perf.kernels.compact",
    "dms_prefill_attention": "dms_perf.dms.prefill",
    "dms_decisions": "dms_perf.dms.rule",
    "dms_decode_attention": "dms_perf.kernels.decode_attention",
    "DMSCache": "dms_perf.dms.cache",
    "kv_cache_bytes": "dms_perf.dms.cache",
    "Qwen3DMSForCausalLM": "dms_perf.dms.model",
    "calibrate_dms": "dms_perf.dms.calibrate",
    "resolve_method": "dms_perf.methods",
    "needle_workload": "dms_perf.workloads",
    "measure_generation": "dms_perf.measure",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dms_perf' has no attribute {name!r}")
