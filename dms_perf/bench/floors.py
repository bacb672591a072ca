"""Memory floors of the model's steps: the bytes a step cannot avoid moving.

One module for every consumer: ``dms-perf capacity`` (weights next to the KV cache in its budget), the
benchmarks (each memory-bound case's bytes at the measured copy bandwidth, ``bandwidth_floor``) and the
tests that count the bytes by hand from the config.
"""

from __future__ import annotations

import torch


def weight_bytes(model) -> int:
    """Bytes of the model's parameters: what its weights occupy on the device (a tied table once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def config_weight_bytes(config, dtype: torch.dtype) -> int:
    """``weight_bytes`` of a Qwen3 model of ``config`` in ``dtype``, counted on the meta device: nothing is
    allocated, so a budget can be checked against the weights before any model is built."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def decode_read_bytes(model, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads: every parameter once, except the input
    embedding table, of which the step reads only its ``batch`` tokens' rows (unless the table is also the
    output projection, which reads all of it). The weight part of a decode step's memory floor."""
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() == table.data_ptr():
        return weight_bytes(model)
    rows = min(batch, table.shape[0])
    return weight_bytes(model) - (table.shape[0] - rows) * table.shape[1] * table.element_size()


def decode_step_read_bytes(model, batch: int, cache) -> int:
    """A decode step's memory floor in bytes for ``batch`` sequences on ``cache``: the weights it reads
    (``decode_read_bytes``) and the K/V the cache keeps, each read once."""
    return decode_read_bytes(model, batch) + cache.kept_kv_bytes()


def bandwidth_floor(moved_bytes: int, seconds: float) -> dict[str, float]:
    """A memory-bound call's figures from its measured time: ``floor_ms`` (``moved_bytes`` at the measured
    copy bandwidth, ``dms_perf.bench.timing.copy_bandwidth_bytes_per_s``), ``floor_fraction`` (floor over
    ``seconds``) and ``gbps``."""
    from dms_perf.bench.timing import copy_bandwidth_bytes_per_s

    floor_s = moved_bytes / copy_bandwidth_bytes_per_s()
    return {"floor_ms": floor_s * 1e3, "floor_fraction": floor_s / seconds, "gbps": moved_bytes / seconds / 1e9}


def roofline_floor(moved_bytes: int, flops: int, seconds: float) -> dict[str, float]:
    """A call that may be bound by its bytes or its arithmetic: ``bandwidth_floor``'s figures with
    ``floor_ms`` the larger of the bytes' floor (``bytes_floor_ms``) and the FLOPs' at the measured matmul
    rate (``flop_floor_ms``, ``dms_perf.bench.timing.matmul_flops_per_s``), and ``tflops`` achieved."""
    from dms_perf.bench.timing import matmul_flops_per_s

    figures = bandwidth_floor(moved_bytes, seconds)
    bytes_ms, flop_ms = figures["floor_ms"], flops / matmul_flops_per_s() * 1e3
    floor_ms = max(bytes_ms, flop_ms)
    figures.update(bytes_floor_ms=bytes_ms, flop_floor_ms=flop_ms, floor_ms=floor_ms,
                   floor_fraction=floor_ms / (seconds * 1e3), tflops=flops / seconds / 1e12)
    return figures
