"""kv_cache_stats on a DMSCache: slots come from the per-head lengths, not from the buffer's shape."""

from __future__ import annotations

import torch

from dms_perf._runtime import default_device
from dms_perf.bench.generation import kv_cache_stats
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
