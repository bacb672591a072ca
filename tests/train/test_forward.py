"""The training mask and forward against the DMS rule: hard decisions give exactly ``visibility_mask`` and the
inference logits ("math" and "triton" backends); soft decisions are differentiable down to the borrowed
channel's q_proj rows."""

from __future__ import annotations

import pytest
import torch

from dms_perf.model.qwen3_dms import build_model, tiny_config
from dms_perf.rule import visibility_mask
from dms_perf.testing import rel_error
from dms_perf.train.forward import dms_training_forward
from dms_perf.train.mask import hard_keep_log, logistic_noise, relaxed_evictions, training_mask
from dms_perf.train.retrofit import borrowed_rows, zero_borrowed_channel
from tests.interpreter import skip_if_cpu_path_cannot_run_here
from tests.model.recorders import record_decisions

CONFIGS = {"gqa2": {}, "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}}


@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_hard_training_mask_is_the_visibility_rule(window):
    decisions = torch.rand(2, 3, 33) < 0.6
    mask = training_mask(hard_keep_log(decisions), window)
    visible = visibility_mask(decisions, window, 33, 33)
    expected = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    assert torch.equal(mask, expected)


def test_relaxed_mask_adds_log_keep_of_the_next_tokens_decision_beyond_the_window():
    """Element by element: key j older than the window gets log(1 - p), p = token j+1's relaxed decision."""
    n, window, tau = 12, 3, 0.4
    logits = torch.randn(1, 2, n) * 3
    noise = logistic_noise(logits.shape, generator=torch.Generator().manual_seed(0))
    evict_prob, keep_log = relaxed_evictions(logits, tau, noise)
    mask = training_mask(keep_log, window)
    for h in range(2):
        for i in range(n):
            for j in range(n):
                if j > i:
                    want = float("-inf")
                elif i - j <= window:
                    want = 0.0
                else:
                    p = torch.sigmoid((logits[0, h, j + 1].double() + noise[0, h, j + 1].double()) / tau)
                    want = float(torch.log1p(-p))  # fp64: finite where fp32's p rounds to 1
                got = float(mask[0, h, i, j])
                assert got == want if want in (0.0, float("-inf")) else got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.allclose(evict_prob, 1 - keep_log[..., :-1].exp(), atol=1e-6)
    # tau -> 0 without noise: the keep probabilities exp(mask) become the hard rule's 0/1 visibility.
    _, sharp = relaxed_evictions(logits, 1e-6)
    visible = visibility_mask(logits > 0, window, n, n)
    assert torch.equal(training_mask(sharp, window).exp(), visible.float())


# The triton prefill runs in the interpreter on a CPU: one case, the GQA-4 one.
@pytest.mark.parametrize(("backend", "shape"), [("math", "gqa2"), ("math", "gqa4"), ("triton", "gqa4")])
def test_hard_forward_matches_the_inference_forward(backend, shape, device):
    """``hard=True``: the same decisions and the same logits as the model's own prefill, eviction doing work."""
    if backend == "triton" and device.type == "cpu":
        skip_if_cpu_path_cannot_run_here()
    config = tiny_config(dms_initial_alpha_offset=0.0, **CONFIGS[shape])  # about half the tokens marked
    model = build_model(config, backend=backend, device=device)
    ids = torch.randint(0, config.vocab_size, (2 if backend == "math" else 1, 72), device=device)
    recorded = record_decisions(model)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        out = dms_training_forward(model, ids, hard=True)
    inference_decisions = torch.stack([chunks[0] for chunks in recorded])  # [L, B, Hkv, N]
    assert torch.equal(out.evicted, inference_decisions[..., 1:])
    assert 0.3 < out.eviction_rate < 0.7
    assert rel_error(out.logits, reference) < 1e-5
    model.set_dms_eviction(False)
    with torch.no_grad():
        kept_all = model(ids, use_cache=False).logits
    assert rel_error(kept_all, reference) > 100 * rel_error(out.logits, reference)  # eviction changed the logits


def test_soft_mask_carries_gradient_to_the_borrowed_rows():
    """With the borrowed rows zeroed, the channel is out of the scores and of q_norm's scale, so a loss on the
    logits alone reaches those rows only through the relaxed mask: their gradient is non-zero, and zero for
    hard decisions."""
    config = tiny_config()
    model = build_model(config, backend="math")
    zero_borrowed_channel(model)
    ids = torch.randint(0, config.vocab_size, (1, 48))
    rows = borrowed_rows(config)
    grads = {}
    for hard in (False, True):
        model.zero_grad(set_to_none=True)
        out = dms_training_forward(model, ids, tau=0.5, hard=hard, generator=torch.Generator().manual_seed(0))
        out.logits.square().mean().backward()
        grads[hard] = [layer.self_attn.q_proj.weight.grad[rows] for layer in model.model.layers]
    assert all(bool(g.abs().sum() > 0) for g in grads[False])
    assert all(bool(g.abs().sum() == 0) for g in grads[True])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    config = tiny_config()
    model = build_model(config, backend="math")
    ids = torch.randint(0, config.vocab_size, (1, 40))
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        out = dms_training_forward(model, ids, tau=0.3, generator=torch.Generator().manual_seed(3),
                                   gradient_checkpointing=checkpointing)
        loss = out.logits.square().mean() + out.evict_prob.mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))
