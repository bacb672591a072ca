"""The compacted DMS KV cache, a transformers ``Cache`` (docs/DMS.md, "Cache and decode").

Per layer and per (batch, KV head), the cache holds only the tokens the next query can still see:
the tokens not marked for eviction plus the last ``window + 1`` tokens. Heads keep different numbers
of tokens, so each layer stores one flat ``[S, D]`` K (and V) buffer cut into per-head segments: head
``(b, h)`` owns rows ``starts[b, h] ..`` of which the first ``lengths[b, h]`` are occupied, followed by
spare rows for decoding. A segment is its head's length + ``capacity_step`` rows: memory follows the
kept tokens of each head, not the context length or the longest head. Slot order is irrelevant to
attention because RoPE is applied before caching.

Decode bookkeeping follows the released code: a ring of ``window + 1`` (slot, flag) entries per head
remembers where the last ``window + 1`` tokens live and whether each was marked. For new token t:
its decision becomes the flag of token t-1; the token leaving the window (t - window - 1) is looked up
in the ring; if it was marked, its slot is reused for token t, else token t is appended. Each step
runs on the device (no ``.item()``). A head grows by at most one row per step, so the host knows when
the spare rows may run out (``capacity_step`` steps after the last re-size); it then reads the lengths
back once (one host sync per ``capacity_step`` steps) and re-sizes each segment to its length +
``capacity_step``, so memory follows the kept tokens while decoding too.

On a :class:`~dms_perf.model.paged.PagedKVPool` (``DMSCache(..., pool=pool)``, the decode engine) a
head's rows are not a segment but pages of the pool listed in its block table (``PagedCacheLayer``):
nothing is copied to grow a head, a head takes a page only when its last one is full, and the
sequences of a batch occupy the pool's slots ``0 .. B - 1``, whose block tables, lengths, ring and
step index are views of the pool's tensors, so that the engine's CUDA graphs outlive the cache.

``DMSReferenceCache`` is the uncompacted counterpart used by the "math" reference model: every K/V
plus every decision, so the rule can be applied as a full mask at each step.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate
from typing import NamedTuple

import torch
import triton
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from dms_perf.model.paged import PagedKVPool
from dms_perf.ops.cache_update.fused_step import fused_decode_step
from dms_perf.ops.cache_update.kernel import decode_update
from dms_perf.ops.cache_update.torch_ops import decode_update_torch
from dms_perf.ops.decode.kernel import dms_decode_attention
from dms_perf.ops.movers.compact import compact_by_bool
from dms_perf.rule import evict_flags

DEFAULT_CAPACITY_STEP = 128
# Heads whose longest host-known row bound is at most this many times the mean decode with per-head splits
# on the paged pool, more uneven ones with the balanced scheduler (decode_schedule) ...
EVEN_SPREAD = 1.15
# ... unless a layer has at least MANY_HEADS heads (B * Hkv) spread at most MANY_HEADS_SPREAD: the per-head
# programs then fill many waves and even out on their own (H100, 1,136-1,152 heads of spread 1.0-1.9: 7-10 %
# faster than the balanced scheduler; benchmarks/NOTES.md, "Session of 2026-12-07 (10)").
MANY_HEADS = 1024
MANY_HEADS_SPREAD = 2.0
# Prefill layers whose packing may wait (each holds its full-length K/V until packed): two layers of
# GPU work stay queued behind the one the host waits for.
MAX_PENDING_LAYERS = 2
# Every per-head tensor of a layer besides K/V (joined along the batch when caches stack).
BOOKKEEPING = ("starts", "lengths", "ring_slot", "ring_flag", "step_index", "capacity")
# The decode state a paged layer keeps in views of its pool's tensors (PagedCacheLayer).
RING_STATE = ("ring_slot", "ring_flag", "step_index")


class DecodeInputs(NamedTuple):
    """Where decode attention finds a layer's cache: ``dms_decode_attention``'s arguments."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    starts: torch.Tensor | None  # [B, Hkv] int64 first rows of contiguous segments, or None when paged
    lengths: torch.Tensor
    max_length: int
    block_table: torch.Tensor | None = None  # [B, Hkv, max_pages] int32 when paged
    page_rows: int | None = None
    schedule: str | None = None  # the decode kernel's scheduler; None: its default

    def attend(self, q: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """Decode attention of ``q`` ``[B, Hq, D]`` over this cache."""
        return dms_decode_attention(q, self.k_cache, self.v_cache, self.starts, self.lengths, self.max_length,
                                    block_table=self.block_table, page_rows=self.page_rows, scale=scale,
                                    schedule=self.schedule)


class DMSCacheLayer(CacheLayerMixin):
    """One layer of :class:`DMSCache`: per-head segments of a flat K/V buffer, lengths and the ring."""

    is_compileable = False
    is_sliding = False

    def __init__(self, window: int, capacity_step: int = DEFAULT_CAPACITY_STEP, *, layer_idx: int = 0):
        super().__init__()
        self.window = window
        self.capacity_step = capacity_step
        self.layer_idx = layer_idx
        self.block_table: torch.Tensor | None = None  # paged layers only (PagedCacheLayer)
        self.page_rows: int | None = None
        self.starts: torch.Tensor | None = None  # [B, Hkv] int64, first row of each segment
        self.capacity: torch.Tensor | None = None  # [B, Hkv] int64, rows of each segment
        self.lengths: torch.Tensor | None = None  # [B, Hkv] int32, occupied rows
        self.ring_slot: torch.Tensor | None = None
        self.ring_flag: torch.Tensor | None = None
        self.seen = 0
        self.step_index: torch.Tensor | None = None  # [B * Hkv] int64: index of the next token, on the device
        self._pending = None  # a prefill's (keys, values, keep, sizes, ready event) until packed
        # Host-known upper bound of lengths until the next re-size: the longest head at the last
        # re-size + the steps until the next (fixed in between, so a captured step stays valid).
        self.longest_bound = 0
        self.spare_steps = 0  # decode steps every segment can still take without growing
        self.host_frozen = False  # while a CUDA graph captures a step: device work only (dms_perf/dms/graph.py)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "DMSCache needs the DMS decisions with every update: call DMSCache.append(layer_idx, k, v, decisions)"
        )

    def prefill(self, keys: torch.Tensor, values: torch.Tensor, decisions: torch.Tensor) -> None:
        """Store the tokens the last prefill query sees (K/V ``[B, Hkv, N, D]``, decisions ``[B, Hkv, N]``).

        Sizing the buffer needs three numbers from the device (rows, kept total, longest head). They are
        copied back asynchronously and the packing waits in ``_pending`` until ``finish_prefill``: a
        blocking read per layer would drain the GPU's queue 36 times a prefill and expose the host's
        per-layer Python time (benchmarks/NOTES.md).
        """
        self.lazy_initialization(keys, values)
        B, H, N, D = keys.shape
        w1, step = self.window + 1, self.capacity_step
        evict = evict_flags(decisions)
        in_window = torch.arange(N, device=keys.device) >= N - w1
        keep = in_window | ~evict
        rank = keep.cumsum(-1) - 1
        self.lengths = keep.sum(-1, dtype=torch.int32)
        self.capacity = self.lengths.long() + step
        self.starts = self.capacity.flatten().cumsum(0).view(B, H) - self.capacity
        # Sizes, then every head's length (a paged layer hands out pages by them).
        totals = torch.cat([torch.stack([self.capacity.sum(), self.lengths.sum().long(), self.lengths.max().long()]),
                            self.lengths.flatten().long()])
        ready = None
        if totals.is_cuda:
            totals = totals.to("cpu", non_blocking=True)  # into pinned memory, in stream order
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (keys, values, keep, totals, ready)
        self.spare_steps = step

        # Ring entry j % (window + 1) describes token j (slot = row within its head's segment) for
        # the last window + 1 tokens; entries of tokens before 0 stay (slot 0, unflagged) so that
        # they never free a slot.
        self.ring_slot = torch.zeros((B, H, w1), dtype=torch.int64, device=keys.device)
        self.ring_flag = torch.zeros((B, H, w1), dtype=torch.bool, device=keys.device)
        last = torch.arange(max(0, N - w1), N, device=keys.device)
        self.ring_slot[:, :, last % w1] = rank[:, :, last]
        self.ring_flag[:, :, last % w1] = evict[:, :, last]
        self.step_index = torch.full((B * H,), N, dtype=torch.int64, device=keys.device)
        self.seen = N
        self.is_initialized = True

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def finish_prefill(self) -> None:
        """Pack the prefill's kept K/V into the per-head segments (waits for the sizes if needed)."""
        if self._pending is None:
            return
        self.check_open()
        keys, values, keep, totals, ready = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        rows, kept, longest = totals[:3].tolist()
        self.longest_bound = longest + self.spare_steps
        packed_head = torch.repeat_interleave(
            torch.arange(self.lengths.numel(), device=keys.device), self.lengths.flatten(), output_size=kept
        )
        self._store_prefill(keys, values, keep, kept, packed_head, totals, rows)

    def _store_prefill(self, keys, values, keep, kept: int, packed_head, totals, rows: int) -> None:
        """Write the prefill's kept K/V (``kept`` rows; ``packed_head``: the head of each packed row):
        into a buffer of ``rows`` rows, head i's segment i * capacity_step rows further down than its
        packed rows (the spare rows of the heads before it)."""
        D = keys.shape[-1]
        dest = torch.arange(kept, device=keys.device) + packed_head * self.capacity_step
        for name, src in (("keys", keys), ("values", values)):
            packed, _, _ = compact_by_bool(src, keep, total=kept)
            buffer = torch.empty((rows, D), dtype=src.dtype, device=src.device)
            buffer.index_copy_(0, dest, packed)
            setattr(self, name, buffer)

    def check_open(self) -> None:
        """Raises if the cache was closed (only a cache on a pool can be: ``PagedCacheLayer``)."""

    def decode(self, keys: torch.Tensor, values: torch.Tensor, decisions: torch.Tensor) -> None:
        """Add one token per sequence (``[B, Hkv, 1, D]``, decisions ``[B, Hkv, 1]``) by the DMS rule."""
        self._before_step()
        if self.block_table is not None:
            raise NotImplementedError("a cache on a paged KV pool decodes with the triton backend's step only")
        decode_update_torch(self.ring_slot, self.ring_flag, self.lengths, self.starts, self.keys, self.values,
                            keys, values, decisions, self.seen, self.window)
        self.step_index += 1
        self._after_step()

    def decode_step(self, q, keys, values, alphas, alpha_scale: float, alpha_offset: float,
                    zero_borrowed: bool = True) -> None:
        """``decode`` in one Triton launch, the decisions computed from ``alphas`` (the borrowed channel
        before RoPE, fp32 ``[B, Hkv, 1]``) on the device; also zeroes the rotated query's borrowed
        channel in place (``dms_perf.ops.cache_update.kernel``)."""
        self._before_step()
        decode_update(self.ring_slot, self.ring_flag, self.lengths, self.starts, self.keys, self.values,
                      keys, values, alphas, q, self.step_index, self.window, alpha_scale, alpha_offset,
                      zero_borrowed=zero_borrowed, block_table=self.block_table, page_rows=self.page_rows)
        self._after_step()

    def fused_step(self, qkv, q_norm_weight, k_norm_weight, eps, cos, sin, alpha_scale: float,
                   alpha_offset: float, zero_borrowed: bool = True) -> torch.Tensor:
        """``decode_step`` with the q/k norms and RoPE folded in, from the fused projection's row
        (``dms_perf.ops.cache_update.fused_step``); returns the rotated query ``[B, Hq, D]``."""
        self._before_step()
        q = fused_decode_step(qkv, q_norm_weight, k_norm_weight, eps, cos, sin, self.ring_slot, self.ring_flag,
                              self.lengths, self.starts, self.keys, self.values, self.step_index,
                              alpha_scale, alpha_offset, zero_borrowed=zero_borrowed,
                              block_table=self.block_table, page_rows=self.page_rows)
        self._after_step()
        return q

    def _before_step(self) -> None:
        if self.host_frozen:  # capturing: the graph's owner checked that no re-size is due
            return
        self.check_open()
        self.finish_prefill()
        if self.spare_steps == 0:
            self._grow()

    def _after_step(self) -> None:
        if not self.host_frozen:
            self.advance_host()

    def advance_host(self) -> None:
        """The host's share of a decode step (the device's is in the kernels): one token more, one
        spare row less. A replayed CUDA graph runs the kernels only, so its owner calls this."""
        self.spare_steps -= 1
        self.seen += 1

    def _grow(self) -> None:
        """Re-size every segment to its head's length + ``capacity_step`` rows (never shrinking one).

        Runs once per ``capacity_step`` decode steps and reads the lengths back (one host sync): heads
        whose appends were absorbed by reused slots keep their size, so memory keeps following each
        head's kept tokens during decoding instead of growing with the steps. Only occupied rows move.
        """
        step = self.capacity_step
        lengths = self.lengths.flatten().long()
        capacity = torch.maximum(self.capacity, self.lengths.long() + step)
        rows, longest, occupied = torch.stack([capacity.sum(), lengths.max(), lengths.sum()]).tolist()
        device = lengths.device
        head = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=occupied)
        offset = torch.arange(occupied, device=device) - (lengths.cumsum(0) - lengths)[head]
        source = self.starts.flatten()[head] + offset
        starts = capacity.flatten().cumsum(0).view_as(self.starts) - capacity
        dest = starts.flatten()[head] + offset
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty((rows, old.shape[1]), dtype=old.dtype, device=old.device)
            new.index_copy_(0, dest, old.index_select(0, source))
            setattr(self, name, new)
        self.capacity = capacity
        self.starts = starts
        self.longest_bound = longest + step
        self.spare_steps = step

    @property
    def launch_length(self) -> int:
        """The ``max_length`` decode attention is launched with: the power of two at or above the longest
        head's bound (it only caps the number of splits), so that a captured launch fits many layouts."""
        return triton.next_power_of_2(max(1, self.longest_bound))

    @classmethod
    def stacked(cls, layers: list[DMSCacheLayer]) -> DMSCacheLayer:
        """One layer holding the sequences of ``layers`` (each prefilled, same tokens seen) as one batch.

        Segments are copied back to back; ``starts`` are moved by the rows before them, ring slots are
        relative to their segment and stay as they are.
        """
        out = cls(layers[0].window, layers[0].capacity_step)
        parts, rows = [], 0
        for layer in layers:
            parts.append(layer._prefilled()._part(rows))
            rows += layer.keys.shape[0]
        out._join(parts, torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]))
        return out

    def _prefilled(self) -> DMSCacheLayer:
        self.finish_prefill()
        if not self.is_initialized:
            raise ValueError("only prefilled layers stack into one batch")
        return self

    def _part(self, first_row: int) -> dict:
        """This layer's bookkeeping for a batch whose K/V rows hold its segments from ``first_row`` on."""
        part = {name: getattr(self, name) for name in BOOKKEEPING}
        part.update(starts=self.starts + first_row, seen=self.seen, window=self.window,
                    longest_bound=self.longest_bound, spare_steps=self.spare_steps)
        return part

    def _join(self, parts: list[dict], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Become the batch of ``parts`` (``_part``, in order) over the K/V buffers ``keys`` / ``values``;
        the bookkeeping goes to their device (the parts may come from a cache on the host)."""
        first = parts[0]
        if any(p["seen"] != first["seen"] or p["window"] != self.window for p in parts):
            raise ValueError(
                "only prefilled layers that have seen the same number of tokens (and share a window) stack "
                f"into one batch; got seen={[p['seen'] for p in parts]}, window={[p['window'] for p in parts]}"
            )
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        for name in BOOKKEEPING:
            setattr(self, name, torch.cat([p[name] for p in parts]).to(self.device))
        self.seen = first["seen"]
        self.longest_bound = max(p["longest_bound"] for p in parts)
        self.spare_steps = min(p["spare_steps"] for p in parts)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # transformers 5.2 passes cache_position, later versions the query length.
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:  # abstract in later transformers: -1 = no maximum
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in transformers 5.2
        return -1

    def reset(self) -> None:
        self.__init__(self.window, self.capacity_step, layer_idx=self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("DMSCache does not support beam search (reorder_cache)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DMSCache cannot be cropped: eviction is final (docs/DMS.md)")

    def nbytes(self) -> int:
        """Bytes this layer holds: its K/V rows (spare rows included) and bookkeeping."""
        self.finish_prefill()
        if self.keys is None:
            return 0
        tensors = [getattr(self, name) for name in BOOKKEEPING]
        return 2 * self.keys.shape[0] * self.keys[0].nbytes + sum(t.numel() * t.element_size() for t in tensors
                                                                  if t is not None)

    @property
    def schedule(self) -> str | None:
        """The decode kernel's scheduler for this layer's next step; None (the kernel's default) here."""
        return None

    def decode_inputs(self) -> DecodeInputs:
        return DecodeInputs(self.keys, self.values, self.starts, self.lengths, self.launch_length,
                            self.block_table, self.page_rows, self.schedule)


def decode_schedule(spread: float, heads: int) -> str:
    """The decode scheduler for a layer of ``heads`` heads (``B * Hkv``) whose longest row bound is ``spread``
    times their mean: ``"per_head"`` while they hold about as many rows (``EVEN_SPREAD``), or are many
    (``MANY_HEADS``) and at most ``MANY_HEADS_SPREAD`` uneven; else ``"balanced"`` (benchmarks/NOTES.md:
    per-head splits cost 1-3 % less on even heads; on a few uneven ones the longest head sets their time,
    which the balanced scheduler evens out)."""
    if spread <= EVEN_SPREAD or (heads >= MANY_HEADS and spread <= MANY_HEADS_SPREAD):
        return "per_head"
    return "balanced"


class PagedCacheLayer(DMSCacheLayer):
    """A layer of a :class:`DMSCache` on a :class:`~dms_perf.model.paged.PagedKVPool`: each head's rows are
    the pages its block table lists (docs/DMS.md, "Cache and decode"); the batch's sequences occupy the
    pool's slots ``0 .. B - 1``.

    The pool, not the layer, owns the memory and the per-head state: ``keys`` / ``values`` are the pool's
    pages viewed as ``[pages * page_rows, D]``, and ``block_table``, ``lengths``, the ring and the step
    index are views of the pool's tensors, so their addresses never change (a captured decode step stays
    valid for every later cache of the same batch size). Ring slots are logical rows of a head, as in a
    segment. Pages are handed out on the host ahead of need: every ``capacity_step`` decode steps the
    first layer returns the pages slot reuse left empty (``PagedKVPool.trim``, by lengths whose read-back
    started a hand-out earlier, so the device never drains) and reserves pages for ``capacity_step`` more
    rows per head (``PagedKVPool.hand_out``): no decode step copies a row.
    """

    def __init__(self, window: int, capacity_step: int = DEFAULT_CAPACITY_STEP, *, pool: PagedKVPool,
                 layer_idx: int = 0, epoch: int = 0):
        super().__init__(window, capacity_step, layer_idx=layer_idx)
        self.pool, self.epoch = pool, epoch
        self.page_rows = pool.page_rows
        self.batch = 0

    def reset(self) -> None:
        self.__init__(self.window, self.capacity_step, pool=self.pool, layer_idx=self.layer_idx, epoch=self.epoch)

    def check_open(self) -> None:
        if self.pool.epoch != self.epoch:
            raise RuntimeError(
                "this DMSCache was closed: a newer cache on its KV pool holds the pages (one cache per pool "
                "at a time; docs/DMS.md, 'Cache and decode')"
            )

    def _store_prefill(self, keys, values, keep, kept: int, packed_head, totals, rows: int) -> None:
        """Hand out each head's pages (``PagedKVPool.prefill_layer``) and write the kept rows into them."""
        self.check_open()
        B, H, _, D = keys.shape
        lengths = totals[3:].numpy().reshape(B, H)
        self._take_slots(B)
        self.pool.prefill_layer(self.layer_idx, range(B), lengths)
        lengths_flat = self.lengths.flatten()
        row_in_head = torch.arange(kept, device=keys.device) - (lengths_flat.cumsum(0) - lengths_flat)[packed_head]
        dest = self._physical(packed_head, row_in_head)
        for name, src in (("keys", keys), ("values", values)):
            packed, _, _ = compact_by_bool(src, keep, total=kept)
            getattr(self.pool, name).view(-1, D).index_copy_(0, dest, packed)
        self._bind(B)

    def _take_slots(self, batch: int, first: int = 0) -> None:
        """Admit slots ``first .. batch - 1`` for this cache's sequences (the first layer to store does)."""
        if self.pool.window != self.window:
            raise ValueError(f"the KV pool keeps rings for window {self.pool.window}, the cache has {self.window}")
        live = set(self.pool.live_slots)
        for slot in range(first, batch):
            if slot not in live:
                self.pool.admit(slot)

    def _physical(self, head: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Pool rows (index into the pages viewed as ``[-1, D]``) of logical rows ``row`` of heads ``head``
        (flat ``b * Hkv + h``)."""
        tables = self.pool.block_table[self.layer_idx].view(-1, self.pool.max_pages_per_head)
        P = self.page_rows
        return tables[head, row // P].long() * P + row % P

    def _bind(self, batch: int) -> None:
        """Point this layer at the pool's views for slots ``0 .. batch - 1``, carrying the ring and step
        index computed at prefill (or copied from a single cache) into them."""
        pool, layer, H = self.pool, self.layer_idx, self.pool.kv_heads
        views = {"ring_slot": pool.ring_slot[layer, :batch], "ring_flag": pool.ring_flag[layer, :batch],
                 "step_index": pool.step_index[layer, : batch * H]}
        for name, view in views.items():
            value = getattr(self, name)
            if value is not None and value is not view:
                view.copy_(value)
            setattr(self, name, view)
        self.keys = pool.keys.view(-1, pool.head_dim)
        self.values = pool.values.view(-1, pool.head_dim)
        self.block_table = pool.block_table[layer, :batch]
        self.lengths = pool.lengths[layer, :batch]
        self.starts = self.capacity = None
        self.batch = batch
        self.spare_steps = pool.room(batch)
        self.dtype, self.device = pool.dtype, pool.device
        self.is_initialized = True

    def copy_in(self, slot: int, layer: DMSCacheLayer, *, same_tokens: bool = True) -> None:
        """Copy the prefilled single-sequence layer ``layer`` (a cache owning its buffers) into slot ``slot``
        of the pool: its heads' rows into fresh pages, its ring and step index into the slot's state.
        ``same_tokens``: refuse a layer that has seen another number of tokens than this one's batch."""
        self.check_open()
        layer = layer._prefilled()
        if layer.lengths.shape[0] != 1:
            raise ValueError(f"copy_in takes one sequence at a time, got a batch of {layer.lengths.shape[0]}")
        if same_tokens and self.is_initialized and layer.seen != self.seen:
            raise ValueError(f"only caches that have seen as many tokens join one batch: {layer.seen} vs {self.seen}")
        host = layer.lengths.flatten().cpu()
        self._take_slots(slot + 1, slot)
        self.pool.prefill_layer(self.layer_idx, [slot], host.view(1, -1))
        self._copy_rows(slot, [layer], host.view(1, -1))
        self.seen, self.window = layer.seen, layer.window

    def _copy_rows(self, slot: int, sources: list[DMSCacheLayer], host: torch.Tensor) -> None:
        """``copy_in``'s device part for this layer and the ones after it, once the pool has given slot
        ``slot``'s heads their rows: ``sources[i]`` (a one-sequence layer owning its buffers) goes into layer
        ``layer_idx + i``; ``host`` ``[len(sources), kv_heads]`` is their lengths, as read back. One gather
        and one scatter for K and for V, whatever the number of layers; waits for nothing."""
        pool, H, P, D = self.pool, self.pool.kv_heads, self.page_rows, self.pool.head_dim
        first, n = self.layer_idx, len(sources)
        device = sources[0].lengths.device
        lengths = torch.cat([layer.lengths.flatten() for layer in sources]).long()
        # Each source's segment starts, offset by the rows of the sources before it in the joined buffers
        offsets = torch.tensor(list(accumulate((layer.keys.shape[0] for layer in sources[:-1]), initial=0)),
                               device=device)
        starts = (torch.stack([layer.starts.flatten() for layer in sources]) + offsets[:, None]).flatten()
        occupied = int(host.sum())
        head = torch.repeat_interleave(torch.arange(n * H, device=device), lengths, output_size=occupied)
        row = torch.arange(occupied, device=device) - (lengths.cumsum(0) - lengths)[head]
        source = starts[head] + row
        tables = pool.block_table[first : first + n, slot].reshape(n * H, pool.max_pages_per_head)
        head, row = head.to(pool.device), row.to(pool.device)
        dest = tables[head, row // P].long() * P + row % P
        for name in ("keys", "values"):
            joined = torch.cat([getattr(layer, name) for layer in sources]) if n > 1 else getattr(sources[0], name)
            getattr(pool, name).view(-1, D).index_copy_(0, dest, joined.index_select(0, source).to(pool.device))
        for name in ("ring_slot", "ring_flag"):
            getattr(pool, name)[first : first + n, slot].copy_(torch.cat([getattr(layer, name) for layer in sources]))
        pool.step_index[first : first + n, slot * H : (slot + 1) * H].copy_(
            torch.stack([layer.step_index for layer in sources]))

    def _before_step(self) -> None:
        if self.host_frozen:
            return
        self.check_open()
        self.finish_prefill()
        if self.layer_idx == 0 and self.pool.room(self.batch) < 1:
            # Return the pages slot reuse left empty (by lengths read back earlier, without draining the
            # device) and give pages for capacity_step more steps (PagedKVPool.hand_out).
            self.pool.hand_out(self.capacity_step)
        self.spare_steps = self.pool.room(self.batch)

    def advance_host(self) -> None:
        self.seen += 1
        if self.layer_idx == 0:  # the pool counts steps per sequence, for all layers at once
            self.pool.advance(1)
        self.spare_steps = self.pool.room(self.batch)

    @property
    def launch_length(self) -> int:
        """The power of two above the longest head's bound in any layer: one value for all layers, so that a
        decode graph is keyed by the batch's longest head only (per-layer values crossing powers of two at
        different steps captured a graph for each combination)."""
        return triton.next_power_of_2(max(1, self.pool.longest_bound(None, self.batch)))

    @property
    def schedule(self) -> str:
        """``decode_schedule`` of the batch's heads: one value for all layers, from host-known bounds
        (``PagedKVPool.bound_spread``), so that a decode graph is keyed by it once."""
        return decode_schedule(self.pool.bound_spread(self.batch), self.batch * self.pool.kv_heads)

    def nbytes(self) -> int:
        """Bytes of the pages this layer's heads hold and of their state in the pool (host figures: no sync)."""
        if not self.is_initialized:
            return 0
        pool = self.pool
        pages = pool.pages_of(self.batch, self.layer_idx) * pool.page_bytes(pool.page_rows, pool.head_dim, pool.dtype)
        return pages + pool.table_bytes(1, self.batch, pool.kv_heads, pool.max_pages_per_head, pool.window)


class DMSCache(Cache):
    """Compacted DMS KV cache for all layers of a Qwen3-DMS model (see the module docstring).

    ``append(layer_idx, keys, values, decisions)`` is the only way in: a first call with N tokens is
    the prefill, later calls add one token each (the released code likewise supports one prefill
    followed by decoding).
    """

    def __init__(self, num_layers: int, window: int, capacity_step: int = DEFAULT_CAPACITY_STEP, *,
                 pool: PagedKVPool | None = None):
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if capacity_step < 1:
            raise ValueError(f"capacity_step must be >= 1, got {capacity_step}")
        if pool is None:
            layers = [DMSCacheLayer(window, capacity_step, layer_idx=i) for i in range(num_layers)]
        else:
            if pool.layers != num_layers or pool.window != window:
                raise ValueError(f"the KV pool serves {pool.layers} layers with window {pool.window}; the cache "
                                 f"has {num_layers} layers, window {window}")
            # A cache on a pool takes all its slots: the pool's previous cache is closed from here on.
            epoch = pool.begin()
            layers = [PagedCacheLayer(window, capacity_step, pool=pool, layer_idx=i, epoch=epoch)
                      for i in range(num_layers)]
        super().__init__(layers=layers)
        self.window, self.pool = window, pool
        self._pending_layers: list[DMSCacheLayer] = []
        # Leave every prefill layer's packing pending (not MAX_PENDING_LAYERS): its prefill then never waits for
        # the device, and the cache's next use packs it. For a prefill launched on a side stream beside other
        # work (the request stream's overlap_prefill), which the host must not wait for layer by layer.
        self.pack_later = False

    def append(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, decisions: torch.Tensor,
        *, defer_packing: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """Add tokens to layer ``layer_idx``.

        Returns ``(k_cache [S, D], v_cache [S, D], starts [B, Hkv], lengths [B, Hkv], max_length)``,
        the arguments of ``dms_decode_attention``. ``defer_packing`` (prefill only; returns None): leave
        the layer's packing pending, so that the model's prefill does not wait for the GPU at every
        layer. At most ``MAX_PENDING_LAYERS`` layers stay pending (the oldest is packed first, waiting
        for a layer the GPU finished long ago), all of them with ``pack_later``; ``finish_prefill()`` packs
        the rest.
        """
        layer = self.layers[layer_idx]
        n = keys.shape[2]
        if keys.shape != values.shape or decisions.shape != keys.shape[:3] or decisions.dtype != torch.bool:
            raise ValueError(
                f"expected keys = values [B, Hkv, N, D] and bool decisions [B, Hkv, N]; got keys "
                f"{tuple(keys.shape)}, values {tuple(values.shape)}, decisions {tuple(decisions.shape)} "
                f"{decisions.dtype}"
            )
        if not layer.is_initialized:
            layer.prefill(keys, values, decisions)
            if defer_packing:
                self._pending_layers.append(layer)
                while not self.pack_later and len(self._pending_layers) > MAX_PENDING_LAYERS:
                    self._pending_layers.pop(0).finish_prefill()
                return None
            layer.finish_prefill()
        elif n == 1:
            if keys.shape[:2] != layer.lengths.shape:
                raise ValueError(
                    f"batch/heads {tuple(keys.shape[:2])} differ from the cache's {tuple(layer.lengths.shape)}"
                )
            layer.decode(keys, values, decisions)
        else:
            raise ValueError(
                f"DMSCache takes one prefill followed by one token per step; got {n} tokens after "
                f"{layer.seen} cached (docs/DMS.md: the released code supports only this)"
            )
        return layer.keys, layer.values, layer.starts, layer.lengths, layer.launch_length

    def append_step(
        self, layer_idx: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alphas: torch.Tensor,
        alpha_scale: float, alpha_offset: float, zero_borrowed: bool = True,
    ) -> DecodeInputs:
        """One decode token in one launch (``DMSCacheLayer.decode_step``); returns the layer's
        ``DecodeInputs`` (``.attend(q)`` runs decode attention over it).

        ``q`` ``[B, Hq, 1, D]`` is the rotated query (its borrowed channels are zeroed in place),
        ``alphas`` fp32 ``[B, Hkv, 1]`` the borrowed channel before RoPE.
        """
        layer = self.layers[layer_idx]
        if not layer.is_initialized or keys.shape[2] != 1 or keys.shape[:2] != layer.lengths.shape:
            raise ValueError(
                f"append_step adds one token per (batch, KV head) after a prefill; got keys {tuple(keys.shape)}"
            )
        layer.decode_step(q, keys, values, alphas, alpha_scale, alpha_offset, zero_borrowed)
        return layer.decode_inputs()

    def append_fused_step(
        self, layer_idx: int, qkv, q_norm_weight, k_norm_weight, eps: float, cos, sin, alpha_scale: float,
        alpha_offset: float, zero_borrowed: bool = True,
    ) -> tuple[torch.Tensor, DecodeInputs]:
        """One decode token from the fused q/k/v projection ``qkv`` ``[B, 1, (Hq + 2 Hkv) * D]`` in one
        launch (``DMSCacheLayer.fused_step``); returns the rotated query ``[B, Hq, D]`` and the layer's
        ``DecodeInputs``."""
        layer = self.layers[layer_idx]
        one_token = qkv.numel() // max(qkv.shape[0], 1) == qkv.shape[-1]
        if not layer.is_initialized or qkv.shape[0] != layer.lengths.shape[0] or not one_token:
            raise ValueError(
                f"append_fused_step adds one token per sequence after a prefill; got qkv {tuple(qkv.shape)}"
            )
        q = layer.fused_step(qkv, q_norm_weight, k_norm_weight, eps, cos, sin, alpha_scale, alpha_offset, zero_borrowed)
        return q, layer.decode_inputs()

    def set_batch(self, batch: int) -> None:
        """A cache on a paged pool decodes slots ``0 .. batch - 1`` from now on (a request stream's batch
        bucket: slots past the live sequences hold no pages, so their steps read and write nothing)."""
        if self.pool is None:
            raise ValueError("set_batch is for a cache on a paged KV pool")
        if not 1 <= batch <= self.pool.max_seqs:
            raise ValueError(f"batch must lie in [1, {self.pool.max_seqs}], got {batch}")
        for layer in self.layers:
            for name in RING_STATE:
                setattr(layer, name, None)  # views of the pool already: nothing to carry over
            layer._bind(batch)

    def admit(self, slot: int, single: DMSCache, *, lengths: torch.Tensor | None = None) -> None:
        """Copy the prefilled one-sequence cache ``single`` (owning its buffers) into the free slot ``slot`` of
        this cache's paged pool, whatever the tokens it has seen (a request stream's new request; its
        positions are the caller's). ``lengths``: its heads' rows ``[layers, kv_heads]`` on the host if the
        caller read them back already (else one read-back here). All or nothing: short of pages, the slot is
        released and ``PagesExhausted`` raised."""
        if self.pool is None:
            raise ValueError("admit is for a cache on a paged KV pool")
        single.finish_prefill()
        if len(single.layers) != len(self.layers):
            raise ValueError(f"the cache has {len(self.layers)} layers, the admitted one {len(single.layers)}")
        theirs = [layer._prefilled() for layer in single.layers]
        for layer in theirs:
            if layer.lengths.shape[0] != 1:
                raise ValueError(f"admit takes one sequence, got a batch of {layer.lengths.shape[0]}")
        # One read-back of every layer's lengths and one hand-out for them all, then the copies (no wait)
        host = single.head_lengths_on_host() if lengths is None else lengths
        if tuple(host.shape) != (len(self.layers), theirs[0].lengths.numel()):
            raise ValueError(f"lengths must be [layers, kv_heads] = [{len(self.layers)}, {theirs[0].lengths.numel()}]"
                             f", got {list(host.shape)}")
        try:
            self.layers[0]._take_slots(slot + 1, slot)
            self.pool.prefill(slot, host)
            for mine, layer in zip(self.layers, theirs, strict=True):
                mine.check_open()
                mine.seen, mine.window = layer.seen, layer.window
            self.layers[0]._copy_rows(slot, theirs, host)
        except BaseException:
            if slot in self.pool.live_slots:
                self.pool.release(slot)
            raise

    def prepare_step(self) -> None:
        """The host's work before a decode step (packing a deferred prefill, a re-size when due), done
        ahead so that a replayed graph step needs none; a step on a closed cache raises here."""
        for layer in self.layers:
            layer._before_step()

    @classmethod
    def stacked(cls, caches: Iterable[DMSCache], *, pool: PagedKVPool | None = None,
                consume: bool = False) -> DMSCache:
        """One batch cache from caches of single prefills with the same number of tokens seen: sequence
        i of the result is ``caches[i]``'s batch, in order. A batch is then prefilled sequence by
        sequence (peak memory: one sequence's activations) and decoded together.

        ``pool``: the result lives on this paged pool (the caches own their buffers; each is copied into
        pages of slot i). ``caches`` may then be an iterator that prefills each cache when asked, so that
        the peak is the pool plus one sequence; ``consume``: empty each cache once copied (for caches the
        caller still references). One cache may be given several times (``[template] * B``) unless
        ``consume``.
        """
        if pool is None:
            caches = list(caches)
            if not caches:
                raise ValueError("stacked() needs at least one cache")
            if len({len(c.layers) for c in caches}) != 1:
                raise ValueError(f"caches differ in their number of layers: {[len(c.layers) for c in caches]}")
            for cache in caches:
                cache.finish_prefill()
            first = caches[0]
            out = cls(len(first.layers), first.window, first.layers[0].capacity_step)
            out.layers = [DMSCacheLayer.stacked([c.layers[i] for c in caches]) for i in range(len(first.layers))]
            return out
        out = None
        batch = 0
        for cache in caches:
            if cache.pool is not None:
                raise ValueError("stacked(pool=...) copies caches that own their buffers into the pool")
            cache.finish_prefill()
            if out is None:
                out = cls(len(cache.layers), cache.window, cache.layers[0].capacity_step, pool=pool)
            if len(cache.layers) != len(out.layers) or cache.window != out.window:
                raise ValueError("caches differ in their number of layers or window")
            if batch >= pool.max_seqs:
                raise ValueError(f"the KV pool has {pool.max_seqs} sequence slots, the batch has more")
            for i, layer in enumerate(cache.layers):
                out.layers[i].copy_in(batch, layer)
                if consume:
                    cache.layers[i] = DMSCacheLayer(cache.window, layer.capacity_step)  # freed now
            batch += 1
        if out is None:
            raise ValueError("stacked() needs at least one cache")
        for layer in out.layers:
            layer._bind(batch)
        return out

    @classmethod
    def repeated(cls, template: DMSCache, batch: int, *, pool: PagedKVPool | None = None,
                 consume: bool = False) -> DMSCache:
        """A batch of ``batch`` copies of the single prefilled ``template`` (as ``stacked([template] *
        batch)``), copied layer by layer, on ``pool`` or in buffers of its own; ``consume``: empty each
        template layer once copied (the peak holds the batch and one layer of the template, not a whole
        extra sequence)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if pool is not None and template.pool is not None:
            raise ValueError("repeated() copies a cache that owns its buffers into the pool")
        if pool is not None and batch > pool.max_seqs:
            raise ValueError(f"the KV pool has {pool.max_seqs} sequence slots, fewer than the batch of {batch}")
        template.finish_prefill()
        out = cls(len(template.layers), template.window, template.layers[0].capacity_step, pool=pool)
        for i, layer in enumerate(template.layers):
            if pool is None:
                out.layers[i] = DMSCacheLayer.stacked([layer] * batch)
            else:
                for slot in range(batch):
                    out.layers[i].copy_in(slot, layer)
                out.layers[i]._bind(batch)
            if consume:
                template.layers[i] = DMSCacheLayer(template.window, layer.capacity_step)
        return out

    @classmethod
    def from_dense(cls, cache: Cache, window: int, capacity_step: int = DEFAULT_CAPACITY_STEP) -> DMSCache:
        """A DMSCache holding every K/V of a transformers cache (``[B, H, L, D]`` per layer, e.g. a kvpress
        press's compressed prefill), none marked: decoded by a model with eviction off, it attends to
        exactly those tokens plus the new ones, on the DMS engine's kernels and graphs."""
        out = cls(len(cache.layers), window, capacity_step)
        for index, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            if keys is None or keys.dim() != 4:
                raise ValueError(f"layer {index} of the cache holds no [B, H, L, D] keys")
            unmarked = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device)
            out.append(index, keys, values, unmarked)
        return out

    def to(self, device) -> DMSCache:
        """Move a cache that owns its buffers to ``device`` (e.g. a template parked on the host while a KV
        pool is allocated); returns self."""
        if self.pool is not None:
            raise ValueError("a cache on a KV pool lives in the pool's buffers: it cannot move")
        self.finish_prefill()
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("keys", "values", *BOOKKEEPING):
                    setattr(layer, name, getattr(layer, name).to(device))
                layer.device = layer.keys.device
        return self

    def finish_prefill(self) -> None:
        """Pack every layer whose prefill packing was deferred (one wait, for the newest)."""
        for layer in self._pending_layers:
            layer.finish_prefill()
        self._pending_layers.clear()

    def head_lengths(self, layer_idx: int) -> torch.Tensor:
        """``[B, Hkv]`` int32: tokens held per (batch, KV head) in layer ``layer_idx``."""
        return self.layers[layer_idx].lengths

    def head_lengths_on_host(self) -> torch.Tensor:
        """``[layers, B * Hkv]`` int32 on the host: every layer's ``head_lengths``, in one read-back (on the
        current stream)."""
        return torch.stack([layer.lengths.flatten() for layer in self.layers]).cpu()

    def segment_rows(self) -> int:
        """K/V rows the heads' segments hold (occupied and spare): what a KV pool needs for this cache."""
        self.finish_prefill()
        held = [layer.capacity.sum() for layer in self.layers if layer.is_initialized]
        return int(torch.stack(held).sum()) if held else 0  # one read back, not one per layer

    def kv_bytes(self) -> int:
        """Bytes allocated by the cache (K/V buffers with their spare rows, and the bookkeeping)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_kv_bytes(self) -> int:
        """Bytes of the occupied K/V slots only (synchronizes: for reporting)."""
        self.finish_prefill()
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                per_token = 2 * layer.keys.shape[-1] * layer.keys.element_size()
                total += int(layer.lengths.sum()) * per_token
        return total


class DMSReferenceCache(DynamicCache):
    """Uncompacted cache of the "math" reference model: every K/V (DynamicCache) and every decision."""

    def __init__(self):
        super().__init__()
        self.decisions: list[torch.Tensor] = []

    def append(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, decisions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store everything; returns all keys, values ``[B, Hkv, T, D]`` and decisions ``[B, Hkv, T]``."""
        all_keys, all_values = self.update(keys, values, layer_idx)
        if layer_idx == len(self.decisions):
            self.decisions.append(decisions)
        else:
            self.decisions[layer_idx] = torch.cat([self.decisions[layer_idx], decisions], dim=-1)
        return all_keys, all_values, self.decisions[layer_idx]


def kv_cache_bytes(past_key_values: Cache | None) -> int:
    """Bytes held by a KV cache: ``DMSCache.kv_bytes()``, or the K/V tensors of any layered Cache."""
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, DMSCache):
        return past_key_values.kv_bytes()
    total = 0
    for layer in past_key_values.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
