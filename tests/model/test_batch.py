"""A batch prefilled sequence by sequence (``DMSCache.stacked``) decodes exactly as its sequences do alone."""

from __future__ import annotations

import pytest
import torch

from dms_perf.model.cache import DMSCache
from dms_perf.model.qwen3_dms import build_model, tiny_config

STEPS = 6


def _greedy(model, cache, token, position, steps):
    """``steps`` greedy decode steps from ``token`` at ``position``; returns the tokens [B, steps]."""
    tokens = []
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        tokens.append(token)
        position = position + 1
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("evict", [True, False], ids=["dms", "dense"])
def test_stacked_batch_decodes_like_each_sequence_alone(evict, device):
    config = tiny_config(dms_initial_alpha_offset=-40.0)  # marks most tokens: heads differ in length
    model = build_model(config, backend="triton", device=device)
    model.set_dms_eviction(evict)
    model.dms_capacity_step = 4  # several re-sizes during the steps
    prompts = torch.randint(0, config.vocab_size, (3, 60), device=device)
    with torch.no_grad():
        alone, caches, firsts = [], [], []
        for prompt in prompts:
            out = model(input_ids=prompt[None], past_key_values=model.make_dms_cache(), use_cache=True)
            firsts.append(out.logits[:, -1:].argmax(-1))
            caches.append(out.past_key_values)
        batch = DMSCache.stacked(caches)
        position = torch.full((3, 1), prompts.shape[1], device=device)
        for b, prompt in enumerate(prompts):
            out = model(input_ids=prompt[None], past_key_values=model.make_dms_cache(), use_cache=True)
            alone.append(_greedy(model, out.past_key_values, firsts[b], position[:1], STEPS))
        together = _greedy(model, batch, torch.cat(firsts), position, STEPS)
    assert torch.equal(together, torch.cat(alone))
    for b in range(3):
        assert torch.equal(batch.head_lengths(0)[b], _lengths_after(model, prompts[b], firsts[b], STEPS))


def _lengths_after(model, prompt, first, steps):
    with torch.no_grad():
        out = model(input_ids=prompt[None], past_key_values=model.make_dms_cache(), use_cache=True)
        cache = out.past_key_values
        _greedy(model, cache, first, torch.full((1, 1), prompt.shape[0], device=prompt.device), steps)
    return cache.head_lengths(0)[0]


def test_stacking_needs_equal_lengths(device):
    config = tiny_config()
    model = build_model(config, backend="triton", device=device)
    with torch.no_grad():
        short = model(input_ids=torch.zeros(1, 20, dtype=torch.long, device=device),
                      past_key_values=model.make_dms_cache(), use_cache=True).past_key_values
        long = model(input_ids=torch.zeros(1, 30, dtype=torch.long, device=device),
                     past_key_values=model.make_dms_cache(), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="same number of tokens"):
        DMSCache.stacked([short, long])
    with pytest.raises(ValueError, match="at least one"):
        DMSCache.stacked([])
