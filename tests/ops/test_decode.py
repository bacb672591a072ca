"""Triton decode attention over the compacted DMS cache vs its torch reference and a per-head loop."""

from __future__ import annotations

import pytest
import torch

from dms_perf.ops.decode.kernel import dms_decode_attention
from dms_perf.ops.decode.naive import dms_decode_attention_reference
from dms_perf.testing import poison, rel_error

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _per_head_loop(q, k_cache, v_cache, starts, lengths, scale):
    """Slice each head's occupied rows and run fp64 softmax attention: the most literal reading."""
    B, Hq, D = q.shape
    G = Hq // starts.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            first, n = int(starts[b, hq // G]), int(lengths[b, hq // G])
            k = k_cache[first:first + n].double().cpu()
            v = v_cache[first:first + n].double().cpu()
            p = torch.softmax(k @ q[b, hq].double().cpu() * scale, dim=0)
            out[b, hq] = p @ v
    return out


def _inputs(B, Hq, Hkv, C, D, dtype, device):
    """Segments of random capacity (length + spare rows) in a shuffled order; only occupied rows hold data."""
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    lengths = torch.randint(1, C + 1, (B, Hkv), dtype=torch.int32, device=device)
    lengths[0, 0] = C  # a head at the length bound
    lengths[-1, -1] = 1  # a head with one token
    capacity = lengths.long() + torch.randint(0, 4, (B, Hkv), device=device)
    order = torch.randperm(B * Hkv, device=device)
    ends = capacity.flatten()[order].cumsum(0)
    starts = torch.empty(B * Hkv, dtype=torch.int64, device=device)
    starts[order] = ends - capacity.flatten()[order]
    starts = starts.view(B, Hkv)
    rows = int(ends[-1]) + 5
    # NaN in a free row would leak into the output if it were read.
    k = poison(torch.empty(rows, D, dtype=dtype, device=device))
    v = poison(torch.empty(rows, D, dtype=dtype, device=device))
    for b in range(B):
        for h in range(Hkv):
            first, n = int(starts[b, h]), int(lengths[b, h])
            k[first:first + n] = torch.randn(n, D, dtype=dtype, device=device)
            v[first:first + n] = torch.randn(n, D, dtype=dtype, device=device)
    return q, k, v, starts, lengths


@pytest.mark.parametrize(
    "B,Hq,Hkv,C,D,num_splits",
    [(1, 4, 2, 40, 32, 1), (2, 8, 2, 200, 64, 3), (1, 4, 1, 130, 32, 8), (2, 2, 2, 17, 16, None)],
)
def test_decode_matches_reference(B, Hq, Hkv, C, D, num_splits, dtype, device):
    q, k, v, starts, lengths = _inputs(B, Hq, Hkv, C, D, dtype, device)
    out = dms_decode_attention(q, k, v, starts, lengths, C, num_splits=num_splits, block_n=16)
    ref = dms_decode_attention_reference(q, k, v, starts, lengths, C)
    loop = _per_head_loop(q, k, v, starts, lengths, D**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_error(out.cpu(), loop) < TOL[dtype]
    assert rel_error(ref.cpu(), loop) < max(TOL[dtype], 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("C,num_splits", [(5120, None), (33000, None), (4096, 1)])
def test_decode_long_cache_gpu(C, num_splits, dtype):
    q, k, v, starts, lengths = _inputs(1, 32, 8, C, 128, dtype, "cuda")
    out = dms_decode_attention(q, k, v, starts, lengths, C, num_splits=num_splits)
    ref = dms_decode_attention_reference(q, k, v, starts, lengths, C)
    assert rel_error(out, ref) < TOL[dtype]


def test_decode_max_length_above_lengths(device):
    """A loose bound (the cache's capacity) only adds empty splits."""
    q, k, v, starts, lengths = _inputs(1, 4, 2, 48, 32, torch.float32, device)
    out = dms_decode_attention(q, k, v, starts, lengths, 300, num_splits=5, block_n=16)
    assert rel_error(out.cpu(), _per_head_loop(q, k, v, starts, lengths, 32**-0.5)) < 1e-5


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "dtype"),
        (lambda a: a.update(lengths=a["lengths"].long()), TypeError, "int32"),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple"),
        (lambda a: a.update(lengths=a["lengths"][:, :1]), ValueError, "lengths"),
        (lambda a: a.update(starts=a["starts"].int()), TypeError, "int64"),
        (lambda a: a.update(max_length=0), ValueError, "max_length"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "share a dtype"),
        (lambda a: a.update(q=a["q"][..., :24], k_cache=a["k_cache"][..., :24], v_cache=a["v_cache"][..., :24]),
         ValueError, "power of two"),
    ],
)
def test_decode_rejects_bad_input(change, error, match):
    args = dict(
        q=torch.randn(1, 4, 32), k_cache=torch.randn(16, 32), v_cache=torch.randn(16, 32),
        starts=torch.tensor([[0, 8]]), lengths=torch.full((1, 2), 8, dtype=torch.int32), max_length=8,
    )
    change(args)
    with pytest.raises(error, match=match):
        dms_decode_attention(**args)
