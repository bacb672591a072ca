"""CUDA-graph replay of the Qwen3-DMS decode step.

An eager decode step of an 8B model is ~40 small launches per layer, each costing more host time than
GPU time (benchmarks/NOTES.md, "Decode host cost"), so the step is bound by Python, not by the weight
reads. A CUDA graph replays all of a step's launches with one host call. The DMS step can be captured
because none of its launches takes a per-step host value:

* the cache update reads and advances a device counter of the token index (``DMSCacheLayer.step_index``);
* decode attention is sized by ``longest_bound``, fixed between two re-sizes of the cache;
* the new token and its position are copied into static buffers before each replay.

A re-size (every ``capacity_step`` steps, the one host sync of decoding) moves the K/V buffers, so the
step that re-sizes runs eagerly and the next one captures a new graph. The first step on a cache is
eager too: it compiles any kernel the capture would otherwise compile, and warms cuBLAS.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from dms_perf.model.cache import DMSCache

# Arguments a captured step may be called with; any other must be None or False (``generate`` passes
# ``inputs_embeds=None``), else the step runs eagerly.
GRAPH_KWARGS = frozenset({"position_ids", "cache_position", "logits_to_keep", "return_dict", "use_cache"})


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
            self._capture(run_step, input_ids, position_ids)
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        for layer in layers:
            layer.advance_host()
        self.replays += 1
        return self.logits.clone()

    def _capture(self, run_step, input_ids, position_ids) -> None:
        # Static inputs, filled by ``step`` before each replay (a capture runs nothing, so their contents
        # do not matter here); plain tensors, so that copy_ works in and out of inference mode.
        with torch.inference_mode(False):
            self.input_ids = torch.empty_like(input_ids)
            self.position_ids = torch.empty_like(position_ids)
        graph = torch.cuda.CUDAGraph()
        for layer in self.cache.layers:
            layer.host_frozen = True  # the capture runs no kernel: the host state must not move either
        try:
            with torch.cuda.graph(graph):
                self.logits = run_step(self.input_ids, self.position_ids)
        finally:
            for layer in self.cache.layers:
                layer.host_frozen = False
        self.graph = graph
        self.captures += 1
