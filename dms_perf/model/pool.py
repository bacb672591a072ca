"""The KV pool of the decode engine: K/V rows and per-batch bookkeeping allocated once, reused by every
generation (docs/DMS.md, "Cache and decode"; docs/benchmarks.md, "The decode engine").

A CUDA graph replays the addresses it was captured on. A ``DMSCache`` that owns its buffers moves them
whenever it grows and is freed after its generation, so each new generation (and each re-size) used to
capture a new graph. A cache built on a pool (``DMSCache(..., pool=pool)``) instead keeps

* its K/V rows in the pool's two flat ``[rows, D]`` buffers, shared by all layers (each head's segment
  is a range of rows; ``starts`` are absolute row numbers), and
* its per-head bookkeeping (``starts``, ``lengths``, the ring, the step index) in tensors the pool
  allocated once for that batch size and layer,

so that a graph captured for one batch size stays valid for every later generation of that size.

Rows are handed out by a bump allocator: a new cache on the pool starts the pool over (the previous
cache is closed: using it again raises), its prefill and re-sizes take rows above the last ones handed
out, and a request past the end raises :class:`PoolExhausted` (an out-of-memory error, reported as an
OOM row by the benchmarks) before anything is written. Two live caches never share rows.
"""

from __future__ import annotations

import torch


class PoolExhausted(torch.OutOfMemoryError):
    """The pool has fewer free rows than a prefill or re-size asks for (nothing was written)."""


class KVPool:
    """``rows`` K and V rows of ``head_dim`` channels in ``dtype`` on ``device``, allocated once."""

    def __init__(self, rows: int, head_dim: int, *, dtype: torch.dtype, device: str | torch.device):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"a KV pool needs rows >= 1, got {rows!r}")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        self.rows, self.head_dim, self.dtype = rows, head_dim, dtype
        self.keys = torch.empty((rows, head_dim), dtype=dtype, device=device)
        self.values = torch.empty((rows, head_dim), dtype=dtype, device=device)
        self.device = self.keys.device
        self.used = 0  # rows handed out since the current cache began
        self.epoch = 0  # which cache owns the rows: bumped by begin()
        self._states: dict[tuple, list[dict[str, torch.Tensor]]] = {}

    @classmethod
    def for_model(cls, model, *, budget_bytes: int | None = None, rows: int | None = None) -> KVPool:
        """A pool for ``model``'s K/V (its head_dim, dtype, device) of ``rows`` rows, or of as many as
        ``budget_bytes`` holds (K and V: ``2 * head_dim * element size`` bytes a row)."""
        if (budget_bytes is None) == (rows is None):
            raise ValueError("give exactly one of budget_bytes and rows")
        parameter = next(model.parameters())
        head_dim = model.config.head_dim
        if rows is None:
            rows = int(budget_bytes) // cls.bytes_per_row(head_dim, parameter.dtype)
            if rows < 1:
                raise ValueError(f"a memory budget of {budget_bytes} bytes holds no K/V row")
        return cls(rows, head_dim, dtype=parameter.dtype, device=parameter.device)

    @staticmethod
    def bytes_per_row(head_dim: int, dtype: torch.dtype) -> int:
        return 2 * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def begin(self) -> int:
        """Hand every row to a new cache; returns its epoch (caches of older epochs are closed)."""
        self.epoch += 1
        self.used = 0
        return self.epoch

    def allocate(self, rows: int) -> int:
        """``rows`` consecutive free rows; returns the first. Raises :class:`PoolExhausted` past the end."""
        if rows < 0:
            raise ValueError(f"cannot allocate {rows} rows")
        if self.used + rows > self.rows:
            raise PoolExhausted(
                f"KV pool exhausted: {rows} rows asked with {self.used} of {self.rows} in use "
                f"({self.rows * self.bytes_per_row(self.head_dim, self.dtype) / 2**30:.2f} GiB pool); "
                "give the pool a larger memory budget or decode a smaller batch"
            )
        first = self.used
        self.used += rows
        return first

    def state(self, layer_idx: int, batch: int, heads: int, window: int) -> dict[str, torch.Tensor]:
        """Layer ``layer_idx``'s bookkeeping tensors for ``batch`` sequences of ``heads`` KV heads,
        allocated the first time and the same tensors every later time (what a captured graph reads)."""
        key = (batch, heads, window)
        layers = self._states.setdefault(key, [])
        while len(layers) <= layer_idx:
            layers.append({})
        state = layers[layer_idx]
        if not state:
            w1 = window + 1
            with torch.inference_mode(False):  # plain tensors: filled in and out of inference mode
                state.update(
                    starts=torch.empty((batch, heads), dtype=torch.int64, device=self.device),
                    lengths=torch.empty((batch, heads), dtype=torch.int32, device=self.device),
                    ring_slot=torch.empty((batch, heads, w1), dtype=torch.int64, device=self.device),
                    ring_flag=torch.empty((batch, heads, w1), dtype=torch.bool, device=self.device),
                    step_index=torch.empty((batch * heads,), dtype=torch.int64, device=self.device),
                )
        return state
