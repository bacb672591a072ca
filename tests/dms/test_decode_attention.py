"""Triton decode attention over the compacted DMS cache vs its torch reference and a per-head loop."""

from __future__ import annotations

import pytest
import torch

from dms_perf.kernels.decode_attention import dms_decode_attention, dms_decode_attention_reference
from dms_perf.testing import poison, rel_error

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _per_head_loop(q, k_cache, v_cache, lengths, scale):
    """Slice each head's occupied slots and run fp64 softmax attention: the most literal reading."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            n = int(lengths[b, hq // G])
            k = k_cache[b, hq // G, :n].double().cpu()
            v = v_cache[b, hq // G, :n].double().cpu()
            p = torch.softmax(k @ q[b, hq].double().cpu() * scale, dim=0)
            out[b, hq] = p @ v
    return out


def _inputs(B, Hq, Hkv, C, D, dtype, device):
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    k = poison(torch.empty(B, Hkv, C, D, dtype=dtype, device=device))
    v = poison(torch.empty(B, Hkv, C, D, dtype=dtype, device=device))
    lengths = torch.randint(1, C + 1, (B, Hkv), dtype=torch.int32, device=device)
    lengths[0, 0] = C  # a full head
    lengths[-1, -1] = 1  # a head with one token
    occupied = torch.arange(C, device=device)[None, None, :] < lengths[:, :, None]
    # Only occupied slots hold data: NaN in a free slot would leak into the output if it were read.
    k[occupied] = torch.randn(int(occupied.sum()), D, dtype=dtype, device=device)
    v[occupied] = torch.randn(int(occupied.sum()), D, dtype=dtype, device=device)
    return q, k, v, lengths


@pytest.mark.parametrize(
    "B,Hq,Hkv,C,D,num_splits",
    [(1, 4, 2, 40, 32, 1), (2, 8, 2, 200, 64, 3), (1, 4, 1, 130, 32, 8), (2, 2, 2, 17, 16, None)],
)
def test_decode_matches_reference(B, Hq, Hkv, C, D, num_splits, dtype, device):
    q, k, v, lengths = _inputs(B, Hq, Hkv, C, D, dtype, device)
    scale = D**-0.5
    out = dms_decode_attention(q, k, v, lengths, num_splits=num_splits, block_n=16)
    ref = dms_decode_attention_reference(q, k, v, lengths)
    loop = _per_head_loop(q, k, v, lengths, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_error(out.cpu(), loop) < TOL[dtype]
    assert rel_error(ref.cpu(), loop) < max(TOL[dtype], 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("C,num_splits", [(5120, None), (33000, None), (4096, 1)])
def test_decode_long_cache_gpu(C, num_splits, dtype):
    q, k, v, lengths = _inputs(1, 32, 8, C, 128, dtype, "cuda")
    out = dms_decode_attention(q, k, v, lengths, num_splits=num_splits)
    ref = dms_decode_attention_reference(q, k, v, lengths)
    assert rel_error(out, ref) < TOL[dtype]


def test_decode_strided_cache_view(device):
    """The model passes views of a larger buffer (capacity beyond the occupied slots)."""
    q, k, v, lengths = _inputs(1, 4, 2, 48, 32, torch.float32, device)
    big_k = torch.zeros(1, 2, 96, 32, device=device)
    big_v = torch.zeros(1, 2, 96, 32, device=device)
    big_k[:, :, :48] = k.nan_to_num()
    big_v[:, :, :48] = v.nan_to_num()
    out = dms_decode_attention(q, big_k[:, :, :48], big_v[:, :, :48], lengths, num_splits=2, block_n=16)
    assert rel_error(out.cpu(), _per_head_loop(q, k, v, lengths, 32**-0.5)) < 1e-5


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "dtype"),
        (lambda a: a.update(lengths=a["lengths"].long()), TypeError, "int32"),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple"),
        (lambda a: a.update(lengths=a["lengths"][:, :1]), ValueError, "lengths"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "share a dtype"),
        (lambda a: a.update(q=a["q"][..., :24], k_cache=a["k_cache"][..., :24], v_cache=a["v_cache"][..., :24]),
         ValueError, "power of two"),
    ],
)
def test_decode_rejects_bad_input(change, error, match):
    args = dict(
        q=torch.randn(1, 4, 32), k_cache=torch.randn(1, 2, 8, 32), v_cache=torch.randn(1, 2, 8, 32),
        lengths=torch.full((1, 2), 8, dtype=torch.int32),
    )
    change(args)
    with pytest.raises(error, match=match):
        dms_decode_attention(**args)
