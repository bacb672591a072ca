"""DMSCache bookkeeping: after prefill and every decode step each head holds exactly the visible tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dms_perf.model.cache import DMSCache, DMSReferenceCache, kv_cache_bytes
from dms_perf.rule import visibility_mask
from tests.ops.sync_check import plant_sync, sync_checked


def _tagged(B, H, n, D, first, device):
    """K/V whose channel 0 is the token index: the cache's slots can be mapped back to tokens."""
    k = torch.randn(B, H, n, D, device=device)
    k[..., 0] = torch.arange(first, first + n, device=device, dtype=torch.float32)
    return k, -k


def _held_tokens(cache, layer_idx):
    layer = cache.layers[layer_idx]
    out = {}
    for b in range(layer.lengths.shape[0]):
        for h in range(layer.lengths.shape[1]):
            first, n = int(layer.starts[b, h]), int(layer.lengths[b, h])
            assert n <= int(layer.capacity[b, h])
            rows = slice(first, first + n)
            out[b, h] = sorted(int(x) for x in layer.keys[rows, 0])
            assert torch.equal(layer.values[rows], -layer.keys[rows])
    return out


def _visible_tokens(decisions, window):
    """Tokens the newest query sees, per (b, h), from the rule written once in dms_perf.rule."""
    n = decisions.shape[-1]
    last_row = visibility_mask(decisions, window, n_queries=1, n_keys=n, query_offset=n - 1)[:, :, 0]
    return {
        (b, h): torch.nonzero(last_row[b, h]).flatten().tolist()
        for b in range(decisions.shape[0])
        for h in range(decisions.shape[1])
    }


@pytest.mark.parametrize(
    "prompt,window,steps,p_mark,step",
    [(40, 8, 30, 0.7, 16), (5, 8, 20, 0.5, 4), (64, 16, 40, 0.9, 256), (12, 0, 15, 0.6, 8), (30, 3, 25, 0.0, 8)],
)
def test_cache_holds_exactly_the_visible_tokens(prompt, window, steps, p_mark, step, device):
    B, H, D = 2, 3, 16
    cache = DMSCache(num_layers=1, window=window, capacity_step=step)
    decisions = torch.rand(B, H, prompt, device=device) < p_mark
    k, v = _tagged(B, H, prompt, D, 0, device)
    cache.append(0, k, v, decisions)
    assert _held_tokens(cache, 0) == _visible_tokens(decisions, window)
    assert cache.get_seq_length() == prompt
    for t in range(prompt, prompt + steps):
        d = torch.rand(B, H, 1, device=device) < p_mark
        decisions = torch.cat([decisions, d], dim=-1)
        k, v = _tagged(B, H, 1, D, t, device)
        _, _, _, lengths, longest = cache.append(0, k, v, d)
        assert int(lengths.max()) <= longest
        expected = _visible_tokens(decisions, window)
        assert _held_tokens(cache, 0) == expected
        assert lengths.tolist() == [[len(expected[b, h]) for h in range(H)] for b in range(B)]
    assert cache.get_seq_length() == prompt + steps


def test_cache_bytes_follow_kept_tokens_not_context(device):
    """Marking most tokens keeps the buffer near window + kept tokens; marking none keeps everything."""
    B, H, D, n, window = 1, 2, 32, 600, 16
    sizes = {}
    for p_mark in (0.0, 0.9):
        cache = DMSCache(num_layers=2, window=window, capacity_step=32)
        decisions = torch.rand(B, H, n, device=device) < p_mark
        for layer in range(2):
            cache.append(layer, *_tagged(B, H, n, D, 0, device), decisions)
        sizes[p_mark] = cache.kv_bytes()
        assert cache.kept_kv_bytes() <= cache.kv_bytes()
    full = 2 * 2 * B * H * n * D * 4  # layers * (K, V) * tokens * fp32
    assert sizes[0.0] >= full
    assert sizes[0.9] < 0.25 * full


def test_decoding_memory_follows_kept_tokens(device):
    """Long decoding at 7/8 marked: allocated rows stay near the held tokens, far below a dense cache."""
    B, H, D, window, step, prompt, steps = 1, 4, 8, 16, 8, 64, 400
    cache = DMSCache(num_layers=1, window=window, capacity_step=step)
    decisions = torch.rand(B, H, prompt, device=device) < 0.875
    cache.append(0, *_tagged(B, H, prompt, D, 0, device), decisions)
    for t in range(prompt, prompt + steps):
        d = torch.rand(B, H, 1, device=device) < 0.875
        decisions = torch.cat([decisions, d], dim=-1)
        _, _, _, lengths, launch = cache.append(0, *_tagged(B, H, 1, D, t, device), d)
        longest = cache.layers[0].longest_bound
        assert int(lengths.max()) <= longest <= int(lengths.max()) + step
        assert launch >= longest and launch & (launch - 1) == 0 and launch < 2 * longest  # the power of two
    layer = cache.layers[0]
    held = int(layer.lengths.sum())
    assert _held_tokens(cache, 0) == _visible_tokens(decisions, window)
    assert layer.keys.shape[0] <= held + B * H * 2 * step
    assert layer.keys.shape[0] < 0.4 * B * H * (prompt + steps)


def test_reference_cache_keeps_everything(device):
    cache = DMSReferenceCache()
    d0 = torch.rand(1, 2, 7, device=device) < 0.5
    cache.append(0, *_tagged(1, 2, 7, 16, 0, device), d0)
    d1 = torch.rand(1, 2, 1, device=device) < 0.5
    k, v, d = cache.append(0, *_tagged(1, 2, 1, 16, 7, device), d1)
    assert k.shape == (1, 2, 8, 16) and torch.equal(d, torch.cat([d0, d1], -1))
    assert k[0, 0, :, 0].tolist() == list(range(8))
    assert kv_cache_bytes(cache) == 2 * 8 * 2 * 16 * 4


def test_kv_cache_bytes_dynamic_cache():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    assert kv_cache_bytes(cache) == 2 * 2 * 5 * 8 * 4
    assert kv_cache_bytes(None) == 0


def test_cache_rejects_bad_use(device):
    cache = DMSCache(num_layers=1, window=4)
    k, v = _tagged(1, 2, 6, 16, 0, device)
    d = torch.zeros(1, 2, 6, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="bool decisions"):
        cache.append(0, k, v, d.int())
    cache.append(0, k, v, d)
    with pytest.raises(ValueError, match="one prefill"):
        cache.append(0, k, v, d)
    with pytest.raises(NotImplementedError, match="decisions"):
        cache.update(k, v, 0)
    with pytest.raises(ValueError, match="window"):
        DMSCache(num_layers=1, window=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
def test_decode_update_and_attention_do_not_synchronize(planted):
    """The per-step path (cache update + Triton decode attention) does not wait for the device between
    re-sizes (one sync per capacity_step steps, checked apart). planted-sync: the same region with a
    sync planted after the steps must be caught (the check is live)."""
    from dms_perf.ops.decode.kernel import dms_decode_attention

    cache = DMSCache(num_layers=1, window=8, capacity_step=16)
    decisions = torch.rand(1, 2, 50, device="cuda") < 0.5
    cache.append(0, *_tagged(1, 2, 50, 32, 0, "cuda"), decisions)
    steps = [(_tagged(1, 2, 1, 32, t, "cuda"), torch.rand(1, 2, 1, device="cuda") < 0.5) for t in range(50, 66)]
    q = torch.randn(1, 4, 32, device="cuda")
    dms_decode_attention(q, *cache.append(0, *steps[0][0], steps[0][1]))  # compiles the kernels
    with sync_checked(planted):
        for (k, v), d in steps[1:]:  # 15 steps: within the 16 spare rows, no re-size
            out = dms_decode_attention(q, *cache.append(0, k, v, d))
        if planted:
            plant_sync(out)


@pytest.mark.parametrize("pack_later", [False, True], ids=["bounded", "pack-later"])
def test_deferred_prefill_packing_matches_immediate(device, pack_later):
    """The model's prefill defers each layer's packing (at most MAX_PENDING_LAYERS wait; every layer with
    ``pack_later``, nothing packed until the cache's next use); the packed cache must equal the one packed at
    once, layer by layer."""
    from dms_perf.model.cache import MAX_PENDING_LAYERS

    layers, B, H, n, D = MAX_PENDING_LAYERS + 3, 2, 2, 40, 16
    deferred, immediate = DMSCache(num_layers=layers, window=4), DMSCache(num_layers=layers, window=4)
    deferred.pack_later = pack_later
    for layer in range(layers):
        k, v = _tagged(B, H, n, D, 0, device)
        decisions = torch.rand(B, H, n, device=device) < 0.7
        assert deferred.append(layer, k, v, decisions, defer_packing=True) is None
        immediate.append(layer, k, v, decisions)
        pending = layer + 1 if pack_later else min(layer + 1, MAX_PENDING_LAYERS)
        assert sum(lay.pending for lay in deferred.layers) == pending
    assert deferred.layers[0].pending is pack_later and deferred.layers[-1].pending is True
    deferred.finish_prefill()
    assert not any(lay.pending for lay in deferred.layers)
    for layer in range(layers):
        assert _held_tokens(deferred, layer) == _held_tokens(immediate, layer)
    assert deferred.kv_bytes() == immediate.kv_bytes()


@pytest.mark.parametrize(("window", "step", "p_mark"), [(0, 4, 0.5), (3, 8, 0.7), (8, 16, 0.0), (5, 4, 1.0)])
def test_one_launch_decode_step_matches_the_torch_step(window, step, p_mark, device):
    """``append_step`` (decisions, ring update, K/V write and the query's borrowed channel in one Triton
    launch) leaves exactly the state of ``append`` with the same decisions, re-sizes included."""
    from dms_perf.rule import decisions_from_alphas

    B, H, G, D, prompt, steps, scale, offset = 2, 2, 2, 16, 12, 20, 100.0, 5.0
    torch_cache = DMSCache(num_layers=1, window=window, capacity_step=step)
    fused_cache = DMSCache(num_layers=1, window=window, capacity_step=step)
    decisions = torch.rand(B, H, prompt, device=device) < p_mark
    for cache in (torch_cache, fused_cache):
        cache.append(0, *_tagged(B, H, prompt, D, 0, device), decisions)
    for t in range(prompt, prompt + steps):
        # a around the threshold offset / scale = 0.05: both sides occur
        alphas = 0.05 + (torch.rand(B, H, 1, device=device) - (1.0 - p_mark)) * 0.1
        k, v = _tagged(B, H, 1, D, t, device)
        q = torch.randn(B, H * G, 1, D, device=device)
        expected_q = q.clone()
        expected_q[:, ::G, :, -1] = 0
        torch_out = torch_cache.append(0, k, v, decisions_from_alphas(alphas, scale, offset))
        fused_out = fused_cache.append_step(0, q, k, v, alphas, scale, offset)
        assert torch.equal(q, expected_q)
        assert torch.equal(fused_out[3], torch_out[3]) and fused_out[4] == torch_out[4]
        assert _held_tokens(fused_cache, 0) == _held_tokens(torch_cache, 0)
        for name in ("ring_slot", "ring_flag", "starts", "capacity", "step_index"):
            assert torch.equal(getattr(fused_cache.layers[0], name), getattr(torch_cache.layers[0], name)), name
        assert fused_cache.layers[0].step_index.tolist() == [t + 1] * (B * H)


def test_frozen_host_state_leaves_the_step_to_the_device(device):
    """What a CUDA-graph capture relies on (dms_perf.model.graph): with ``host_frozen`` the one-launch step
    changes only device state (the token index lives on the device), and ``advance_host`` then does the
    host's share; the result equals a plain step."""
    plain, frozen = DMSCache(num_layers=1, window=3, capacity_step=4), DMSCache(num_layers=1, window=3, capacity_step=4)
    decisions = torch.rand(1, 2, 10, device=device) < 0.5
    for cache in (plain, frozen):
        cache.append(0, *_tagged(1, 2, 10, 16, 0, device), decisions)
    bound = frozen.layers[0].longest_bound
    for t in range(10, 13):  # within the 4 spare rows
        alphas = torch.rand(1, 2, 1, device=device) * 0.1
        k, v = _tagged(1, 2, 1, 16, t, device)
        plain.append_step(0, torch.randn(1, 4, 1, 16, device=device), k, v, alphas, 100.0, 5.0)
        layer = frozen.layers[0]
        layer.host_frozen = True
        frozen.append_step(0, torch.randn(1, 4, 1, 16, device=device), k, v, alphas, 100.0, 5.0)
        layer.host_frozen = False
        assert (layer.seen, layer.spare_steps) == (t, 4 - (t - 10))  # the host did not move
        layer.advance_host()
        assert layer.longest_bound == bound  # fixed until the next re-size
    assert _held_tokens(frozen, 0) == _held_tokens(plain, 0)
    assert torch.equal(frozen.layers[0].step_index, plain.layers[0].step_index)
    assert frozen.get_seq_length() == plain.get_seq_length() == 13


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
def test_one_launch_decode_step_does_not_synchronize(planted):
    """planted-sync: the same region with a sync planted after the steps must be caught (the check is live)."""
    cache = DMSCache(num_layers=1, window=8, capacity_step=16)
    cache.append(0, *_tagged(1, 2, 50, 32, 0, "cuda"), torch.rand(1, 2, 50, device="cuda") < 0.5)
    q = torch.randn(1, 4, 1, 32, device="cuda")
    alphas = torch.randn(1, 2, 1, device="cuda")
    cache.append_step(0, q, *_tagged(1, 2, 1, 32, 50, "cuda"), alphas, 100.0, 5.0).attend(q[:, :, 0])
    with sync_checked(planted):  # kernels compiled
        for t in range(51, 66):  # 15 steps: within the 16 spare rows, no re-size
            cached = cache.append_step(0, q, *_tagged(1, 2, 1, 32, t, "cuda"), alphas, 100.0, 5.0)
            out = cached.attend(q[:, :, 0])
        if planted:
            plant_sync(out)


def test_one_launch_decode_step_rejects_bad_input(device):
    cache = DMSCache(num_layers=1, window=4)
    cache.append(0, *_tagged(1, 2, 10, 16, 0, device), torch.rand(1, 2, 10, device=device) < 0.5)
    k, v = _tagged(1, 2, 1, 16, 10, device)
    q, alphas = torch.randn(1, 4, 1, 16, device=device), torch.zeros(1, 2, 1, device=device)
    with pytest.raises(ValueError, match="one token per"):
        cache.append_step(0, q, *_tagged(1, 2, 2, 16, 10, device), alphas, 100.0, 5.0)
    with pytest.raises(TypeError, match="alphas must be fp32"):
        cache.append_step(0, q, k, v, alphas.half(), 100.0, 5.0)
    with pytest.raises(ValueError, match="stride 1 along head_dim"):
        cache.append_step(0, torch.randn(1, 4, 1, 32, device=device)[..., ::2], k, v, alphas, 100.0, 5.0)
