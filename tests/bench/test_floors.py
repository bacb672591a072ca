"""The memory floors (dms_perf.bench.floors) against bytes counted by hand from the config."""

from __future__ import annotations

import pytest
import torch

from dms_perf.bench import floors
from dms_perf.model.qwen3_dms import build_model, tiny_config


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_decode_step_reads_the_embedding_rows_of_its_tokens_only(tied):
    """The floor's weight bytes, counted by hand from the config: the layers, the final norm and the output
    projection in full; of an untied input embedding table only one row per sequence."""
    config = tiny_config(tie_word_embeddings=tied)
    model = build_model(config, backend="triton")
    hidden, vocab, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden + 2 * config.head_dim
    output = vocab * hidden
    for batch in (1, 3):
        table = 0 if tied else batch * hidden
        expected = (config.num_hidden_layers * layer + hidden + output + table) * 4  # fp32
        assert floors.decode_read_bytes(model, batch) == expected
    assert floors.weight_bytes(model) == (config.num_hidden_layers * layer + hidden + output * (1 if tied else 2)) * 4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weights_counted_from_the_config_are_the_built_models(tied, weights_dtype):
    """What capacity checks its budget against before building anything: the weights of the built model."""
    config = tiny_config(tie_word_embeddings=tied)
    built = build_model(config, backend="triton", dtype=weights_dtype)
    assert floors.config_weight_bytes(config, weights_dtype) == floors.weight_bytes(built)


def test_bandwidth_floor_is_the_bytes_at_the_measured_copy_rate(monkeypatch):
    """A memory-bound case's floor, fraction and GB/s, from its bytes and its own time (one place for every
    benchmark file)."""
    from dms_perf.bench import timing
    from dms_perf.bench.floors import bandwidth_floor

    monkeypatch.setattr(timing, "copy_bandwidth_bytes_per_s", lambda: 2e12)
    figures = bandwidth_floor(10**9, 1e-3)
    assert figures == pytest.approx({"floor_ms": 0.5, "floor_fraction": 0.5, "gbps": 1000.0})


@pytest.mark.parametrize("flops,bound", [(10**12, "bytes"), (4 * 10**12, "flops")])
def test_roofline_floor_is_the_larger_of_the_bytes_and_the_flops_floor(flops, bound, monkeypatch):
    """1 GB at 2 TB/s is 0.5 ms; 1 / 4 TFLOP at 2 PFLOP/s 0.5 / 2 ms: the floor is the larger, its fraction of
    the call's 4 ms, and the rates achieved."""
    from dms_perf.bench import timing
    from dms_perf.bench.floors import roofline_floor

    monkeypatch.setattr(timing, "copy_bandwidth_bytes_per_s", lambda: 2e12)
    monkeypatch.setattr(timing, "matmul_flops_per_s", lambda: 2e15)
    figures = roofline_floor(10**9, flops, 4e-3)
    floor = 0.5 if bound == "bytes" else 2.0
    expected = {"floor_ms": floor, "floor_fraction": floor / 4, "gbps": 250.0, "bytes_floor_ms": 0.5,
                "flop_floor_ms": flops / 2e12, "tflops": flops / 4e-3 / 1e12}
    assert figures == pytest.approx(expected)
