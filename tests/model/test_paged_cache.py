"""The DMS cache on the decode engine's paged KV pool (dms_perf.model.cache.PagedCacheLayer): it decodes
exactly as a cache that owns its buffers and as the math reference, heads take pages as they grow and no
page has two owners, running out is a clear out-of-memory error that corrupts nothing, and on the GPU the
graphs of one batch size are captured once and replayed by later generations without a host sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dms_perf.bench.generation import engine_pool, failure_status
from dms_perf.model.cache import DMSCache
from dms_perf.model.paged import NO_PAGE, PagedKVPool, PagesExhausted
from dms_perf.model.qwen3_dms import build_model, tiny_config
from dms_perf.testing import rel_error

STEPS = 10


def _model(device, dtype=torch.float32, backend="triton", **overrides):
    overrides.setdefault("dms_initial_alpha_offset", -40.0)  # marks most tokens: heads differ
    config = tiny_config(**overrides)
    return build_model(config, backend=backend, dtype=dtype, device=device)


def _pool(model, *, max_seqs=4, page_rows=16, budget=1 << 22):
    pool = PagedKVPool.for_budget(model, budget, max_seqs=max_seqs, page_rows=page_rows, max_rows_per_head=4096)
    model.use_kv_pool(pool)
    return pool


def _decode(model, cache, first, prompt_length, steps):
    """Greedy steps from ``first`` [B, 1]; returns (tokens [B, steps], logits [B, steps, V])."""
    token, tokens, logits = first, [], []
    for i in range(steps):
        position = torch.full((first.shape[0], 1), prompt_length + i, device=first.device)
        out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        logits.append(out.logits[:, -1].float())
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _prefill(model, ids, cache):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _check_pages(pool: PagedKVPool):
    """Every page in a block table has exactly one owner, each head holds the pages its length needs, and
    the free list and the tables partition the pool."""
    table = pool.block_table.cpu().numpy()
    lengths = pool.lengths.cpu().numpy()
    owned = table[table != NO_PAGE]
    assert len(np.unique(owned)) == owned.size, "a page is listed by two heads"
    held = (table != NO_PAGE).sum(-1)
    assert (held * pool.page_rows >= lengths).all(), "a head holds rows beyond its pages"
    # a head's pages are its first entries
    assert ((table != NO_PAGE) == (np.arange(table.shape[-1]) < held[..., None])).all()
    assert owned.size + pool.free_pages == pool.num_pages


@pytest.mark.parametrize("backend", ["triton", "hub-triton"])
@pytest.mark.parametrize("page_rows,capacity_step", [(4, 3), (64, 64)], ids=["small-pages", "one-page"])
def test_paged_generation_equals_owned_buffers(page_rows, capacity_step, backend, device):
    """Same tokens, logits and per-head lengths as the cache that owns its buffers; with 4-row pages and a
    hand-out every 3 steps, heads take many pages while decoding and return the ones slot reuse emptied."""
    model = _model(device, backend=backend)
    model.dms_capacity_step = capacity_step
    ids = torch.randint(0, model.config.vocab_size, (2, 70), device=device)
    with torch.no_grad():
        owned = model.make_dms_cache()
        want_tokens, want_logits = _decode(model, owned, _prefill(model, ids, owned), 70, STEPS)
        pool = _pool(model, page_rows=page_rows)
        paged = model.make_dms_cache()
        assert paged.pool is pool
        got_tokens, got_logits = _decode(model, paged, _prefill(model, ids, paged), 70, STEPS)
    assert torch.equal(got_tokens, want_tokens)
    assert rel_error(got_logits, want_logits) < 1e-5
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(paged.head_lengths(layer), owned.head_lengths(layer))
        assert paged.layers[layer].keys.data_ptr() == pool.keys.data_ptr()  # the pool's pages, not a copy
    _check_pages(pool)


@pytest.mark.parametrize("evict", [True, False], ids=["dms", "dense"])
def test_long_paged_generation_equals_the_math_reference(evict, device):
    """Greedy tokens of the paged engine equal the math reference's (every K/V kept, the rule applied as a
    mask) over 48 steps with a window of 6 and 4-row pages: many pages handed out, many slots reused."""
    model = _model(device, dms_window_size=6)
    model.set_dms_eviction(evict)
    model.dms_capacity_step = 8
    reference = _model(device, backend="math", dms_window_size=6)
    reference.load_state_dict(model.state_dict())
    reference.set_dms_eviction(evict)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    steps, seen = 48, 16 + 48
    with torch.no_grad():
        pool = _pool(model, page_rows=4)
        cache = model.make_dms_cache()
        got, _ = _decode(model, cache, _prefill(model, ids, cache), 16, steps)
        ref_cache = reference.make_dms_cache()
        want, _ = _decode(reference, ref_cache, _prefill(reference, ids, ref_cache), 16, steps)
        lengths = torch.stack([cache.head_lengths(i) for i in range(len(cache.layers))])
    assert torch.equal(got, want)
    dense_pages = lengths.numel() * -(-seen // 4)
    if evict:  # most tokens evicted: the heads hold a fraction of the pages a dense cache would
        assert int(lengths.max()) < seen and pool.pages_in_use < 0.75 * dense_pages
    else:
        assert (lengths == seen).all() and pool.pages_in_use >= dense_pages
    _check_pages(pool)


def test_bounds_follow_the_rows_kept_and_never_fall_below_a_length(device):
    """Under eviction most steps reuse a slot, and the pool's read-backs count the reuses ahead: at every step
    of a 64-step generation (window 16, 4-row pages, a hand-out every 8 steps) no head is longer than its
    host bound, and the rows its pages hold beyond its length average under one hand-out. A bound of the
    length read back plus the steps since would keep at least a hand-out of spare rows after each hand-out
    (12.6 rows on average here)."""
    model = _model(device, dms_window_size=16)
    model.dms_capacity_step = 8
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device=device)
    spare = []
    with torch.no_grad():
        pool = _pool(model, page_rows=4)
        cache = model.make_dms_cache()
        token = _prefill(model, ids, cache)
        for i in range(64):
            position = torch.full((2, 1), 40 + i, device=device)
            token = model(input_ids=token, past_key_values=cache, position_ids=position,
                          use_cache=True).logits[:, -1:].argmax(-1)
            lengths = pool.lengths[:, :2].cpu().numpy()
            assert (lengths <= pool.bounds(2)).all(), f"step {i}: a head outgrew its bound"
            spare.append((pool.rows_held(2) - lengths).mean())
    assert int(lengths.max()) < 40 + 64  # it evicted
    assert np.mean(spare) < model.dms_capacity_step
    _check_pages(pool)


@pytest.mark.parametrize("spread,heads,expected", [
    (1.0, 8, "per_head"), (1.15, 8, "per_head"), (1.16, 8, "balanced"), (1.9, 1023, "balanced"),
    (1.9, 1024, "per_head"), (2.0, 4096, "per_head"), (2.01, 4096, "balanced"), (1.16, 1024, "per_head"),
])
def test_decode_schedule_takes_per_head_splits_for_even_or_many_heads(spread, heads, expected):
    """Per-head splits for heads within ``EVEN_SPREAD`` of their mean, or at least ``MANY_HEADS`` of them
    within ``MANY_HEADS_SPREAD``; the balanced scheduler otherwise (the rule at the constants' values)."""
    from dms_perf.model.cache import EVEN_SPREAD, MANY_HEADS, MANY_HEADS_SPREAD, decode_schedule

    assert (EVEN_SPREAD, MANY_HEADS, MANY_HEADS_SPREAD) == (1.15, 1024, 2.0)  # the cases are placed around them
    assert decode_schedule(spread, heads) == expected


@pytest.mark.parametrize("even_spread", [0.0, 1e9], ids=["balanced", "per-head"])
def test_the_decode_scheduler_follows_the_heads_spread(even_spread, device, monkeypatch):
    """The paged layers ask decode attention for per-head splits while the heads' bounds are within
    ``EVEN_SPREAD`` of their mean and for the balanced scheduler otherwise; either way the greedy tokens
    are the math reference's (eviction makes the heads of this model uneven)."""
    import dms_perf.model.cache as cache_module

    monkeypatch.setattr(cache_module, "EVEN_SPREAD", even_spread)
    asked = []
    real = cache_module.dms_decode_attention

    def recording(*args, **kwargs):
        asked.append(kwargs["schedule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "dms_decode_attention", recording)
    model = _model(device, dms_window_size=6)
    model.dms_capacity_step = 8
    reference = _model(device, backend="math", dms_window_size=6)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        pool = _pool(model, page_rows=4)
        cache = model.make_dms_cache()
        got, _ = _decode(model, cache, _prefill(model, ids, cache), 16, 24)
        ref_cache = reference.make_dms_cache()
        want, _ = _decode(reference, ref_cache, _prefill(reference, ids, ref_cache), 16, 24)
    assert torch.equal(got, want)
    assert pool.bound_spread(2) > 1.0
    assert asked and set(asked) == {"balanced" if even_spread == 0.0 else "per_head"}


def test_a_batch_on_the_pool_equals_its_prompts_one_by_one(device):
    model = _model(device)
    model.dms_capacity_step = 5
    prompts = torch.randint(0, model.config.vocab_size, (3, 40), device=device)
    with torch.no_grad():
        singles = []
        for prompt in prompts:
            cache = model.make_dms_cache()
            singles.append(_decode(model, cache, _prefill(model, prompt[None], cache), 40, STEPS)[0])
        pool = _pool(model, page_rows=8)
        batch = model.make_dms_cache()
        got, _ = _decode(model, batch, _prefill(model, prompts, batch), 40, STEPS)
    assert torch.equal(got, torch.cat(singles))
    assert pool.live_slots == [0, 1, 2]
    _check_pages(pool)


def test_heads_hold_their_own_rows_in_their_pages(device):
    """Each head's rows, read through its block table, are the rows the cache with its own buffers holds."""
    model = _model(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 50), device=device)
    with torch.no_grad():
        owned = model.make_dms_cache()
        _prefill(model, ids, owned)
        pool = _pool(model, page_rows=8)
        paged = model.make_dms_cache()
        _prefill(model, ids, paged)
    for layer_idx, theirs in enumerate(owned.layers):
        for b in range(2):
            for h in range(model.config.num_key_value_heads):
                keys, values = pool.head_rows(layer_idx, b, h)
                start, length = int(theirs.starts[b, h]), int(theirs.lengths[b, h])
                assert torch.equal(keys, theirs.keys[start:start + length])
                assert torch.equal(values, theirs.values[start:start + length])
    _check_pages(pool)


def test_running_out_of_pages_at_prefill_is_an_oom_error_and_changes_no_page(device):
    model = _model(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 50), device=device)
    with torch.no_grad():
        pool = PagedKVPool.for_budget(model, PagedKVPool.budget_for_pages(model, 3, max_seqs=2, page_rows=16),
                                      max_seqs=2, page_rows=16)
        assert pool.num_pages == 3
        model.use_kv_pool(pool)
        pool.keys.fill_(float("nan"))
        with pytest.raises(PagesExhausted, match="exhausted") as caught:
            _prefill(model, ids, model.make_dms_cache())
    assert isinstance(caught.value, torch.OutOfMemoryError) and failure_status(caught.value) == "OOM"
    _check_pages(pool)
    # pages are handed out layer by layer: those given to layers that fit were written, the rest not
    written = ~torch.isnan(pool.keys).all(-1).all(-1)
    assert int(written.sum()) <= pool.pages_in_use


def test_running_out_of_pages_while_decoding_raises_before_the_step(device):
    """A dense generation outgrows a small pool: the hand-out raises before the step that would need the
    pages runs, so every row already written is intact."""
    model = _model(device)
    model.set_dms_eviction(False)
    model.dms_capacity_step = 4
    ids = torch.randint(0, model.config.vocab_size, (1, 30), device=device)
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    with torch.no_grad():
        pool = PagedKVPool.for_budget(model, PagedKVPool.budget_for_pages(model, heads * 3, max_seqs=1, page_rows=16),
                                      max_seqs=1, page_rows=16)
        model.use_kv_pool(pool)
        cache = model.make_dms_cache()
        first = _prefill(model, ids, cache)
        with pytest.raises(PagesExhausted):
            _decode(model, cache, first, 30, 40)
        assert int(cache.head_lengths(0).max()) <= 48  # three pages per head, never past them
    _check_pages(pool)


def test_a_new_cache_on_the_pool_closes_the_previous_one_and_takes_its_pages(device):
    model = _model(device)
    pool = _pool(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), device=device)
    with torch.no_grad():
        old = model.make_dms_cache()
        first = _prefill(model, ids, old)
        held = pool.pages_in_use
        _prefill(model, ids, model.make_dms_cache())
        assert pool.pages_in_use == held  # the old cache's pages came back before the new one took its own
        with pytest.raises(RuntimeError, match="closed"):
            _decode(model, old, first, 30, 1)


def test_stacked_into_the_pool_from_an_iterator_equals_stacked(device):
    """Sequence-by-sequence prefill into the pool (each cache copied in, then emptied) decodes as the plain
    stacked batch."""
    model = _model(device)
    model.dms_capacity_step = 4
    prompts = torch.randint(0, model.config.vocab_size, (3, 60), device=device)
    with torch.no_grad():
        caches, firsts = [], []
        for prompt in prompts:
            cache = model.make_dms_cache()
            firsts.append(_prefill(model, prompt[None], cache))
            caches.append(cache)
        want, _ = _decode(model, DMSCache.stacked(caches), torch.cat(firsts), 60, STEPS)
        pool = _pool(model, page_rows=8)
        consumed = []

        def one_by_one():
            for prompt in prompts:
                cache = model.make_dms_cache(pooled=False)
                _prefill(model, prompt[None], cache)
                consumed.append(cache)
                yield cache

        batch = DMSCache.stacked(one_by_one(), pool=pool, consume=True)
        assert all(layer.keys is None for cache in consumed for layer in cache.layers)  # emptied once copied
        _check_pages(pool)
        got, _ = _decode(model, batch, torch.cat(firsts), 60, STEPS)
    assert torch.equal(got, want)


def test_pool_refuses_a_model_of_another_shape_backend_or_window(device):
    model = _model(device)
    other = PagedKVPool(8, 16, model.config.head_dim * 2, layers=model.config.num_hidden_layers, max_seqs=1,
                        kv_heads=model.config.num_key_value_heads, max_rows_per_head=64, dtype=torch.float32,
                        device=device, window=model.config.dms_window_size)
    with pytest.raises(ValueError, match="head_dim"):
        model.use_kv_pool(other)
    with pytest.raises(ValueError, match="window"):
        model.use_kv_pool(PagedKVPool(8, 16, model.config.head_dim, layers=model.config.num_hidden_layers,
                                      max_seqs=1, kv_heads=model.config.num_key_value_heads, max_rows_per_head=64,
                                      dtype=torch.float32, device=device, window=3))
    with pytest.raises(ValueError, match="exactly one"):
        engine_pool(model, max_seqs=1)
    model.set_dms_backend("hub")
    with pytest.raises(ValueError, match="triton step"):
        _pool(model)
    model.set_dms_backend("triton")
    pool = _pool(model, max_seqs=1)
    with torch.no_grad():
        cache = model.make_dms_cache()
        _prefill(model, torch.randint(0, 512, (1, 20), device=device), cache)
        with pytest.raises(ValueError, match="own their buffers"):
            DMSCache.stacked([cache], pool=pool)
        owned = model.make_dms_cache(pooled=False)
        _prefill(model, torch.randint(0, 512, (1, 20), device=device), owned)
        with pytest.raises(ValueError, match="sequence slots"):
            DMSCache.repeated(owned, 2, pool=pool)


@pytest.mark.gpu
def test_pool_graphs_are_captured_once_and_reused_by_later_generations_gpu(dtype):
    """Generation 1 on a pool captures; generations 2 and 3 (new prompts, same batch size) replay every
    decode step with no capture, and give the tokens of eager decoding."""
    model = _model("cuda", dtype, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   dms_window_size=24)
    model.dms_capacity_step = 64
    _pool(model, max_seqs=2, page_rows=64, budget=1 << 28)
    prompts = [torch.randint(0, model.config.vocab_size, (2, 300), device="cuda") for _ in range(3)]
    runs = []
    with torch.no_grad():
        for ids in prompts:
            cache = model.make_dms_cache()
            runs.append(_decode(model, cache, _prefill(model, ids, cache), 300, 20))
        graphs = model._pool_graphs
        captures, replays = graphs.captures, graphs.replays
        assert captures >= 1 and replays >= 18
        cache = model.make_dms_cache()
        _decode(model, cache, _prefill(model, prompts[0], cache), 300, 20)
        assert graphs.captures == captures and graphs.replays == replays + 20  # every step replayed
        model.dms_cuda_graphs = False
        for ids, (tokens, logits) in zip(prompts, runs, strict=True):
            cache = model.make_dms_cache()
            eager_tokens, eager_logits = _decode(model, cache, _prefill(model, ids, cache), 300, 20)
            assert torch.equal(tokens, eager_tokens)
            assert rel_error(logits, eager_logits) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
def test_a_later_generation_decodes_without_a_host_sync_gpu(planted):
    """From the second generation on a pool, decode steps replay captured graphs with no host sync, page
    hand-outs included (a hand-out every 4 steps: the planted-sync twin must be caught, so the check is
    live)."""
    from tests.ops.sync_check import plant_sync, sync_checked

    model = _model("cuda", torch.float16)
    model.dms_capacity_step = 4
    _pool(model, max_seqs=2, page_rows=16, budget=1 << 26)
    ids = torch.randint(0, model.config.vocab_size, (2, 80), device="cuda")
    with torch.no_grad():
        for generation in range(2):
            cache = model.make_dms_cache()
            token = _prefill(model, ids, cache)
            if generation == 1:
                _decode(model, cache, token, 80, 1)
                token = token.clone()
                with sync_checked(planted):
                    for step in range(12):
                        position = torch.full((2, 1), 81 + step, device="cuda")
                        logits = model(input_ids=token, past_key_values=cache, position_ids=position,
                                       use_cache=True).logits
                        token = logits[:, -1:].argmax(-1)
                    if planted:
                        plant_sync(logits)
            else:
                _decode(model, cache, token, 80, 13)
    assert model._pool_graphs.captures >= 1
