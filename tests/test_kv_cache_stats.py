"""kv_cache_stats on a DMSCache: slots come from the per-head lengths, not from the buffer's shape."""

from __future__ import annotations

import torch

from dms_perf.dms.model import build_model, tiny_config
from dms_perf.measure import kv_cache_stats


def test_kv_cache_stats_of_a_dms_cache_counts_heads_and_kept_tokens():
    config = tiny_config(dms_window_size=8)
    model = build_model(config, backend="hub", dtype=torch.float32, device="cpu", seed=0)
    prompt = torch.randint(0, config.vocab_size, (1, 96))
    cache = model.make_dms_cache()
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    kv_bytes, kept, dense = kv_cache_stats(model, cache, seen_tokens=96)
    lengths = [cache.head_lengths(i) for i in range(config.num_hidden_layers)]
    assert dense == config.num_hidden_layers * config.num_key_value_heads * 96
    assert kept == sum(int(n.sum()) for n in lengths)
    # each head holds at least the window + 1 newest tokens and at most every token
    assert config.num_hidden_layers * config.num_key_value_heads * 9 <= kept <= dense
    assert kv_bytes > 0
