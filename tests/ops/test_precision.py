"""One fp32 precision policy for both attention kernels: ``dms_perf.ops._common.attention_dot_precision``.

The interpreter computes every dot in numpy whatever ``input_precision`` says, so the CPU tests check
that the policy reaches the kernels: what each launch passes, and that every ``tl.dot`` of the two
kernel modules takes it. On a GPU, the fp32 cases of test_prefill.py / test_decode.py then measure it.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from dms_perf import dms_prefill_attention
from dms_perf.ops import _common
from dms_perf.ops.decode import kernel as decode_kernel
from dms_perf.ops.decode.kernel import dms_decode_attention
from dms_perf.ops.prefill import fused
from tests.ops.launch_spy import spy_launches


def test_fp32_policy_is_full_fp32():
    assert _common.FP32_DOT_PRECISION == "ieee"
    assert _common.attention_dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("module", [fused, decode_kernel], ids=["prefill", "decode"])
def test_every_attention_dot_takes_the_policy(module):
    """Each ``tl.dot(...)`` of the kernel module passes ``input_precision=DOT_PRECISION`` (no literal)."""
    source = inspect.getsource(module)
    dots = [m.start() for m in re.finditer(r"tl\.dot\(", source)]
    assert len(dots) >= 2
    for start in dots:
        call = source[start : source.index("\n", source.index(")", start))]
        assert "input_precision=DOT_PRECISION" in call, call
    assert len(re.findall(r"input_precision=", source)) == len(dots)


def test_both_kernels_get_the_policy(monkeypatch, dtype, device):
    """The prefill and the decode launch pass the same ``DOT_PRECISION``, the policy's, at each dtype
    (and still give the right answer: the spies launch the real kernels)."""
    prefill = spy_launches(monkeypatch, fused, "_dms_prefill_kernel")
    split = {"per_head": "_decode_split_kernel", "balanced": "_decode_balanced_split_kernel"}
    decode = spy_launches(monkeypatch, decode_kernel, split[decode_kernel.SCHEDULE])
    q, k, v = (torch.randn(1, h, 40, 32, dtype=dtype, device=device) for h in (4, 2, 2))
    decisions = torch.rand(1, 2, 40, device=device) < 0.5
    out = dms_prefill_attention(q, k, v, decisions, 8)
    k_cache, v_cache = k[0].reshape(80, 32), v[0].reshape(80, 32)
    starts = torch.tensor([[0, 40]], device=device)
    lengths = torch.tensor([[40, 25]], dtype=torch.int32, device=device)
    step = dms_decode_attention(q[:, :, -1], k_cache, v_cache, starts, lengths, 40)
    assert not out.isnan().any() and not step.isnan().any()

    expected = _common.attention_dot_precision(dtype)
    assert [launch.kwargs["DOT_PRECISION"] for launch in prefill.launches] == [expected]
    assert [launch.kwargs["DOT_PRECISION"] for launch in decode.launches] == [expected]
