"""Qwen3-DMS end to end: generate and logits vs the uncompacted "math" reference, cache lengths vs the rule,
checkpoint round trip, config validation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache, Qwen3Config

from dms_perf.model.cache import DMSCache, kv_cache_bytes
from dms_perf.model.qwen3_dms import BACKENDS, Qwen3DMSForCausalLM, build_model, load_model, tiny_config
from dms_perf.rule import visibility_mask
from dms_perf.testing import rel_error
from tests.model.recorders import record_decisions

LOGIT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
CONFIGS = {"gqa2": {}, "gqa4": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}}


def _greedy(model, ids, new_tokens=32):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "math"])
@pytest.mark.parametrize("shape", list(CONFIGS))
def test_greedy_generate_matches_math_reference(backend, shape, device):
    config = tiny_config(**CONFIGS[shape])
    batch, prompt = (2, 90) if shape == "gqa2" else (1, 150)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    reference = _greedy(build_model(config, backend="math", device=device), ids)
    tokens = _greedy(build_model(config, backend=backend, device=device), ids)
    assert tokens.shape == (batch, 32)
    assert torch.equal(tokens, reference)


def test_eviction_off_keeps_every_token_and_matches_math(device):
    """``set_dms_eviction(False)`` (the dense-triton method): nothing is marked, every head holds every
    token, and greedy tokens equal the math reference's with eviction off."""
    config = tiny_config()
    ids = torch.randint(0, config.vocab_size, (1, 70), device=device)
    models = [build_model(config, backend=b, device=device) for b in ("math", "triton")]
    for model in models:
        model.set_dms_eviction(False)
    reference, tokens = (_greedy(model, ids, new_tokens=12) for model in models)
    assert torch.equal(tokens, reference)
    cache = models[1].make_dms_cache()
    with torch.no_grad():
        models[1](ids, past_key_values=cache)
    for layer in range(config.num_hidden_layers):
        assert cache.head_lengths(layer).tolist() == [[70] * config.num_key_value_heads]


def _teacher_forced_logits(model, ids, steps):
    """Prefill ids[:, :-steps], then feed the remaining tokens one by one; logits of every step."""
    cache = model.make_dms_cache()
    prompt = ids.shape[1] - steps
    with torch.no_grad():
        logits = [model(ids[:, :prompt], past_key_values=cache).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, 1).float(), cache


@pytest.mark.parametrize("backend", ["triton", "hub-triton", "hub"])
def test_logits_close_to_math_reference(backend, dtype, device):
    config = tiny_config()
    ids = torch.randint(0, config.vocab_size, (1, 120), device=device)
    reference, _ = _teacher_forced_logits(build_model(config, backend="math", dtype=dtype, device=device), ids, 12)
    logits, _ = _teacher_forced_logits(build_model(config, backend=backend, dtype=dtype, device=device), ids, 12)
    assert rel_error(logits, reference) < LOGIT_TOL[dtype]


def test_cache_lengths_follow_the_rule_and_bytes_shrink(device):
    config = tiny_config(dms_initial_alpha_offset=-40.0)  # marks most tokens: a > -0.4
    model = build_model(config, backend="triton", device=device)
    model.dms_capacity_step = 16
    recorded = record_decisions(model)
    ids = torch.randint(0, config.vocab_size, (1, 200), device=device)
    logits, cache = None, model.make_dms_cache()
    with torch.no_grad():
        for step in range(10):
            feed = ids if step == 0 else logits.argmax(-1, keepdim=True)
            logits = model(feed, past_key_values=cache).logits[:, -1]
            for layer_idx, chunks in enumerate(recorded):
                decisions = torch.cat(chunks, dim=-1)
                n = decisions.shape[-1]
                seen = visibility_mask(decisions, config.dms_window_size, 1, n, query_offset=n - 1)
                assert torch.equal(cache.head_lengths(layer_idx), seen[:, :, 0].sum(-1).int())
    lengths = torch.stack([cache.head_lengths(i) for i in range(config.num_hidden_layers)])
    assert int(lengths.max()) < 0.6 * 209  # eviction happened
    per_token = 2 * config.head_dim * 4
    assert cache.kept_kv_bytes() == int(lengths.sum()) * per_token
    vanilla = DynamicCache()
    vanilla_model = build_model(config, backend=None, device=device)
    with torch.no_grad():
        vanilla_model(torch.randint(0, config.vocab_size, (1, 209), device=device), past_key_values=vanilla)
    assert kv_cache_bytes(cache) < 0.7 * kv_cache_bytes(vanilla)


def test_same_seed_same_weights_for_every_backend(device):
    config = tiny_config()
    vanilla = build_model(config, backend=None, device=device).state_dict()
    dms = build_model(config, backend="triton", device=device).state_dict()
    assert vanilla.keys() == dms.keys()
    assert all(torch.equal(vanilla[k], dms[k]) for k in vanilla)


def test_checkpoint_round_trip(tmp_path, device):
    config = tiny_config()
    model = build_model(config, backend="triton", device=device)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and saved["dms_window_size"] == 16
    # The released config carries an auto_map to its remote code: it must be ignored.
    saved["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_model(tmp_path, backend="triton", dtype=torch.float32, device=device)
    assert isinstance(loaded, Qwen3DMSForCausalLM)
    ids = torch.randint(0, config.vocab_size, (1, 70), device=device)
    assert torch.equal(_greedy(loaded, ids), _greedy(model, ids))


def test_generate_creates_dms_cache(device):
    model = build_model(tiny_config(), backend="triton", device=device)
    ids = torch.randint(0, 512, (1, 40), device=device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=True, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, DMSCache)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def test_rejects_bad_config_and_input(device):
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen3DMSForCausalLM(tiny_config(use_sliding_window=True, sliding_window=8))
    plain = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    with pytest.raises(ValueError, match="dms_alpha_scale"):
        Qwen3DMSForCausalLM(plain)
    with pytest.raises(ValueError, match="backend"):
        build_model(tiny_config(), backend="paged", device=device)
    model = build_model(tiny_config(), backend="triton", device=device)
    ids = torch.randint(0, 512, (2, 20), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)


@pytest.mark.gpu
def test_logits_close_at_checkpoint_head_shape_gpu(dtype):
    """head_dim 128, GQA-4, window 64 on a 1000-token prompt: closer to the real model's shapes."""
    config = tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=128, dms_window_size=64)
    ids = torch.randint(0, config.vocab_size, (1, 1000), device="cuda")
    reference, _ = _teacher_forced_logits(build_model(config, backend="math", dtype=dtype, device="cuda"), ids, 8)
    logits, _ = _teacher_forced_logits(build_model(config, backend="triton", dtype=dtype, device="cuda"), ids, 8)
    assert rel_error(logits, reference) < LOGIT_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_step", [5, 128])
def test_cuda_graph_decode_matches_eager_decode_gpu(capacity_step, dtype):
    """Steps replayed from CUDA graphs (dms_perf.model.graph) give the eager steps' logits and cache, also
    across re-sizes of the cache (capacity_step 5: a re-size, an eager step and a new capture every 5)."""
    config = tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=128, dms_window_size=24)
    model = build_model(config, backend="triton", dtype=dtype, device="cuda")
    model.dms_capacity_step = capacity_step
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    runs = {}
    for graphs in (False, True):
        model.dms_cuda_graphs = graphs
        runs[graphs] = _teacher_forced_logits(model, ids, 40)
    (eager, eager_cache), (replayed, graph_cache) = runs[False], runs[True]
    graph = model._decode_graph
    assert graph is not None and graph.cache is graph_cache
    assert graph.replays >= 40 - 40 // capacity_step - 2 and graph.captures >= max(1, 40 // capacity_step - 1)
    # Same kernels with the same arguments: equal up to cuBLAS's choice of algorithm under capture.
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
    assert rel_error(replayed, eager) < LOGIT_TOL[dtype] / 10
    assert graph_cache.get_seq_length() == eager_cache.get_seq_length() == 300
    for layer in range(config.num_hidden_layers):
        assert torch.equal(graph_cache.head_lengths(layer), eager_cache.head_lengths(layer))
        assert torch.equal(graph_cache.layers[layer].step_index, eager_cache.layers[layer].step_index)


@pytest.mark.gpu
def test_generate_replays_cuda_graphs_gpu():
    """``model.generate`` takes the graph path (greedy and sampling) with the tokens of the eager path."""
    config = tiny_config()
    model = build_model(config, backend="triton", dtype=torch.float16, device="cuda")
    ids = torch.randint(0, config.vocab_size, (1, 200), device="cuda")
    model.dms_cuda_graphs = False
    eager = _greedy(model, ids)
    model.dms_cuda_graphs = True
    assert torch.equal(_greedy(model, ids), eager)
    assert model._decode_graph.replays >= 29
    torch.manual_seed(1)
    with torch.no_grad():
        sampled = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=True, top_k=20)
    assert sampled.shape == (1, 216) and model._decode_graph.replays >= 13


@pytest.mark.gpu
def test_hooked_model_decodes_eagerly_gpu():
    """A replay would skip forward hooks: a model with any hook takes the eager steps."""
    model = build_model(tiny_config(), backend="triton", dtype=torch.float16, device="cuda")
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    _greedy(model, torch.randint(0, 512, (1, 100), device="cuda"), new_tokens=8)
    assert model._decode_graph.eager_only and model._decode_graph.replays == 0
    assert len(calls) == 8  # the prefill and 7 decode steps, each seen by the hook
