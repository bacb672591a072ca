"""CUDA-graph replay of the Qwen3-DMS decode step.

An eager decode step of an 8B model is ~40 small launches per layer, each costing more host time than
GPU time (benchmarks/NOTES.md, "Decode host cost"), so the step is bound by Python, not by the weight
reads. A CUDA graph replays all of a step's launches with one host call. The DMS step can be captured
because none of its launches takes a per-step host value:

* the cache update reads and advances a device counter of the token index (``DMSCacheLayer.step_index``);
* decode attention cuts each head's own length into splits on the device; the launch takes only the
  number of splits, from the power of two above the longest head (``DMSCacheLayer.launch_length``);
* the new token and its position are copied into static buffers before each replay.

Two owners of graphs:

``DecodeGraph``  a cache that owns its buffers: a re-size (every ``capacity_step`` steps) moves them, so
                 the step that re-sizes runs eagerly and the next one captures a new graph; a new cache
                 (a new generation) captures anew.
``PoolGraphs``   caches on a ``PagedKVPool`` (``dms_perf.model.paged``): pages, block tables and the
                 per-head state never move, so one graph per (batch, launch lengths, decode scheduler:
                 ``PagedCacheLayer.schedule``) is captured once and
                 replayed by every later generation of that batch size; pages are handed out on the host
                 before a replay (``DMSCache.prepare_step``), never copied.

The first step of a layout is eager in both: it compiles any kernel the capture would otherwise compile,
and warms cuBLAS.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from dms_perf.model.cache import DMSCache
from dms_perf.model.paged import PagedKVPool

# Arguments a captured step may be called with; any other must be None or False (``generate`` passes
# ``inputs_embeds=None``), else the step runs eagerly.
GRAPH_KWARGS = frozenset({"position_ids", "cache_position", "logits_to_keep", "return_dict", "use_cache"})

RunStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CapturedStep:
    """One captured decode step on static input buffers: ``replay`` copies the inputs in and returns a
    copy of the logits; the cache's host state advances as an eager step would have advanced it."""

    def __init__(self, cache: DMSCache, run_step: RunStep, input_ids, position_ids, mempool=None):
        # Plain tensors (not inference tensors), so that copy_ works in and out of inference mode; a
        # capture runs nothing, so their contents do not matter here.
        with torch.inference_mode(False):
            self.input_ids = torch.empty_like(input_ids)
            self.position_ids = torch.empty_like(position_ids)
        self.graph = torch.cuda.CUDAGraph()
        for layer in cache.layers:
            layer.host_frozen = True  # the capture runs no kernel: the host state must not move either
        try:
            with torch.cuda.graph(self.graph, pool=mempool):
                self.logits = run_step(self.input_ids, self.position_ids)
        finally:
            for layer in cache.layers:
                layer.host_frozen = False

    def replay(self, cache: DMSCache, input_ids, position_ids) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        for layer in cache.layers:
            layer.advance_host()
        return self.logits.clone()


class DecodeGraph:
    """The decode steps of one ``DMSCache`` at one batch size: eager when due, else graph replays.

    ``eager_only``: never capture (the model has forward hooks, which a replay would skip); hooks
    added after the capture are not seen.

    ``run_step(input_ids, position_ids)`` runs the model's eager step and returns its logits; the graph
    is a capture of that call on static buffers.
    """

    def __init__(self, cache: DMSCache, batch: int, logits_to_keep, *, eager_only: bool = False):
        # A weak reference: the model keeps its last DecodeGraph, which must not keep a finished
        # generation's cache alive (a graph over a freed cache is never replayed: ``matches`` fails).
        self._cache = weakref.ref(cache)
        self.batch, self.logits_to_keep, self.eager_only = batch, logits_to_keep, eager_only
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False  # an eager step ran on the current layout of the cache
        self.replays = 0
        self.captures = 0

    @property
    def cache(self) -> DMSCache | None:
        return self._cache()

    def matches(self, cache, batch: int, logits_to_keep) -> bool:
        return cache is self.cache and batch == self.batch and logits_to_keep == self.logits_to_keep

    def step(
        self, run_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids, position_ids
    ) -> torch.Tensor:
        layers = self.cache.layers
        if self.eager_only or layers[0].spare_steps == 0 or not self.warm:
            # Re-size due (moves the buffers) or nothing compiled for this layout yet: eager step.
            self.graph = None
            logits = run_step(input_ids, position_ids)
            self.warm = layers[0].spare_steps > 0
            return logits
        if self.graph is None:
            self.graph = CapturedStep(self.cache, run_step, input_ids, position_ids)
            self.captures += 1
        self.replays += 1
        return self.graph.replay(self.cache, input_ids, position_ids)


class PoolGraphs:
    """The decode steps of every cache on one ``PagedKVPool``: one graph per (batch, ``logits_to_keep``,
    launch lengths), kept for the pool's lifetime and shared by its generations.

    A key's first step runs eagerly (compiles and warms), its second captures, every later one replays:
    from the second generation of a batch size on, no decode step captures (a replay's only allocation is
    the copy of its logits, from PyTorch's caching allocator). All graphs draw
    on one memory pool; that is safe because they replay one at a time and each replay's logits are
    copied out before the next.
    """

    def __init__(self, pool: PagedKVPool):
        self.pool = pool
        self.graphs: dict[tuple, CapturedStep] = {}
        self.warm: set[tuple] = set()
        self.mempool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.captures = 0
        self._cache_seen = None  # weakref to the last cache stepped, and whether to stay eager for it
        self._eager_only = False

    def step(self, cache: DMSCache, run_step: RunStep, input_ids, position_ids, *, logits_to_keep,
             eager_only: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """``eager_only()`` is asked once per cache (a hooked model must not replay: see DecodeGraph)."""
        if cache.pool is not self.pool:
            raise ValueError("this cache is not on the pool these graphs were captured for")
        if self._cache_seen is None or self._cache_seen() is not cache:
            self._cache_seen, self._eager_only = weakref.ref(cache), eager_only()
        cache.prepare_step()  # a deferred prefill packing or a page hand-out: host work, before the key is taken
        key = (input_ids.shape[0], logits_to_keep, tuple(layer.launch_length for layer in cache.layers),
               cache.layers[0].schedule)
        captured = self.graphs.get(key)
        if captured is None:
            if self._eager_only or key not in self.warm:
                self.warm.add(key)
                return run_step(input_ids, position_ids)
            captured = self.graphs[key] = CapturedStep(cache, run_step, input_ids, position_ids, self.mempool)
            self.captures += 1
        self.replays += 1
        return captured.replay(cache, input_ids, position_ids)
