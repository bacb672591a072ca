"""DMS prefill attention at the Qwen3-8B shape: hub, hub-triton, flex, triton against dense causal SDPA.

B=1, Hq=32, Hkv=8, D=128, bf16, window 512, decisions marking 7/8 of the tokens at random (the
DMS-8x rate; random decisions, not the checkpoint's). ``extra_info``: visible pairs, TFLOP/s over the
visible pairs only, the ratio to the floor (visible-pair FLOPs at MATMUL_TFLOPS), and speedups against
dense causal cuDNN SDPA, the hub algorithm and hub-triton, each measured by the case itself
(``median_call_ms``: the statistic of the case's own median).

CPU smoke mode (``--benchmark-disable``): tiny heads, fp32, DMS impls only, one call each.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dms_perf import dms_prefill_attention
from dms_perf._runtime import HAS_CUDA, INTERPRET
from dms_perf.bench.timing import bench, median_call_ms
from dms_perf.rule import count_visible_pairs

WINDOW = 512
EVICT_RATE = 7 / 8
# bf16 dense matmul rate of an H100 and of an H200 (the same chip): 8192^3 product on random data, ~790 TFLOP/s.
MATMUL_TFLOPS = 790.0
DENSE_REFERENCE = "sdpa-dense-cudnn"
HUB_ROUNDS = 5  # ~133 ms a call at 32K
INTERPRETER_MAX_TOKENS = 256
# "-graph": the same call captured in CUDA graphs and timed as replays: device time without Python's
# launch cost, which bounds triton's eager time at 4K (several launches at ~30 us each on the H100 host).
IMPLS = [
    "hub",
    "hub-triton",
    "flex",
    "triton",
    pytest.param("sdpa-dense-cudnn", marks=pytest.mark.gpu),
    pytest.param("sdpa-dense-flash", marks=pytest.mark.gpu),
    pytest.param("triton-graph", marks=pytest.mark.gpu),
    pytest.param("sdpa-dense-cudnn-graph", marks=pytest.mark.gpu),
]

# On CPU, flex_attention runs eagerly on purpose (the compiled path is for the GPU).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _shape():
    if HAS_CUDA:
        return dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    return dict(batch=1, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)


def _make_call(impl: str, n: int):
    """Fresh inputs (seeded by n: every impl sees the same ones) and a zero-argument call."""
    s = _shape()
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator(device=device).manual_seed(n)
    b, hq, hkv, d, dtype = s["batch"], s["num_q_heads"], s["num_kv_heads"], s["head_dim"], s["dtype"]
    q = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    decisions = torch.rand(b, hkv, n, device=device, generator=gen) < EVICT_RATE
    if impl.startswith("sdpa-dense"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.CUDNN_ATTENTION if impl == "sdpa-dense-cudnn" else SDPBackend.FLASH_ATTENTION
        k_full, v_full = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)
    else:

        def call():
            return dms_prefill_attention(q, k, v, decisions, WINDOW, impl=impl)

    return call, decisions


def _reference_ms(impl: str, n: int) -> float:
    """Median of a speedup reference on the same inputs, measured by the calling case as it measures itself."""
    call, _ = _make_call(impl.removesuffix("-graph"), n)
    rounds = HUB_ROUNDS if impl == "hub" else 15
    return median_call_ms(call, cuda_graph=impl.endswith("-graph"), rounds=rounds)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_attention(benchmark, impl, context_length):
    if impl in ("triton", "hub-triton") and INTERPRET and context_length > INTERPRETER_MAX_TOKENS:
        pytest.skip(f"interpreter: {context_length} tokens is too slow for a CPU smoke run")
    graphed = impl.endswith("-graph")
    call, decisions = _make_call(impl.removesuffix("-graph"), context_length)
    s = _shape()
    group = s["num_q_heads"] // s["num_kv_heads"]
    pairs = count_visible_pairs(decisions, WINDOW) * group
    flops = 4 * s["head_dim"] * pairs
    benchmark.group = f"prefill-attention-{context_length}"
    benchmark.extra_info.update(visible_pairs=pairs, window=WINDOW, evict_rate=EVICT_RATE, dtype=str(s["dtype"]))

    median_s = bench(benchmark, call, cuda_graph=graphed, rounds=HUB_ROUNDS if impl == "hub" else 15)
    if median_s is None:
        return
    if impl == "triton":
        from dms_perf.ops.prefill.fused import _dms_prefill_kernel

        benchmark.extra_info["triton_config"] = str(_dms_prefill_kernel.best_config)
    ms = median_s * 1e3
    floor_ms = flops / (MATMUL_TFLOPS * 1e12) * 1e3
    benchmark.extra_info.update(
        visible_tflops=flops / (ms * 1e-3) / 1e12,
        floor_ms=floor_ms,
        time_over_floor=ms / floor_ms,
        # against cuDNN timed the same way (eager vs eager, graph replays vs graph replays)
        time_vs_dense_cudnn=ms / _reference_ms(DENSE_REFERENCE + ("-graph" if graphed else ""), context_length),
    )
    if impl != "hub":
        benchmark.extra_info["speedup_vs_hub"] = _reference_ms("hub", context_length) / ms
    if impl.startswith("triton"):
        benchmark.extra_info["speedup_vs_hub_triton"] = _reference_ms("hub-triton", context_length) / ms
