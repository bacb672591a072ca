"""Qwen3-DMS: transformers' Qwen3 with the DMS attention and the compacted DMS cache (docs/DMS.md).

The model is transformers' ``Qwen3ForCausalLM`` with each ``Qwen3Attention`` turned into
:class:`Qwen3DMSAttention`, a subclass that only replaces ``forward``: no extra weights, standard Qwen3
parameter names, so the released Qwen3-8B-DMS-8x checkpoint (model_type "qwen3" + ``dms_*`` config
fields; its ``auto_map`` is ignored) loads with ``Qwen3DMSForCausalLM.from_pretrained(<dir>)``.

Attention backends (``model.set_dms_backend``), named after their prefill (``dms_perf.ops.prefill``):

``"triton"``      our fused prefill; decode steps with the Triton cache update and decode kernels,
                  replayed from CUDA graphs unless ``model.dms_cuda_graphs`` is False.
``"hub-triton"``  the released code's prefill structure on our kernels; decode as "triton".
``"hub"``         the released code's prefill; decode in torch ops over the same compacted cache.
``"flex"``        FlexAttention prefill; decode as "hub".
``"math"``        the reference model: no compaction, every K/V kept, the DMS rule applied as a full
                  mask at every step in fp32 (``DMSReferenceCache``). Tests only.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, apply_rotary_pos_emb

from dms_perf.model.cache import DEFAULT_CAPACITY_STEP, DMSCache, DMSReferenceCache
from dms_perf.model.graph import GRAPH_KWARGS, DecodeGraph, PoolGraphs
from dms_perf.model.paged import PagedKVPool
from dms_perf.ops.decode import hub_decode_attention
from dms_perf.ops.linear import decode_linear
from dms_perf.ops.prefill import IMPLS, dms_prefill_attention
from dms_perf.ops.prefill.math_impl import math_attention
from dms_perf.rule import decision_alphas, dms_decisions

# A backend is a prefill implementation (dms_perf.ops.prefill.IMPLS); these decode with the Triton
# cache update and decode kernels, the others with torch ops.
BACKENDS = IMPLS
TRITON_DECODE_BACKENDS = ("triton", "hub-triton")
DMS_FIELDS = ("dms_alpha_scale", "dms_initial_alpha_offset", "dms_window_size")
# Checkpoint values (docs/DMS.md, "Config fields").
DMS_DEFAULTS = {"dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_window_size": 512, "dms_cr": 8}


def validate_dms_config(config: Qwen3Config) -> None:
    """Raise ``ValueError`` for a config Qwen3-DMS cannot run: missing DMS fields or sliding-window layers."""
    missing = [name for name in DMS_FIELDS if getattr(config, name, None) is None]
    if missing:
        raise ValueError(f"config lacks the DMS fields {missing} (docs/DMS.md, 'Config fields')")
    window = config.dms_window_size
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"dms_window_size must be an int >= 0, got {window!r}")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError(
            "Qwen3-DMS supports full-attention layers only; this config has sliding-window layers "
            f"(use_sliding_window={getattr(config, 'use_sliding_window', None)}, layer_types={layer_types})"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {config.num_attention_heads} not a multiple of "
            f"num_key_value_heads {config.num_key_value_heads}"
        )


class Qwen3DMSAttention(Qwen3Attention):
    """Qwen3 attention with DMS decisions, eviction and the compacted cache (same weights as Qwen3)."""

    dms_backend = "triton"
    # RoPE; dms_perf.model.fused puts Liger's fused kernel here (a plain function on the instance).
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    dms_evict = True  # False: no token is ever marked (the same computation with a dense cache)
    # False: the query channel DMS borrows for decisions stays in the scores (a press's plain-Qwen3 cache
    # decoded with eviction off); True zeroes it, as DMS does.
    dms_borrow_channel = True
    dms_passthrough = False  # True: plain Qwen3Attention (transformers' cache), see Qwen3DMSForCausalLM.passthrough
    # The q/k/v weights as one matrix (dms_perf.model.fused.fuse_projections): one GEMM, and the triton
    # decode step's norms, decision, RoPE and cache update in one launch (fused_decode_step).
    dms_qkv_weight: torch.Tensor | None = None

    @property
    def alpha_offset(self) -> float:
        """The decision threshold offset; +inf marks nothing (``a * scale - inf > 0`` never holds)."""
        return self.config.dms_initial_alpha_offset if self.dms_evict else float("inf")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if self.dms_passthrough:  # transformers' own attention and cache (a kvpress press prefilling)
            if cache_position is not None:  # transformers >= 5.4 takes no cache_position
                kwargs["cache_position"] = cache_position
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        batch, n = hidden_states.shape[:2]
        hidden_shape = (batch, n, -1, self.head_dim)
        cos, sin = position_embeddings
        decoding = past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0
        triton_step = self.dms_backend in TRITON_DECODE_BACKENDS and decoding
        if self.dms_qkv_weight is not None:
            # The engine's projections: skinny_linear or cuBLAS on a decode step's few rows (per projection).
            qkv = decode_linear(hidden_states, self.dms_qkv_weight, projection="qkv")
            eps = self._fused_step_norms() if triton_step else None
            if eps is not None:
                _require_cache(past_key_values, DMSCache, self.dms_backend)
                out = self._fused_decode_step(qkv, cos, sin, past_key_values, eps).reshape(batch, n, -1)
                if self.o_proj.bias is None:
                    return decode_linear(out, self.o_proj.weight, projection="o"), None
                return self.o_proj(out), None
            q_lin, k_lin, v_lin = qkv.split([self.q_proj.out_features, self.k_proj.out_features,
                                             self.v_proj.out_features], dim=-1)
        else:
            q_lin, k_lin, v_lin = (proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = self.q_norm(q_lin.view(hidden_shape)).transpose(1, 2)
        k = self.k_norm(k_lin.view(hidden_shape)).transpose(1, 2)
        v = v_lin.view(hidden_shape).transpose(1, 2)

        if triton_step:
            _require_cache(past_key_values, DMSCache, self.dms_backend)
            out = self._triton_decode_step(q, k, v, cos, sin, past_key_values)
        else:
            out = self._attention(q, k, v, cos, sin, past_key_values, decoding)
        out = out.transpose(1, 2).reshape(batch, n, -1)
        return self.o_proj(out), None

    def _attention(self, q, k, v, cos, sin, past_key_values, decoding):
        """Every backend's prefill, the math backend's steps and the hub / flex decode step: decisions,
        RoPE, then the backend's attention over this call's tokens (and the cache)."""
        config = self.config
        decisions, q = dms_decisions(q, k.shape[1], config.dms_alpha_scale, self.alpha_offset)
        # [B, Hkv, N] from a view of the [B, N, Hq, D] projection: made contiguous once for all consumers.
        decisions = decisions.contiguous()
        q, k = self.rotary_fn(q, k, cos, sin)
        # RoPE rotates channel D/2-1 into the borrowed channel: zero it again (docs/DMS.md).
        q[:, :: self.num_key_value_groups, :, -1] = 0
        window = config.dms_window_size
        backend = self.dms_backend

        if backend == "math":
            if past_key_values is not None:
                _require_cache(past_key_values, DMSReferenceCache, backend)
                k, v, decisions = past_key_values.append(self.layer_idx, k, v, decisions)
            out, _ = math_attention(q, k, v, decisions, window, self.scaling)
        elif not decoding:
            out = dms_prefill_attention(q, k, v, decisions, window, impl=backend, scale=self.scaling)
            if past_key_values is not None:
                _require_cache(past_key_values, DMSCache, backend)
                past_key_values.append(self.layer_idx, k, v, decisions, defer_packing=True)
        else:  # hub / flex: the straightforward torch decode
            _require_cache(past_key_values, DMSCache, backend)
            cached = past_key_values.append(self.layer_idx, k, v, decisions)
            out = hub_decode_attention(q[:, :, 0], *cached, scale=self.scaling)[:, :, None]
        return out

    def _triton_decode_step(self, q, k, v, cos, sin, cache):
        """The triton backend's decode step in few launches (a step is bound by the host's per-op cost):
        the decisions, the rotated query's borrowed channel and the cache update are one Triton launch
        (``DMSCache.append_step``), the attention one more. Same result as ``_attention``'s steps."""
        config = self.config
        alphas = decision_alphas(q, k.shape[1])  # before RoPE, and a copy: the channel is zeroed next
        if self.dms_borrow_channel:
            q[:, :: self.num_key_value_groups, :, -1] = 0  # q is this layer's own q_norm output
        q, k = self.rotary_fn(q, k, cos, sin)
        cached = cache.append_step(
            self.layer_idx, q, k, v, alphas, config.dms_alpha_scale, self.alpha_offset, self.dms_borrow_channel
        )
        return cached.attend(q[:, :, 0], scale=self.scaling)[:, :, None]


    def _fused_step_norms(self) -> float | None:
        """The q/k norms' shared epsilon when the fused step can stand in for them (plain RMSNorms:
        transformers' or Liger's without offset), else None."""
        eps = [getattr(norm, "variance_epsilon", None) for norm in (self.q_norm, self.k_norm)]
        if eps[0] is None or eps[0] != eps[1] or any(getattr(n, "offset", 0.0) for n in (self.q_norm, self.k_norm)):
            return None
        return eps[0]

    def _fused_decode_step(self, qkv, cos, sin, cache, eps: float):
        """The triton decode step from the fused projection: one launch for the norms (epsilon ``eps``),
        decision, RoPE and cache update (``DMSCache.append_fused_step``), one for attention. Same result as
        ``_triton_decode_step`` up to rounding (the fused kernel rounds RoPE once, in fp32)."""
        q, cached = cache.append_fused_step(
            self.layer_idx, qkv, self.q_norm.weight, self.k_norm.weight, eps, cos, sin,
            self.config.dms_alpha_scale, self.alpha_offset, self.dms_borrow_channel,
        )
        return cached.attend(q, scale=self.scaling)


def _require_cache(cache, cls, backend):
    if not isinstance(cache, cls):
        raise TypeError(f"the {backend!r} DMS backend needs a {cls.__name__}, got {type(cache).__name__}")


class Qwen3DMSForCausalLM(Qwen3ForCausalLM):
    """Qwen3ForCausalLM whose attention layers follow DMS; ``generate`` uses the DMS cache automatically.

    Batches must be unpadded (an ``attention_mask`` with zeros is rejected with ``ValueError``).
    """

    def __init__(self, config: Qwen3Config):
        validate_dms_config(config)
        super().__init__(config)
        # Same modules and parameters as Qwen3Attention: only forward changes, so weights and their
        # random initialization are those of the vanilla model.
        for layer in self.model.layers:
            layer.self_attn.__class__ = Qwen3DMSAttention
        self.dms_capacity_step = DEFAULT_CAPACITY_STEP
        # Replay the triton backend's decode steps from CUDA graphs (dms_perf.model.graph); False: eager.
        self.dms_cuda_graphs = True
        self._decode_graph: DecodeGraph | None = None
        # The decode engine's KV pool (use_kv_pool): caches made by the model live on it, and their
        # decode graphs (PoolGraphs) are captured once per batch size and reused by later generations.
        self.dms_pool: PagedKVPool | None = None
        self._pool_graphs: PoolGraphs | None = None
        self.set_dms_backend("triton")

    def set_dms_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown DMS backend {backend!r}; expected one of {BACKENDS}")
        self.dms_backend = backend
        for layer in self.model.layers:
            layer.self_attn.dms_backend = backend

    @contextlib.contextmanager
    def passthrough(self):
        """Inside: the model is plain transformers Qwen3 (its attention, a transformers cache, no DMS), so
        that a kvpress press can prefill with its hooks; the press's compressed cache can then be handed
        to the DMS engine with ``DMSCache.from_dense`` and decoded there."""
        layers = [layer.self_attn for layer in self.model.layers]
        for attention in layers:
            attention.dms_passthrough = True
        try:
            yield self
        finally:
            for attention in layers:
                attention.dms_passthrough = False

    def release_decode_graph(self) -> None:
        """Drop the captured decode steps (their graph pools and static buffers), e.g. before a larger batch."""
        self._decode_graph = None
        self._pool_graphs = None

    def use_kv_pool(self, pool: PagedKVPool | None) -> None:
        """Make the model's caches on the paged ``pool`` (None: caches own their buffers, as by default).

        The decode engine: with a pool, a batch size's decode graph is captured once and replayed by
        every later generation (``dms_perf.model.graph.PoolGraphs``), and each head's memory follows its
        kept tokens page by page for any output length. Each new cache takes the whole pool, closing the
        previous one. Size it with ``PagedKVPool.for_budget(model, budget_bytes, max_seqs=...)``.
        """
        if pool is not None:
            if not isinstance(pool, PagedKVPool):
                raise TypeError(f"use_kv_pool takes a PagedKVPool, got {type(pool).__name__}")
            config = self.config
            if (pool.head_dim, pool.dtype, pool.layers, pool.kv_heads, pool.window) != (
                    config.head_dim, self.dtype, config.num_hidden_layers, config.num_key_value_heads,
                    config.dms_window_size):
                raise ValueError(
                    f"the pool holds {pool.layers} layers x {pool.kv_heads} KV heads of head_dim {pool.head_dim} "
                    f"{pool.dtype}, window {pool.window}; the model needs {config.num_hidden_layers} x "
                    f"{config.num_key_value_heads} of {config.head_dim} {self.dtype}, window {config.dms_window_size}"
                )
            if self.dms_backend not in TRITON_DECODE_BACKENDS:
                raise ValueError(f"a paged KV pool decodes with the triton step: backends {TRITON_DECODE_BACKENDS}, "
                                 f"not {self.dms_backend!r}")
        self.dms_pool = pool
        self._pool_graphs = None

    def set_dms_borrowed_channel(self, borrowed: bool) -> None:
        """``False``: decode steps keep the query channel DMS reads its decisions from (plain Qwen3 scores;
        for a non-DMS cache decoded with eviction off). Prefill and the hub backends always borrow it."""
        for layer in self.model.layers:
            layer.self_attn.dms_borrow_channel = bool(borrowed)

    def set_dms_eviction(self, evict: bool) -> None:
        """``False``: decide no eviction at all (every token kept), the DMS computation over a dense cache."""
        for layer in self.model.layers:
            layer.self_attn.dms_evict = bool(evict)

    def make_dms_cache(self, *, pooled: bool = True, capacity_step: int | None = None) -> DMSCache | DMSReferenceCache:
        """A new cache for this model's backend; on the model's pool (``use_kv_pool``) unless ``pooled``
        is False. ``capacity_step``: spare decode rows per head (default ``dms_capacity_step``)."""
        if self.dms_backend == "math":
            return DMSReferenceCache()
        pool = self.dms_pool if pooled else None
        step = self.dms_capacity_step if capacity_step is None else capacity_step
        return DMSCache(self.config.num_hidden_layers, self.config.dms_window_size, step, pool=pool)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        # Checked once per prompt (a host sync), then dropped: the DMS attention needs no mask.
        if attention_mask is not None and fresh and not bool(attention_mask.all()):
            raise ValueError(
                "Qwen3-DMS does not support padded batches (attention_mask has zeros): run sequences "
                "of different lengths one by one"
            )
        if use_cache and past_key_values is None:
            past_key_values = self.make_dms_cache()
        if self._graph_eligible(input_ids, past_key_values, kwargs):
            return self._graph_step(input_ids, past_key_values, kwargs)
        out = super().forward(
            input_ids=input_ids, attention_mask=None, past_key_values=past_key_values, use_cache=use_cache, **kwargs
        )
        if isinstance(past_key_values, DMSCache) and not past_key_values.pack_later:
            past_key_values.finish_prefill()  # the prefill's deferred packing (a no-op when decoding)
        return out

    def _graph_eligible(self, input_ids, cache, kwargs) -> bool:
        """A plain single-token triton decode step on CUDA, which ``DecodeGraph`` may replay."""
        return (
            self.dms_cuda_graphs
            and self.dms_backend in TRITON_DECODE_BACKENDS
            and isinstance(cache, DMSCache)
            and input_ids is not None
            and input_ids.is_cuda
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and cache.get_seq_length() > 0
            and not torch.is_grad_enabled()
            and all(key in GRAPH_KWARGS or value is None or value is False for key, value in kwargs.items())
            and kwargs.get("return_dict", True)
        )

    def _graph_step(self, input_ids, cache, kwargs) -> CausalLMOutputWithPast:
        batch = input_ids.shape[0]
        keep = kwargs.get("logits_to_keep", 0)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.full((batch, 1), cache.get_seq_length(), device=input_ids.device)
        position_ids = position_ids.expand(batch, 1)

        def run_step(ids, positions):
            out = super(Qwen3DMSForCausalLM, self).forward(
                input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=keep
            )
            return out.logits

        if cache.pool is not None:
            if self._pool_graphs is None or self._pool_graphs.pool is not cache.pool:
                self._pool_graphs = PoolGraphs(cache.pool)
            logits = self._pool_graphs.step(cache, run_step, input_ids, position_ids, logits_to_keep=keep,
                                            eager_only=self._hooked)
        else:
            logits = self._decode_graph_for(cache, batch, keep).step(run_step, input_ids, position_ids)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _hooked(self) -> bool:
        # A replay runs no Python: forward hooks (kvpress-style instrumentation, recorders) would be
        # skipped silently, so a hooked model decodes eagerly.
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _decode_graph_for(self, cache, batch, keep) -> DecodeGraph:
        if self._decode_graph is None or not self._decode_graph.matches(cache, batch, keep):
            self._decode_graph = DecodeGraph(cache, batch, keep, eager_only=self._hooked())
        return self._decode_graph

    def generate(self, *args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = self.make_dms_cache()
        return super().generate(*args, **kwargs)


def qwen3_8b_config(**overrides) -> Qwen3Config:
    """The Qwen3-8B(-DMS-8x) shape: 36 layers, hidden 4096, 32/8 heads, head_dim 128 (docs/DMS.md)."""
    fields = dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        **DMS_DEFAULTS,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_config(**overrides) -> Qwen3Config:
    """A small Qwen3-DMS for tests: 2 layers, hidden 128, 4 query / 2 KV heads, head_dim 32, window 16.

    GQA-4 variant: ``tiny_config(num_key_value_heads=1)``.
    """
    fields = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        **DMS_DEFAULTS,
    )
    fields["dms_window_size"] = 16
    fields.update(overrides)
    return Qwen3Config(**fields)


def _dms_backend_checked(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected None (vanilla) or one of {BACKENDS}")
    return backend


def build_model(
    config: Qwen3Config,
    *,
    backend: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A random-weight model built directly on ``device`` in ``dtype``, in eval mode.

    ``backend=None``: vanilla transformers ``Qwen3ForCausalLM`` (SDPA); otherwise ``Qwen3DMSForCausalLM``
    with that backend. The same seed gives the same weights for every backend.
    """
    backend = _dms_backend_checked(backend)
    config = Qwen3Config.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    cls = Qwen3ForCausalLM if backend is None else Qwen3DMSForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    if backend is not None:
        model.set_dms_backend(backend)
    return model.eval()


def load_model(
    path, *, backend: str | None, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
    config: Qwen3Config | None = None,
) -> Qwen3ForCausalLM:
    """Load a local checkpoint directory (or hub id): vanilla Qwen3 for ``backend=None``, else Qwen3-DMS.
    ``config``: instead of the checkpoint's config.json (e.g. one with the DMS fields a base model lacks)."""
    backend = _dms_backend_checked(backend)
    cls = Qwen3ForCausalLM if backend is None else Qwen3DMSForCausalLM
    extra = {} if config is None else {"config": config}
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **extra).to(device)
    if backend is not None:
        model.set_dms_backend(backend)
    return model.eval()
