"""The fused decode step (q/k norms, DMS decision, RoPE and cache update in one launch) against its fp64
reference composed with the torch cache update, over several steps (slot reuse and re-sizes included);
on a paged cache, against the same step on a contiguous one."""

from __future__ import annotations

import pytest
import torch

from dms_perf.model.cache import DMSCache
from dms_perf.ops.cache_update.fused_step import fused_decode_step
from dms_perf.ops.cache_update.naive import fused_step_reference
from tests.ops.paged_layout import assert_same_pages, copy_state, expected_stores, paged_heads, ring_state

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rope_tables(batch, positions, head_dim, device, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = positions.double()[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype).reshape(batch, 1, head_dim), angles.sin().to(dtype).reshape(batch, 1, head_dim)


def _qkv(B, Hq, Hkv, D, device, dtype):
    """Random projections whose borrowed channel (D - 1 of each group's first query head) is at least 0.5
    from zero, so that with threshold 0 (scale 1, offset 0) every decision is clear in any dtype."""
    x = torch.randn(B, Hq + 2 * Hkv, D, device=device)
    G = Hq // Hkv
    channel = x[:, : Hq : G, -1]
    x[:, : Hq : G, -1] = torch.sign(channel) * (0.5 + channel.abs())
    return x.reshape(B, 1, -1).to(dtype)


@pytest.mark.parametrize(("Hq", "Hkv", "D", "window", "step"), [(4, 2, 32, 3, 4), (8, 2, 64, 0, 8), (6, 3, 16, 5, 64)])
@pytest.mark.parametrize("zero_borrowed", [True, False])
def test_fused_step_matches_reference_and_torch_update(Hq, Hkv, D, window, step, zero_borrowed, dtype, device):
    B, prompt, steps, eps = 2, 10, 12, 1e-6
    fused, reference = (DMSCache(num_layers=1, window=window, capacity_step=step) for _ in range(2))
    k0 = torch.randn(B, Hkv, prompt, D, device=device, dtype=dtype)
    decisions0 = torch.rand(B, Hkv, prompt, device=device) < 0.5
    for cache in (fused, reference):
        cache.append(0, k0, -k0, decisions0)
    q_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    k_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    for t in range(prompt, prompt + steps):
        qkv = _qkv(B, Hq, Hkv, D, device, dtype)
        cos, sin = _rope_tables(B, torch.full((B,), t, device=device), D, device, dtype)
        q, cached = fused.append_fused_step(0, qkv, q_w, k_w, eps, cos, sin, 1.0, 0.0, zero_borrowed)
        want_q, want_k, want_v, want_d = fused_step_reference(
            qkv, q_w, k_w, eps, cos, sin, num_kv_heads=Hkv, head_dim=D, alpha_scale=1.0, alpha_offset=0.0,
            zero_borrowed=zero_borrowed,
        )
        torch.testing.assert_close(q.double(), want_q, rtol=TOL[dtype], atol=TOL[dtype])
        if zero_borrowed:
            assert (q[:, :: Hq // Hkv, -1] == 0).all()
        reference.append(0, want_k.to(dtype), want_v.to(dtype), want_d)
        got, want = fused.layers[0], reference.layers[0]
        for name in ("ring_slot", "ring_flag", "lengths", "starts", "capacity", "step_index"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert cached[3] is got.lengths and cached[4] == got.launch_length
        for name in ("keys", "values"):  # spare rows are poisoned (NaN) in both
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=TOL[dtype], atol=TOL[dtype],
                                       equal_nan=True)


@pytest.mark.parametrize("page_rows", [16, 64])
def test_paged_fused_step_matches_the_contiguous_step(page_rows, dtype, device):
    """Six steps on pages (shuffled, a strided table, NO_PAGE past each head's pages) and on contiguous
    segments from one state: the same query, ring, lengths and step, and each K/V row the contiguous step
    wrote stored where the head's table puts that slot, nothing else. Heads: a dead one (no pages), one
    page exactly with none reserved (its appends are not stored), a page + 1 and several pages."""
    P, Hq, Hkv, D, window, seen, steps, eps = page_rows, 4, 2, 32, 3, 40, 6, 1e-6
    lengths, reserve = [[0, P + 1], [P, 3 * P + 2]], [[0, steps], [0, steps]]
    B, w1 = len(lengths), window + 1
    k_pages, v_pages, table = paged_heads(lengths, reserve, P, D, dtype, device)
    paged = ring_state(lengths, window, seen, device)
    paged["ring_flag"][1, 0] = False  # the one-page head appends first: a row its pages do not hold
    contiguous = copy_state(paged)
    cap = 3 * P + 2 + steps + w1
    starts = (torch.arange(B * Hkv, device=device) * cap).view(B, Hkv)
    k_cache, v_cache = (torch.zeros(B * Hkv * cap, D, device=device, dtype=dtype) for _ in "kv")
    q_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    k_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    for t in range(seen, seen + steps):
        qkv = _qkv(B, Hq, Hkv, D, device, dtype)
        cos, sin = _rope_tables(B, torch.full((B,), t, device=device), D, device, dtype)
        want_q = fused_decode_step(qkv, q_w, k_w, eps, cos, sin, contiguous["ring_slot"], contiguous["ring_flag"],
                                   contiguous["lengths"], starts, k_cache, v_cache, contiguous["step"], 1.0, 0.0)
        rows = starts + contiguous["ring_slot"][:, :, t % w1]  # where the contiguous step wrote token t
        slots = contiguous["ring_slot"][:, :, t % w1].tolist()
        want_k = expected_stores(k_pages, table, slots, k_cache[rows], P)
        want_v = expected_stores(v_pages, table, slots, v_cache[rows], P)
        q = fused_decode_step(qkv, q_w, k_w, eps, cos, sin, paged["ring_slot"], paged["ring_flag"], paged["lengths"],
                              None, k_pages, v_pages, paged["step"], 1.0, 0.0, block_table=table, page_rows=P)
        assert torch.equal(q, want_q)
        for name, value in paged.items():
            assert torch.equal(value, contiguous[name]), (t, name)
        assert_same_pages(k_pages, want_k)
        assert_same_pages(v_pages, want_v)
    assert paged["lengths"][1, 0] > P and paged["lengths"][0, 0] > 0


def test_fused_step_rejects_bad_shapes(device):
    cache = DMSCache(num_layers=1, window=4)
    k = torch.randn(1, 2, 10, 16, device=device)
    cache.append(0, k, k, torch.zeros(1, 2, 10, dtype=torch.bool, device=device))
    layer = cache.layers[0]
    w = torch.ones(16, device=device)
    cos = sin = torch.ones(1, 1, 16, device=device)
    state = (layer.ring_slot, layer.ring_flag, layer.lengths, layer.starts, layer.keys, layer.values, layer.step_index)
    with pytest.raises(ValueError, match="qkv"):
        fused_decode_step(torch.randn(1, 1, 16 * 5, device=device), w, w, 1e-6, cos, sin, *state, 1.0, 0.0)
    with pytest.raises(ValueError, match="cos and sin must be"):
        fused_decode_step(torch.randn(1, 1, 16 * 8, device=device), w, w, 1e-6, cos[..., :8], sin, *state, 1.0, 0.0)
    with pytest.raises(ValueError, match="norm weights"):
        fused_decode_step(torch.randn(1, 1, 16 * 8, device=device), w[:8], w, 1e-6, cos, sin, *state, 1.0, 0.0)
    qkv = torch.randn(1, 1, 16 * 8, device=device)
    table = torch.zeros(1, 2, 4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="got both"):
        fused_decode_step(qkv, w, w, 1e-6, cos, sin, *state, 1.0, 0.0, block_table=table, page_rows=16)
    unpaged = (*state[:3], None, *state[4:])
    with pytest.raises(ValueError, match="got neither"):
        fused_decode_step(qkv, w, w, 1e-6, cos, sin, *unpaged, 1.0, 0.0)
    with pytest.raises(ValueError, match="page_rows must be a power of two"):
        fused_decode_step(qkv, w, w, 1e-6, cos, sin, *unpaged, 1.0, 0.0, block_table=table, page_rows=24)
    with pytest.raises(TypeError, match="block_table must be an int32"):
        fused_decode_step(qkv, w, w, 1e-6, cos, sin, *unpaged, 1.0, 0.0, block_table=table.long(), page_rows=16)
