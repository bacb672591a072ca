"""DMS prefill attention: every implementation against the readable "math" impl in fp64.

Tolerance, flash-attention style (tests/ops/accuracy.py, shared with the decode tests): an
implementation's error against the fp64 reference may be at most twice the error of the same dense
math done by torch at the input dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dms_perf import dms_prefill_attention
from dms_perf._runtime import INTERPRET
from dms_perf.ops.prefill import IMPLS, TRITON_IMPLS
from dms_perf.ops.prefill.math_impl import math_attention
from dms_perf.testing import rel_error
from tests.markers import WHOLE_CARD
from tests.ops.accuracy import FLOOR, LSE_FLOOR, ROW_FLOOR, assert_as_accurate_as_torch, max_abs_error, worst_row_error
from tests.ops.launch_spy import assert_grid_fits_cuda, spy_launches
from tests.ops.sync_check import plant_sync, sync_checked

# On CPU, flex_attention runs eagerly on purpose (the compiled path is for the GPU).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# The interpreter runs each program in Python: longer CPU contexts are left to the GPU run.
INTERPRETER_MAX_TOKENS = 256
RULE_GRID_TOKENS = 157  # a multiple of no block size
# Every implementation but the reference itself.
UNDER_TEST = [impl for impl in IMPLS if impl != "math"]


def make_inputs(batch, num_q_heads, num_kv_heads, n, head_dim, dtype, device, evict_rate):
    q = torch.randn(batch, num_q_heads, n, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, num_kv_heads, n, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, num_kv_heads, n, head_dim, dtype=dtype, device=device)
    decisions = torch.rand(batch, num_kv_heads, n, device=device) < evict_rate
    return q, k, v, decisions


def check_against_math(impl, q, k, v, decisions, window):
    """Run ``impl`` and assert it is as close to fp64 math as torch's own math at q's dtype."""
    scale = q.shape[-1] ** -0.5
    want_lse = impl != "hub"
    result = dms_prefill_attention(q, k, v, decisions, window, impl=impl, return_lse=want_lse)
    out, lse = result if want_lse else (result, None)
    ref, ref_lse = math_attention(q.double(), k.double(), v.double(), decisions, window, scale)
    same_dtype, same_dtype_lse = math_attention(q, k, v, decisions, window, scale, compute_dtype=q.dtype)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "NaN in the output"
    assert_as_accurate_as_torch(impl, out, same_dtype, ref, FLOOR[q.dtype])
    assert_as_accurate_as_torch(f"{impl}, worst row", out, same_dtype, ref, ROW_FLOOR[q.dtype],
                                metric=worst_row_error)
    if lse is not None:
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        assert_as_accurate_as_torch(f"{impl}, LSE", lse, same_dtype_lse, ref_lse, LSE_FLOOR[q.dtype],
                                    metric=max_abs_error)


@pytest.mark.parametrize("impl", UNDER_TEST)
@pytest.mark.parametrize("window", [0, 16, 70, 512, RULE_GRID_TOKENS], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("evict_rate", [0.0, 0.5, 0.875, 1.0], ids=lambda r: f"evict{r}")
def test_rule_grid(impl, window, evict_rate, device):
    """Eviction rates x windows (0, small, some unmasked band tiles, 512, >= N) at GQA 4, batch 2."""
    inputs = make_inputs(2, 8, 2, RULE_GRID_TOKENS, 64, torch.float32, device, evict_rate)
    check_against_math(impl, *inputs, window)


@pytest.mark.parametrize("impl", UNDER_TEST)
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)], ids=["gqa1", "gqa4"])
def test_context_lengths(impl, heads, context_length, dtype, device):
    """Every context length (CPU: small; GPU: 4K..32K) and dtype, N a multiple of no block size."""
    if impl in TRITON_IMPLS and INTERPRET and context_length > INTERPRETER_MAX_TOKENS:
        pytest.skip(f"interpreter: {context_length} tokens is too slow on CPU, covered on the GPU")
    n = context_length - 3
    window = min(512, n // 4)
    num_q_heads, num_kv_heads = heads
    inputs = make_inputs(2, num_q_heads, num_kv_heads, n, 128, dtype, device, 0.875)
    check_against_math(impl, *inputs, window)


@pytest.mark.parametrize("impl", UNDER_TEST)
@pytest.mark.parametrize("n", [1, 2, 96, 127, 128])
def test_short_prompts(impl, n, device):
    """Prompts shorter than a block: compiled flex has no kernel below 128 tokens and pads them."""
    inputs = make_inputs(1, 4, 2, n, 32, torch.float32, device, 0.5)
    check_against_math(impl, *inputs, 16)


@pytest.mark.gpu
@WHOLE_CARD
def test_triton_at_the_checkpoint_shape(context_length):
    """Qwen3-8B shape (Hq=32, Hkv=8, D=128), bf16, window 512, 7/8 of the tokens marked."""
    inputs = make_inputs(1, 32, 8, context_length, 128, torch.bfloat16, "cuda", 0.875)
    check_against_math("triton", *inputs, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-sync"])
def test_triton_does_not_synchronize(planted):
    """A host sync per call left the GPU idle while the rest launched (benchmarks/NOTES.md).
    planted-sync: the same region with a sync planted after the call must be caught (the check is live)."""
    warm = make_inputs(1, 8, 2, 1000, 128, torch.bfloat16, "cuda", 0.875)
    dms_prefill_attention(*warm, 64)  # compile and autotune first: those may query the device
    inputs = make_inputs(1, 8, 2, 900, 128, torch.bfloat16, "cuda", 0.875)  # another length, same bucket
    with sync_checked(planted):
        out = dms_prefill_attention(*inputs, 64)
        if planted:
            plant_sync(out)


@pytest.mark.parametrize("impl", ["math", "flex", *TRITON_IMPLS])
def test_strided_inputs(impl, device):
    """q, k, v and decisions as transposed views of [B, N, H, ...] tensors (a projection's output layout)."""
    n = 45
    q = torch.randn(2, n, 4, 64, device=device).transpose(1, 2)
    k = torch.randn(2, n, 2, 64, device=device).transpose(1, 2)
    v = torch.randn(2, n, 2, 64, device=device).transpose(1, 2)
    decisions = (torch.rand(2, n, 2, device=device) < 0.875).transpose(1, 2)
    check_against_math(impl, q, k, v, decisions, 8)


def test_custom_scale_matches_math(device):
    q, k, v, decisions = make_inputs(1, 4, 2, 70, 64, torch.float32, device, 0.5)
    out = dms_prefill_attention(q, k, v, decisions, 16, impl="triton", scale=0.3)
    ref, _ = math_attention(q.double(), k.double(), v.double(), decisions, 16, 0.3)
    assert rel_error(out, ref) < 1e-5


_Q, _K, _V, _DECISIONS = make_inputs(1, 4, 2, 16, 64, torch.float32, "cpu", 0.5)
BAD_INPUTS = {
    "unknown-impl": (dict(impl="fast"), ValueError, "impl"),
    "mixed-dtypes": (dict(q=_Q.half()), TypeError, "dtype"),
    "fp64-not-math": (dict(q=_Q.double(), k=_K.double(), v=_V.double()), TypeError, "float64"),
    "integer-q": (dict(q=_Q.int(), k=_K.int(), v=_V.int()), TypeError, "dtype"),
    "int-decisions": (dict(decisions=_DECISIONS.int()), TypeError, "bool"),
    "short-decisions": (dict(decisions=_DECISIONS[..., :-1]), ValueError, "decisions"),
    "heads-not-multiple": (dict(q=_Q[:, :3]), ValueError, "multiple"),
    "kv-length": (dict(k=_K[:, :, :-1], v=_V[:, :, :-1]), ValueError, "length"),
    "k-v-shapes": (dict(v=_V[..., :32]), ValueError, "shapes differ"),
    "3-d-q": (dict(q=_Q[0]), ValueError, "4-D"),
    "negative-window": (dict(window=-1), ValueError, "window"),
    "float-window": (dict(window=1.5), ValueError, "window"),
    "zero-scale": (dict(scale=0.0), ValueError, "scale"),
    "hub-lse": (dict(impl="hub", return_lse=True), ValueError, "return_lse"),
    "triton-head-dim": (dict(q=_Q[..., :48], k=_K[..., :48], v=_V[..., :48]), ValueError, "head_dim"),
    "triton-group": (dict(q=torch.randn(1, 64, 16, 64), k=_K[:, :1], v=_V[:, :1], decisions=_DECISIONS[:, :1]),
                     ValueError, "query heads per KV head"),
    "two-devices": (dict(decisions=_DECISIONS.to("meta")), ValueError, "device"),
    "not-a-tensor": (dict(q=[1.0]), TypeError, "q must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case):
    change, error, match = BAD_INPUTS[case]
    kwargs = {**dict(q=_Q, k=_K, v=_V, decisions=_DECISIONS, window=4), **change}
    with pytest.raises(error, match=match):
        dms_prefill_attention(**kwargs)


@pytest.mark.parametrize("impl", ["flex", "math"])
def test_query_chunks_match_math(impl, device, monkeypatch):
    """Force several query chunks (flex: one block mask per chunk, offset read from a device tensor)."""
    from dms_perf.ops.prefill import flex, math_impl

    q, k, v, decisions = make_inputs(1, 4, 2, 300, 64, torch.float32, device, 0.875)
    ref, _ = math_attention(q.double(), k.double(), v.double(), decisions, 40, 0.125)  # one chunk
    monkeypatch.setattr(flex, "FLEX_CHUNK_ELEMENTS", 1)  # 128-row chunks
    monkeypatch.setattr(math_impl, "MATH_CHUNK_ELEMENTS", 1)  # 1-row chunks
    out = dms_prefill_attention(q, k, v, decisions, 40, impl=impl, scale=0.125)
    assert rel_error(out, ref) < 1e-5 and worst_row_error(out, ref) < 1e-4


def check_prep(k, v, decisions):
    """The fused kernel's prep launch against its reference: kept K/V rows packed per (b, h) segment
    (segment r starts at r * N), running kept counts. Unwritten rows past a segment stay poisoned."""
    from dms_perf.ops.prefill.fused import dms_prep
    from dms_perf.ops.prefill.naive import prep_reference

    n = k.shape[2]
    k_kept, v_kept, kept_upto = dms_prep(k, v, decisions)
    k_rows, v_rows, ref_upto = prep_reference(k, v, decisions)
    assert torch.equal(kept_upto, ref_upto)
    for r, (k_ref, v_ref) in enumerate(zip(k_rows, v_rows, strict=True)):
        assert torch.equal(k_kept[r * n : r * n + len(k_ref)], k_ref), f"segment {r}: K rows differ"
        assert torch.equal(v_kept[r * n : r * n + len(v_ref)], v_ref), f"segment {r}: V rows differ"
    # The newest token is always kept, so every segment holds at least one row.
    assert min(len(rows) for rows in k_rows) >= 1


@pytest.mark.parametrize("evict_rate", [0.0, 0.5, 0.875, 1.0])
@pytest.mark.parametrize(("batch", "n"), [(1, 1), (2, 157), (1, 1000)])
def test_prep_kernel_matches_reference(evict_rate, batch, n, device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    _, k, _, decisions = make_inputs(batch, 4, 2, n, 64, dtype, device, evict_rate)
    v = torch.randn(batch, n, 2, 64, dtype=dtype, device=device).transpose(1, 2)  # strided rows
    check_prep(k, v, decisions)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    n=st.integers(1, 300),
    head_dim=st.sampled_from([16, 64, 128]),
    mark_p=st.sampled_from([0.0, 0.3, 0.875, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prep_kernel_property(batch, kv_heads, n, head_dim, mark_p, seed, device):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn((batch, kv_heads, n, head_dim), generator=gen).to(device) for _ in "kv")
    decisions = (torch.rand((batch, kv_heads, n), generator=gen) < mark_p).to(device)
    check_prep(k, v, decisions)


def test_launch_with_an_explicit_config():
    """``launch_prefill_kernel(config=...)`` bypasses the autotuner (benchmarks/tune_prefill.py sweeps
    configs through it): it must keep giving the right answer. Window 8 < 40 tokens, so eviction is
    exercised (the Qwen3-8B head shape; fp32 in the interpreter, bf16 on the GPU)."""
    from dms_perf.ops.prefill.fused import dms_prep, launch_prefill_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, tolerance = (torch.bfloat16, 3e-2) if device == "cuda" else (torch.float32, 1e-3)
    n, window, scale = 40, 8, 128**-0.5
    q = torch.randn(1, 32, n, 128, device=device, dtype=dtype)
    k, v = (torch.randn(1, 8, n, 128, device=device, dtype=dtype) for _ in "kv")
    decisions = torch.rand(1, 8, n, device=device) < 7 / 8
    out = torch.full_like(q, float("nan"))
    config = dict(ROWS=64, BLOCK_N=32, num_warps=4, num_stages=1)
    launch_prefill_kernel(q, k, v, *dms_prep(k, v, decisions), decisions, out, out, window, scale, False,
                          config=config)
    ref, _ = math_attention(q.double(), k.double(), v.double(), decisions, window, scale)
    assert (out.double() - ref).abs().max().item() < tolerance


# Rows B * Hkv one past CUDA's 65535 on a grid's second axis (which the prefill launches once used).
MANY_ROWS = 65536


def test_triton_launch_grids_fit_any_batch(monkeypatch, device):
    """B * Hkv = 65536 rows: both launches of the triton impl keep their grids within CUDA's limits,
    with one program per (row, query block) and per (row, chunk). Recorded, not run: the interpreter
    would take many minutes; every other test here runs the folded index math, and
    test_triton_takes_any_batch_gpu a real batch this large."""
    from dms_perf.ops.prefill import fused

    prep = spy_launches(monkeypatch, fused, "_dms_prep_kernel", run=False)
    attend = spy_launches(monkeypatch, fused, "_dms_prefill_kernel", run=False)
    n = 70
    q, k, v, decisions = make_inputs(MANY_ROWS // 2, 4, 2, n, 16, torch.float32, device, 0.5)
    dms_prefill_attention(q, k, v, decisions, 8)

    assert len(prep.launches) == len(attend.launches) == 1
    for grid in prep.grids() + attend.grids():
        assert_grid_fits_cuda(grid)
    (prep_grid,) = prep.grids()
    assert prep_grid[0] % MANY_ROWS == 0 and prep_grid[0] >= MANY_ROWS
    for config, (programs, *rest) in zip(attend.configs, attend.grids(), strict=True):
        block_m = config.kwargs["ROWS"] // 2  # G = GROUP_P2 = 2
        assert (programs, *rest) == (-(-n // block_m) * MANY_ROWS,)


@pytest.mark.gpu
def test_triton_takes_any_batch_gpu(dtype):
    """B * Hkv = 65538 rows (past the 65535 of a grid's second axis): "invalid argument" before."""
    inputs = make_inputs(MANY_ROWS // 2 + 1, 4, 2, 5, 16, dtype, "cuda", 0.5)
    check_against_math("triton", *inputs, 2)


def test_hub_triton_names_the_row_limit(device):
    """hub-triton moves q with the data movers, one grid row per (b, query head): past 65535 rows it
    raises before any launch, naming the limit."""
    q, k, v, decisions = make_inputs(MANY_ROWS // 2, 2, 1, 3, 16, torch.float32, device, 0.5)
    with pytest.raises(ValueError, match="hub-triton.*65535"):
        dms_prefill_attention(q, k, v, decisions, 1, impl="hub-triton")
