"""The decode engine's KV pool (dms_perf.model.pool): caches on a pool decode exactly as caches that own
their buffers, rows are never shared, running out is a clear out-of-memory error, and on the GPU the
graphs of one batch size are captured once and replayed by later generations."""

from __future__ import annotations

import pytest
import torch

from dms_perf.bench.generation import failure_status
from dms_perf.model.cache import DMSCache
from dms_perf.model.pool import KVPool, PoolExhausted
from dms_perf.model.qwen3_dms import build_model, tiny_config
from dms_perf.testing import rel_error

STEPS = 10


def _model(device, dtype=torch.float32, **overrides):
    config = tiny_config(dms_initial_alpha_offset=-40.0, **overrides)  # marks most tokens: heads differ
    return build_model(config, backend="triton", dtype=dtype, device=device)


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


def _owned_rows(model, ids):
    """Prefill ``ids`` into a cache that owns its buffers; returns (that cache, the rows a pool needs)."""
    owned = model.make_dms_cache(pooled=False)
    _prefill(model, ids, owned)
    return owned, sum(layer.keys.shape[0] for layer in owned.layers)


def _segments(cache, layer_idx):
    layer = cache.layers[layer_idx]
    return [(int(s), int(c), int(n)) for s, c, n in
            zip(layer.starts.flatten(), layer.capacity.flatten(), layer.lengths.flatten(), strict=True)]


def _owners(cache, rows):
    """Which (layer, head) owns each pool row; fails if two segments overlap."""
    owner = [None] * rows
    for layer_idx in range(len(cache.layers)):
        for head, (start, capacity, length) in enumerate(_segments(cache, layer_idx)):
            assert length <= capacity
            for row in range(start, start + capacity):
                assert owner[row] is None, f"row {row} handed to {owner[row]} and {(layer_idx, head)}"
                owner[row] = (layer_idx, head)
    return owner


@pytest.mark.parametrize("backend", ["triton", "hub"])
@pytest.mark.parametrize("capacity_step", [3, 64], ids=["re-sizes", "no-re-size"])
def test_pooled_generation_equals_owned_buffers(capacity_step, backend, device):
    """Same tokens and logits, same per-head lengths, with or without re-sizes inside the pool, for the
    Triton decode step and the torch one (hub)."""
    model = _model(device)
    model.set_dms_backend(backend)
    model.dms_capacity_step = capacity_step
    ids = torch.randint(0, model.config.vocab_size, (2, 70), device=device)
    with torch.no_grad():
        owned = model.make_dms_cache()
        want_tokens, want_logits = _decode(model, owned, _prefill(model, ids, owned), 70, STEPS)
        model.use_kv_pool(KVPool.for_model(model, rows=20_000))
        pooled = model.make_dms_cache()
        assert pooled.pool is model.dms_pool
        got_tokens, got_logits = _decode(model, pooled, _prefill(model, ids, pooled), 70, STEPS)
    assert torch.equal(got_tokens, want_tokens)
    assert rel_error(got_logits, want_logits) < 1e-5
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(pooled.head_lengths(layer), owned.head_lengths(layer))
        assert pooled.layers[layer].keys is model.dms_pool.keys  # the pool's buffer, not a copy


def test_pool_filled_to_its_last_row_gives_each_row_one_owner_and_each_head_its_rows(device):
    """A pool exactly as large as a batch needs: every row belongs to exactly one (layer, head) segment,
    and each head's occupied rows hold that head's keys (compared with the cache that owns its buffers)."""
    model = _model(device)
    ids = torch.randint(0, model.config.vocab_size, (3, 50), device=device)
    with torch.no_grad():
        owned, needed = _owned_rows(model, ids)
        model.use_kv_pool(KVPool.for_model(model, rows=needed))
        pooled = model.make_dms_cache()
        _prefill(model, ids, pooled)
    assert model.dms_pool.used == needed
    owners = _owners(pooled, needed)
    assert None not in owners  # filled to the last row
    for layer_idx, (mine, theirs) in enumerate(zip(pooled.layers, owned.layers, strict=True)):
        for (start, _, length), (their_start, _, their_length) in zip(
            _segments(pooled, layer_idx), _segments(owned, layer_idx), strict=True
        ):
            assert length == their_length
            assert torch.equal(mine.keys[start:start + length], theirs.keys[their_start:their_start + length])
            assert torch.equal(mine.values[start:start + length], theirs.values[their_start:their_start + length])


def test_running_out_of_pool_is_an_oom_error_and_writes_nothing(device):
    model = _model(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 50), device=device)
    with torch.no_grad():
        owned, needed = _owned_rows(model, ids)
        pool = KVPool.for_model(model, rows=needed - 1)
        pool.keys.fill_(float("nan"))
        model.use_kv_pool(pool)
        with pytest.raises(PoolExhausted, match="KV pool exhausted") as caught:
            _prefill(model, ids, model.make_dms_cache())
    assert isinstance(caught.value, torch.OutOfMemoryError) and failure_status(caught.value) == "OOM"
    # The layers that fit were written; the layer that did not fit wrote nothing past the pool's end.
    last = owned.layers[-1].keys.shape[0]
    assert pool.used <= needed - last and torch.isnan(pool.keys[pool.used:]).all()


def test_running_out_of_pool_while_decoding_is_an_oom_error(device):
    model = _model(device)
    model.dms_capacity_step = 2  # a re-size every two steps takes fresh rows
    ids = torch.randint(0, model.config.vocab_size, (1, 40), device=device)
    with torch.no_grad():
        owned = model.make_dms_cache()
        first = _prefill(model, ids, owned)
        model.use_kv_pool(KVPool.for_model(model, rows=sum(layer.keys.shape[0] for layer in owned.layers) + 8))
        pooled = model.make_dms_cache()
        _prefill(model, ids, pooled)
        with pytest.raises(PoolExhausted):
            _decode(model, pooled, first, 40, 8)


def test_a_new_cache_on_the_pool_closes_the_previous_one(device):
    model = _model(device)
    model.use_kv_pool(KVPool.for_model(model, rows=10_000))
    ids = torch.randint(0, model.config.vocab_size, (1, 30), device=device)
    with torch.no_grad():
        old = model.make_dms_cache()
        first = _prefill(model, ids, old)
        _prefill(model, ids, model.make_dms_cache())
        with pytest.raises(RuntimeError, match="closed"):
            _decode(model, old, first, 30, 1)


def test_stacked_into_a_pool_from_an_iterator_equals_stacked(device):
    """Sequence-by-sequence prefill into the pool (each cache copied in, then emptied) decodes as the
    plain stacked batch; the pool holds exactly the sequences' rows."""
    model = _model(device)
    model.dms_capacity_step = 4
    prompts = torch.randint(0, model.config.vocab_size, (3, 60), device=device)
    with torch.no_grad():
        caches, firsts = [], []
        for prompt in prompts:
            cache = model.make_dms_cache()
            firsts.append(_prefill(model, prompt[None], cache))
            caches.append(cache)
        rows = sum(layer.keys.shape[0] for cache in caches for layer in cache.layers)
        want, _ = _decode(model, DMSCache.stacked(caches), torch.cat(firsts), 60, STEPS)
        pool = KVPool.for_model(model, rows=rows + 10_000)
        consumed = []

        def one_by_one():
            for prompt in prompts:
                cache = model.make_dms_cache(pooled=False)
                _prefill(model, prompt[None], cache)
                consumed.append(cache)
                yield cache

        batch = DMSCache.stacked(one_by_one(), pool=pool, consume=True)
        assert pool.used == rows
        assert all(layer.keys is None for cache in consumed for layer in cache.layers)  # emptied once copied
        _owners(batch, pool.rows)
        got, _ = _decode(model, batch, torch.cat(firsts), 60, STEPS)
    assert torch.equal(got, want)


def test_pool_refuses_a_model_of_another_shape_and_caches_already_on_it(device):
    model = _model(device)
    with pytest.raises(ValueError, match="head_dim"):
        model.use_kv_pool(KVPool(100, model.config.head_dim * 2, dtype=torch.float32, device=device))
    with pytest.raises(ValueError, match="exactly one"):
        KVPool.for_model(model)
    pool = KVPool.for_model(model, budget_bytes=1 << 20)
    assert pool.rows == (1 << 20) // (2 * model.config.head_dim * 4)
    with pytest.raises(ValueError, match="rows >= 1"):
        KVPool(0, 32, dtype=torch.float32, device=device)
    model.use_kv_pool(pool)
    with torch.no_grad():
        cache = model.make_dms_cache()
        _prefill(model, torch.randint(0, 512, (1, 20), device=device), cache)
        with pytest.raises(ValueError, match="already be on it"):
            DMSCache.stacked([cache], pool=pool)


@pytest.mark.gpu
def test_pool_graphs_are_captured_once_and_reused_by_later_generations_gpu(dtype):
    """Generation 1 on a pool captures; generations 2 and 3 (new prompts, same batch size) replay every
    decode step with no capture, and give the tokens of eager decoding."""
    model = _model("cuda", dtype, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   dms_window_size=24)
    model.dms_capacity_step = 64
    model.use_kv_pool(KVPool.for_model(model, rows=200_000))
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
    """From the second generation on a pool, decode steps replay captured graphs with no host sync (the
    planted-sync twin must be caught, so the check is live)."""
    from tests.ops.sync_check import plant_sync, sync_checked

    model = _model("cuda", torch.float16)
    model.dms_capacity_step = 32
    model.use_kv_pool(KVPool.for_model(model, rows=100_000))
    ids = torch.randint(0, model.config.vocab_size, (2, 80), device="cuda")
    with torch.no_grad():
        for generation in range(2):
            cache = model.make_dms_cache()
            token = _prefill(model, ids, cache)
            if generation == 1:
                with sync_checked(planted):
                    for step in range(12):
                        position = torch.full((2, 1), 80 + step, device="cuda")
                        logits = model(input_ids=token, past_key_values=cache, position_ids=position,
                                       use_cache=True).logits
                        token = logits[:, -1:].argmax(-1)
                    if planted:
                        plant_sync(logits)
            else:
                _decode(model, cache, token, 80, 12)
    assert model._pool_graphs.captures == 1
