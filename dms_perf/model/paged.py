"""A paged KV pool shared by every head of every sequence (docs/DMS.md, "Cache and decode").

DMS heads keep different numbers of tokens, and a head's count only grows while decoding (a token is
appended or takes over the slot of a marked token leaving the window). The pool therefore hands out
K/V in fixed-size pages: a head takes a new page only when its last one is full, nothing is ever
copied to grow a head, and a sequence that ends returns its pages to a free list that every head of
every later sequence draws from. Memory follows each head's kept tokens for any output length.

Device tensors, allocated once (their addresses never change, so a captured CUDA graph stays valid):

``keys``, ``values``  ``[num_pages, page_rows, head_dim]`` in ``dtype``: the pages.
``block_table``       ``[layers, max_seqs, kv_heads, max_pages_per_head]`` int32: entry ``j`` of head
                      ``(l, s, h)`` is the page holding its rows ``j * page_rows ..``, ``NO_PAGE`` (-1)
                      where the head has no ``j``-th page. A head's pages are entries ``0 .. n - 1``.
``lengths``           ``[layers, max_seqs, kv_heads]`` int32: rows each head holds (whatever appends rows
                      advances it on the device; the pool sets it at prefill and zeroes it at release).

Logical row ``r`` of head ``(l, s, h)`` (a cache slot of docs/DMS.md: rows in any order, RoPE is applied
before caching) lives at ``keys[block_table[l, s, h, r // page_rows], r % page_rows]``.

The free list, each head's page count and the sequence slots live on the host, which alone hands out
pages. The host never reads the device per decode step: a step adds at most one row per head, so the
host keeps an upper bound of each head's length, its exact length at the last prefill or ``trim``
plus the decode steps since (``advance``), and ``reserve_ahead(steps)`` hands out pages from that
bound alone. ``trim`` reads the lengths back (one host sync, as often as the caller chooses) to return
the pages reserved for rows that slot reuse made unnecessary.

A DMS pool (``window`` given) tightens that bound with what the read-back can already tell: the token that
leaves the window at each of the next ``window + 1`` steps is known, and so is whether it was marked (its
ring flag), in which case that step's new token takes its slot and adds no row (docs/DMS.md, "Cache and
decode"). With the lengths, ``request_trim`` reads back how many of the next ``horizon`` steps reuse a slot;
a head's growth over ``x`` steps since is then at most ``x`` until it reaches the ``horizon`` less those
reuses, stays there until ``horizon`` steps, and grows one a step after (``_growth``). At 8x, where ~7/8 of
the window is marked, a head's bound grows ~1/8 as fast as the steps, as its length does, and the pages
handed out ahead follow the rows kept rather than the steps.
"""

from __future__ import annotations

import numpy as np
import torch

NO_PAGE = -1
# One page per tile of a 64-row decode-attention block; at 8x a 32K-token head holds ~4.6K rows, so a
# partly filled last page costs it under 1.5%.
DEFAULT_PAGE_ROWS = 64
# A hand-out's read-back counts the slot reuses of this many hand-outs of steps: it is applied one or two
# hand-outs later and bounds the steps up to the next, so most bounds stay within it, where they are tightest.
HORIZON_HAND_OUTS = 4


class PagesExhausted(torch.OutOfMemoryError):
    """The paged pool has fewer free pages than an operation needs (nothing was written or handed out):
    an out-of-memory error, reported as an OOM row by the benchmarks."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_page_rows(page_rows) -> None:
    if isinstance(page_rows, bool) or not isinstance(page_rows, int) or page_rows < 1 or page_rows & (page_rows - 1):
        raise ValueError(f"page_rows must be a power of two, got {page_rows!r}")


def _pages_for(rows, page_rows: int):
    """Pages that hold ``rows`` rows (ints or an integer array)."""
    return -(-rows // page_rows)


def physical_rows(block_table: torch.Tensor, rows: torch.Tensor, page_rows: int) -> torch.Tensor:
    """Where logical rows live: an index into ``pages.view(-1, head_dim)`` (int64, shaped as ``rows``).

    ``block_table`` ``[..., max_pages]`` (int32, one table per head), ``rows`` ``[..., n]`` (integer, the
    same leading dims): row ``r`` of a head is row ``r % page_rows`` of page ``table[r // page_rows]``.
    Every row must lie in a page the head holds; this is not checked.
    """
    pages = torch.gather(block_table, -1, (rows // page_rows).long())
    return pages.long() * page_rows + rows % page_rows


def gather_rows(pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Each head's rows ``0 .. max_length - 1`` in order, read through its block table.

    ``pages`` ``[num_pages, page_rows, D]`` (the pool's ``keys`` or ``values``), ``block_table``
    ``[..., max_pages]`` int32, ``lengths`` ``[...]`` (integer). Returns ``[..., max_length, D]`` in the
    pages' dtype; rows at or past a head's length are zero. The torch path for decode attention: with
    ``max_length`` the longest head, the result is a padded cache and ``arange < lengths`` its mask.
    """
    page_rows, head_dim = pages.shape[1], pages.shape[2]
    rows = torch.arange(max_length, device=pages.device).expand(*lengths.shape, max_length)
    held = rows < lengths[..., None]
    index = physical_rows(block_table, torch.where(held, rows, 0), page_rows)
    index = torch.where(held, index, 0)  # heads that hold no row have no page to point at
    out = pages.view(-1, head_dim)[index]
    return torch.where(held[..., None], out, torch.zeros((), dtype=pages.dtype, device=pages.device))


def store_rows(pages: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """Write ``src`` ``[..., n, D]`` to logical rows ``rows`` ``[..., n]`` of the heads with tables
    ``block_table`` ``[..., max_pages]`` (see :func:`physical_rows`); rows must lie in held pages."""
    index = physical_rows(block_table, rows, pages.shape[1])
    pages.view(-1, pages.shape[2]).index_copy_(0, index.flatten(), src.reshape(-1, pages.shape[2]).to(pages.dtype))


class PagedKVPool:
    """Pages of K/V rows, a free list and one block table per (layer, sequence slot, KV head).

    ``num_pages`` pages of ``page_rows`` rows (a power of two) of ``head_dim`` channels in ``dtype`` on
    ``device``, for at most ``max_seqs`` live sequences of ``layers`` x ``kv_heads`` heads, each holding
    at most ``max_rows_per_head`` rows. The block table's capacity, ``max_pages_per_head =
    ceil(max_rows_per_head / page_rows)``, is fixed: a head never holds more rows than the tokens its
    sequence has seen, so the model's ``max_position_embeddings`` bounds it (``for_budget``'s default).

    A sequence's life: ``admit`` a free slot, ``prefill`` it with each head's row count, then per decode
    step ``advance`` (host bookkeeping only, after ``reserve_ahead`` made room), optionally ``trim``, and
    finally ``release``. Every operation that hands out pages is all-or-nothing: short of pages it raises
    :class:`PagesExhausted` before any page is handed out or any tensor written.
    """

    def __init__(self, num_pages: int, page_rows: int, head_dim: int, *, layers: int, max_seqs: int,
                 kv_heads: int, max_rows_per_head: int, dtype: torch.dtype, device: str | torch.device,
                 window: int | None = None):
        _check_page_rows(page_rows)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        for name, value in (("num_pages", num_pages), ("head_dim", head_dim), ("layers", layers),
                            ("max_seqs", max_seqs), ("kv_heads", kv_heads), ("max_rows_per_head", max_rows_per_head)):
            _positive_int(name, value)
        self.num_pages, self.page_rows, self.head_dim, self.dtype = num_pages, page_rows, head_dim, dtype
        self.layers, self.max_seqs, self.kv_heads = layers, max_seqs, kv_heads
        self.max_rows_per_head = max_rows_per_head
        self.max_pages_per_head = _pages_for(max_rows_per_head, page_rows)
        heads = (layers, max_seqs, kv_heads)
        with torch.inference_mode(False):  # plain tensors: written in and out of inference mode
            self.keys = torch.empty((num_pages, page_rows, head_dim), dtype=dtype, device=device)
            self.values = torch.empty((num_pages, page_rows, head_dim), dtype=dtype, device=device)
            self.block_table = torch.full((*heads, self.max_pages_per_head), NO_PAGE, dtype=torch.int32,
                                          device=device)
            self.lengths = torch.zeros(heads, dtype=torch.int32, device=device)
            # The DMS cache's per-head decode state (dms_perf.model.cache): the ring of the last
            # window + 1 tokens' slots and flags, and each head's next token index.
            self.window = window
            if window is not None:
                self.ring_slot = torch.zeros((*heads, window + 1), dtype=torch.int64, device=device)
                self.ring_flag = torch.zeros((*heads, window + 1), dtype=torch.bool, device=device)
                self.step_index = torch.zeros((layers, max_seqs * kv_heads), dtype=torch.int64, device=device)
        self.device = self.keys.device
        self.epoch = 0  # bumped by begin(): which DMSCache owns the slots
        # Host state. The free list is a stack: pages _free[:_free_count] are free.
        self._free = np.arange(num_pages - 1, -1, -1, dtype=np.int64)
        self._free_count = num_pages
        self._table = np.full((*heads, self.max_pages_per_head), NO_PAGE, dtype=np.int64)  # block_table's mirror
        self._pages = np.zeros(heads, dtype=np.int64)  # pages each head holds
        self._rows = np.zeros(heads, dtype=np.int64)  # exact lengths at the last prefill or trim
        self._since = np.zeros(max_seqs, dtype=np.int64)  # decode steps per slot since then
        # Per head, from the last read-back of a DMS pool: the steps from then whose slot reuse it knew, and of
        # them, those that reuse a slot (no new row). 0 and 0 (nothing known) after a prefill.
        self._horizon = np.zeros(heads, dtype=np.int64)
        self._reused = np.zeros(heads, dtype=np.int64)
        self._room = np.zeros(max_seqs, dtype=np.int64)  # steps every head of the slot has pages for
        self._live = np.zeros(max_seqs, dtype=bool)
        self._snapshot = None  # request_trim's lengths on their way to the host
        # Each slot's column in that read-back: -1 for a sequence admitted or prefilled since (a trim leaves its
        # bound as it is); a move carries the column to the sequence's new slot.
        self._snapshot_slot = np.full(max_seqs, -1, dtype=np.int64)
        # Per batch size, (longest bound, spread) of the bounds above (``_bound_summary``), until they change:
        # asked by every layer of a decode step, computed once.
        self._bound_memo: dict[int, tuple[int, float]] = {}
        self._snapshot_age = 0
        self._peak = 0

    # --- sizing --------------------------------------------------------------------------------------

    @staticmethod
    def page_bytes(page_rows: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page, K and V."""
        return 2 * page_rows * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def table_bytes(layers: int, max_seqs: int, kv_heads: int, max_pages_per_head: int,
                    window: int | None = None) -> int:
        """Bytes of the per-head state: block table and lengths (int32 each), and with a ``window`` the
        DMS ring (``window + 1`` int64 slots and bool flags) and step index (int64)."""
        ring = 0 if window is None else 9 * (window + 1) + 8
        return layers * max_seqs * kv_heads * (4 * (max_pages_per_head + 1) + ring)

    @classmethod
    def for_budget(cls, source, budget_bytes: int, *, max_seqs: int, page_rows: int = DEFAULT_PAGE_ROWS,
                   max_rows_per_head: int | None = None, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> PagedKVPool:
        """The pool for a model (or its config) that fits ``budget_bytes`` of device memory.

        ``source`` is a Qwen3-DMS model (dtype and device default to its parameters') or its config
        (``dtype`` and ``device`` then required). Layers, KV heads and ``head_dim`` come from the config,
        ``max_rows_per_head`` defaults to its ``max_position_embeddings``, the DMS ``window`` is its
        ``dms_window_size`` (none for another config). The budget pays for the per-head state first
        (``table_bytes``), then for as many pages as fit (``page_bytes``); a
        budget that holds no page is a ValueError.
        """
        config = getattr(source, "config", source)
        if hasattr(source, "parameters"):
            parameter = next(source.parameters())
            dtype = parameter.dtype if dtype is None else dtype
            device = parameter.device if device is None else device
        if dtype is None or device is None:
            raise ValueError(f"give dtype and device with a config (got dtype={dtype}, device={device})")
        _check_page_rows(page_rows)
        _positive_int("max_seqs", max_seqs)
        max_rows_per_head = config.max_position_embeddings if max_rows_per_head is None else max_rows_per_head
        _positive_int("max_rows_per_head", max_rows_per_head)
        layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        window = getattr(config, "dms_window_size", None)
        table = cls._config_table_bytes(config, max_seqs, page_rows, max_rows_per_head)
        page = cls.page_bytes(page_rows, head_dim, dtype)
        num_pages = (int(budget_bytes) - table) // page
        if num_pages < 1:
            raise ValueError(
                f"a memory budget of {budget_bytes} bytes holds no page: the block table takes {table} bytes "
                f"({max_seqs} sequences, {layers} layers x {kv_heads} KV heads) and a page {page} bytes"
            )
        return cls(num_pages, page_rows, head_dim, layers=layers, max_seqs=max_seqs, kv_heads=kv_heads,
                   max_rows_per_head=max_rows_per_head, dtype=dtype, device=device, window=window)

    @staticmethod
    def pages_for_rows(rows, page_rows: int = DEFAULT_PAGE_ROWS) -> int:
        """Pages that heads of ``rows`` rows (an integer array) hold in all."""
        return int(_pages_for(np.asarray(rows, dtype=np.int64), page_rows).sum())

    @classmethod
    def budget_for_pages(cls, source, pages: int, *, max_seqs: int, page_rows: int = DEFAULT_PAGE_ROWS,
                         max_rows_per_head: int | None = None, dtype: torch.dtype | None = None) -> int:
        """The memory budget for which ``for_budget`` (same arguments) gives a pool of ``pages`` pages."""
        config = getattr(source, "config", source)
        if dtype is None:
            dtype = next(source.parameters()).dtype
        _positive_int("pages", pages)
        max_rows_per_head = config.max_position_embeddings if max_rows_per_head is None else max_rows_per_head
        table = cls._config_table_bytes(config, max_seqs, page_rows, max_rows_per_head)
        return table + pages * cls.page_bytes(page_rows, config.head_dim, dtype)

    @classmethod
    def _config_table_bytes(cls, config, max_seqs: int, page_rows: int, max_rows_per_head: int) -> int:
        """``table_bytes`` of a pool for ``config`` (its layers, KV heads and DMS window, if any)."""
        return cls.table_bytes(config.num_hidden_layers, max_seqs, config.num_key_value_heads,
                               _pages_for(max_rows_per_head, page_rows), getattr(config, "dms_window_size", None))

    # --- accounting ----------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return self._free_count

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self._free_count

    @property
    def peak_pages_in_use(self) -> int:
        """The most pages in use at once since the pool was built."""
        return self._peak

    @property
    def bytes_in_use(self) -> int:
        """K and V bytes of the pages in use."""
        return self.pages_in_use * self.page_bytes(self.page_rows, self.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        """Device bytes the pool allocated: pages, block table and lengths."""
        return (self.num_pages * self.page_bytes(self.page_rows, self.head_dim, self.dtype)
                + self.table_bytes(self.layers, self.max_seqs, self.kv_heads, self.max_pages_per_head, self.window))

    @property
    def live_slots(self) -> list[int]:
        return np.flatnonzero(self._live).tolist()

    def pages_held(self, slot: int) -> int:
        """Pages the sequence in ``slot`` holds (all its layers and heads)."""
        return int(self._pages[:, self._check_live(slot)].sum())

    # --- sequences -----------------------------------------------------------------------------------

    def admit(self, slot: int | None = None) -> int:
        """Take ``slot`` (default: the lowest free one) for a new sequence; returns it. Its heads hold no
        rows and no pages. Raises ValueError if the slot is live or none is free."""
        if slot is None:
            free = np.flatnonzero(~self._live)
            if free.size == 0:
                raise ValueError(f"all {self.max_seqs} sequence slots are live: release one first")
            slot = int(free[0])
        elif isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_seqs:
            raise ValueError(f"slot must be an int in [0, {self.max_seqs}), got {slot!r}")
        elif self._live[slot]:
            raise ValueError(f"slot {slot} already holds a live sequence")
        self._live[slot] = True
        self._snapshot_slot[slot] = -1
        self._since[slot] = self._room[slot] = 0
        self._bound_memo.clear()
        return slot

    def prefill(self, slot: int, rows) -> None:
        """Give each head of the freshly admitted ``slot`` its prefill's rows.

        ``rows`` ``[layers, kv_heads]`` (host integers: a nested sequence, array or CPU tensor) is each
        head's row count; a head of ``n`` rows then holds ``ceil(n / page_rows)`` pages (pages it was
        already reserved count). Sets the device lengths; the caller writes K/V (:func:`store_rows`).
        ValueError if the slot is not live, already holds rows or has decoded, or a count is negative or
        above ``max_rows_per_head``; :class:`PagesExhausted` (nothing changed) if the pages run short.
        """
        slot = self._check_live(slot)
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64)
        if rows.shape != (self.layers, self.kv_heads):
            raise ValueError(f"rows must be [layers, kv_heads] = [{self.layers}, {self.kv_heads}], got {rows.shape}")
        self._give_rows(np.arange(self.layers), np.full(self.layers, slot), rows, f"slot {slot}")

    def prefill_layer(self, layer: int, slots, rows) -> None:
        """``prefill`` for one layer of several freshly admitted sequences: ``rows`` ``[len(slots),
        kv_heads]`` (host integers) are the row counts of layer ``layer``'s heads in those slots. A DMS
        cache packs its prefill layer by layer, so it hands out pages layer by layer. Same errors."""
        slots = np.asarray([self._check_live(int(s)) for s in slots], dtype=np.int64)
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64)
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer must lie in [0, {self.layers}), got {layer!r}")
        if rows.shape != (slots.size, self.kv_heads):
            raise ValueError(f"rows must be [slots, kv_heads] = [{slots.size}, {self.kv_heads}], got {rows.shape}")
        self._give_rows(np.full(slots.size, layer), slots, rows, f"layer {layer} of slots {slots.tolist()}")

    def _give_rows(self, layers: np.ndarray, slots: np.ndarray, rows: np.ndarray, what: str) -> None:
        """The shared body of ``prefill`` and ``prefill_layer``: the heads of (``layers[i]``, ``slots[i]``)
        get ``rows[i]`` rows each, their pages and their device lengths; all or nothing."""
        if rows.size and (rows.min() < 0 or rows.max() > self.max_rows_per_head):
            raise ValueError(f"row counts must lie in [0, {self.max_rows_per_head}], got {rows.min()}..{rows.max()}")
        if self._rows[layers, slots].any() or self._since[slots].any():
            raise ValueError(f"{what} already holds rows: a sequence is prefilled once, right after admit")
        heads = self.kv_heads
        flat = np.ravel_multi_index((np.repeat(layers, heads), np.repeat(slots, heads),
                                     np.tile(np.arange(heads), layers.size)), self._rows.shape)
        self._hand_out(flat, np.maximum(_pages_for(rows.ravel(), self.page_rows) - self._pages.reshape(-1)[flat], 0))
        self._rows[layers, slots] = rows
        self._snapshot_slot[slots] = -1  # a read-back on its way saw none of these rows
        self._bound_memo.clear()
        self._write(self.lengths, flat, rows.ravel())
        self._update_room(np.unique(slots))

    def move(self, source: int, dest: int) -> None:
        """Move the live sequence in slot ``source`` to the free slot ``dest``: its block tables, lengths, DMS
        ring and step index (device copies of a few integers per head, no K/V row moves) and its host
        state. A request stream keeps its live sequences in the lowest slots with it, so that a decode
        step runs on as small a batch as the live sequences allow."""
        source, dest = self._check_live(source), int(dest)
        if not 0 <= dest < self.max_seqs or self._live[dest]:
            raise ValueError(f"slot {dest!r} must be a free slot in [0, {self.max_seqs})")
        self.block_table[:, dest].copy_(self.block_table[:, source])
        self.lengths[:, dest].copy_(self.lengths[:, source])
        if self.window is not None:
            self.ring_slot[:, dest].copy_(self.ring_slot[:, source])
            self.ring_flag[:, dest].copy_(self.ring_flag[:, source])
            H = self.kv_heads
            self.step_index[:, dest * H : (dest + 1) * H].copy_(self.step_index[:, source * H : (source + 1) * H])
        for state in (self._table, self._pages, self._rows, self._horizon, self._reused):
            state[:, dest] = state[:, source]
        self._table[:, source] = NO_PAGE
        self._pages[:, source] = self._rows[:, source] = self._horizon[:, source] = self._reused[:, source] = 0
        for state in (self._since, self._room, self._live):
            state[dest] = state[source]
        self._snapshot_slot[dest], self._snapshot_slot[source] = self._snapshot_slot[source], -1
        self._since[source] = self._room[source] = 0
        self._live[source] = False
        self._bound_memo.clear()
        self.block_table[:, source].fill_(NO_PAGE)
        self.lengths[:, source].zero_()

    def begin(self) -> int:
        """Release every live sequence (a new DMS cache takes the pool); returns the new epoch, by which
        the previous cache knows it was closed."""
        for slot in self.live_slots:
            self.release(slot)
        self.epoch += 1
        return self.epoch

    def room(self, slots: int) -> int:
        """Decode steps the live sequences among slots ``0 .. slots - 1`` all have pages for (host only)."""
        live = self._live[:slots]
        return int(self._room[:slots][live].min()) if live.any() else 0

    def _growth(self, steps: np.ndarray) -> np.ndarray:
        """``[layers, max_seqs, kv_heads]``: each head's most new rows over ``steps[s]`` decode steps of slot ``s``
        since its last prefill or read-back. Every step appends, except that of the first ``horizon`` steps (the
        read-back's) ``reused`` take a freed slot: growth stops at ``horizon - reused`` until ``horizon`` steps
        (the reuses may come last), then goes on a row a step."""
        steps = np.asarray(steps)[None, :, None]
        return steps - np.clip(steps - (self._horizon - self._reused), 0, self._reused)

    def bounds(self, slots: int | None = None, ahead: int = 0) -> np.ndarray:
        """``[layers, slots, kv_heads]``: a host-known upper bound of the rows each head of slots ``0 .. slots -
        1`` (default all) holds, ``ahead`` decode steps from now: its length at the last prefill or ``trim`` plus
        its growth since (``_growth``), at most ``max_rows_per_head``; 0 for a slot that holds no sequence."""
        bound = np.minimum(self._rows + self._growth(self._since + ahead), self.max_rows_per_head)
        bound = np.where(self._live[None, :, None], bound, 0)
        return bound if slots is None else bound[:, :slots]

    def longest_bound(self, layer: int | None, slots: int) -> int:
        """A host-known upper bound of the rows any head of layer ``layer`` (None: of any layer) in slots
        ``0 .. slots - 1`` holds (``bounds``)."""
        if layer is None:
            return self._bound_summary(slots)[0]
        return int(self.bounds(slots)[layer].max(initial=0))

    def bound_spread(self, slots: int) -> float:
        """How unevenly the heads of slots ``0 .. slots - 1`` hold rows, from host-known bounds only
        (``longest_bound``'s): the largest, over layers, of a layer's longest head bound over its mean
        bound (1.0 when every head holds as many rows, or none holds any)."""
        return self._bound_summary(slots)[1]

    def _bound_summary(self, slots: int) -> tuple[int, float]:
        """``longest_bound(None, slots)`` and ``bound_spread(slots)`` from one pass over the bounds, kept until
        the bounds change (every layer of a decode step asks for both)."""
        summary = self._bound_memo.get(slots)
        if summary is None:
            bound = self.bounds(slots)
            per_layer = bound.reshape(bound.shape[0], -1)
            mean, longest = per_layer.mean(axis=1), per_layer.max(axis=1, initial=0)
            held = mean > 0
            summary = (int(longest.max(initial=0)), float((longest[held] / mean[held]).max(initial=1.0)))
            self._bound_memo[slots] = summary
        return summary

    def pages_of(self, slots: int, layer: int | None = None) -> int:
        """Pages held by the sequences in slots ``0 .. slots - 1`` (of one layer, or all)."""
        held = self._pages[:, :slots] if layer is None else self._pages[layer, :slots]
        return int(held.sum())

    def rows_held(self, slots: int) -> np.ndarray:
        """``[layers, slots, kv_heads]``: the rows the pages of each head of slots ``0 .. slots - 1`` have room
        for (a head's length is at most this; the difference is the pages handed out ahead and a last page's
        rounding)."""
        return self._pages[:, :slots] * self.page_rows

    def release(self, slot: int) -> None:
        """End the sequence in ``slot``: all its pages return to the free list, its block-table entries
        become ``NO_PAGE`` and its lengths 0. ValueError for a slot that is not live."""
        slot = self._check_live(slot)
        owned = self._table[:, slot]
        pages = owned[owned != NO_PAGE]
        self._free[self._free_count : self._free_count + pages.size] = pages
        self._free_count += pages.size
        owned.fill(NO_PAGE)
        self._pages[:, slot] = self._rows[:, slot] = self._horizon[:, slot] = self._reused[:, slot] = 0
        self._since[slot] = self._room[slot] = 0
        self._live[slot] = False
        self._snapshot_slot[slot] = -1
        self._bound_memo.clear()
        self.block_table[:, slot].fill_(NO_PAGE)
        self.lengths[:, slot].zero_()

    # --- decoding ------------------------------------------------------------------------------------

    def reserve_ahead(self, steps: int) -> None:
        """Give every head of every live sequence pages for ``steps`` more rows beyond its length bound.

        A head's bound is its exact length at the last prefill or ``trim`` plus the decode steps
        ``advance`` counted since (a step adds at most one row per head), capped at
        ``max_rows_per_head``; the head then holds ``ceil(min(bound + steps, max_rows_per_head) /
        page_rows)`` pages or more. As ``advance`` never lets the bound pass the rows a head's pages
        hold, that is at most ``ceil(steps / page_rows)`` new pages per head, known without reading
        the device. :class:`PagesExhausted` (nothing changed) if the free pages do not cover them all.
        """
        need = self._short(_positive_int("steps", steps))
        heads = np.flatnonzero(need)  # none for a free slot: its bound is 0, and it holds no page
        self._hand_out(heads, need[heads])
        self._update_room()

    def pages_short(self, steps: int) -> int:
        """The free pages ``reserve_ahead(steps)`` would take now (host arithmetic): what the live heads'
        pages lack for their bounds ``steps`` decode steps ahead. A request stream keeps this many back."""
        return int(self._short(_positive_int("steps", steps)).sum())

    def _short(self, steps: int) -> np.ndarray:
        """Flat per head: the pages it lacks for its bound ``steps`` steps ahead."""
        return np.maximum(_pages_for(self.bounds(ahead=steps), self.page_rows) - self._pages, 0).reshape(-1)

    def advance(self, steps: int = 1) -> None:
        """The host's share of ``steps`` decode steps of every live sequence (their kernels, which append
        rows on the device, may run before or after): the length bounds grow by ``steps``. Host
        arithmetic only. RuntimeError (nothing changed) if some head's pages might not hold ``steps``
        more rows: call ``reserve_ahead`` first."""
        steps = _positive_int("steps", steps)
        short = np.flatnonzero(self._live & (self._room < steps))
        if short.size:
            raise RuntimeError(
                f"slots {short.tolist()} have pages for {self._room[short].tolist()} more decode steps, not "
                f"{steps}: call reserve_ahead before stepping"
            )
        self._since[self._live] += steps
        self._room[self._live] -= steps
        self._bound_memo.clear()

    def hand_out(self, steps: int) -> None:
        """A decode loop's page hand-out, every ``steps`` steps: ``trim`` by the read-back started at the last
        hand-out if it has landed, ``reserve_ahead(steps)``, then start the next read-back.

        The host may run ahead of the device (a replayed CUDA graph returns at once), so a read-back may not
        have landed by the next hand-out; it is then kept (not replaced by a newer one, which would never land
        either) and waited for at the hand-out after: it was enqueued a whole hand-out of steps before the
        ones now queued, so the wait leaves the device busy with those and drains nothing. A head then holds
        at most its length plus three hand-outs' rows, however far the host runs ahead."""
        if self._snapshot is not None and not self.trim(wait=self._snapshot_age >= 1):
            self._snapshot_age += 1
        self.reserve_ahead(steps)
        if self._snapshot is None:
            self.request_trim(HORIZON_HAND_OUTS * steps)

    def request_trim(self, horizon: int | None = None) -> None:
        """Start reading the device lengths back without waiting: a copy into pinned host memory in
        stream order (on CUDA), which a later ``trim(wait=False)`` applies once it has landed. A decode
        loop requests at one page hand-out and trims at the next, so it never waits for the device.
        A DMS pool also reads how many of the next ``horizon`` steps (at most and by default ``window + 1``)
        reuse a slot (module docstring): the bounds then follow the rows kept, not the steps."""
        horizon = 0 if self.window is None else min(self.window + 1, horizon or self.window + 1)
        counts = self.lengths if not horizon else torch.stack([self.lengths, self._reuses_ahead(horizon)])
        if self.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = counts.clone(), None
        self._snapshot = (host, ready, self._since.copy(), horizon)
        self._snapshot_slot = np.arange(self.max_seqs)
        self._snapshot_age = 0  # hand-outs that found it still on its way

    def _reuses_ahead(self, horizon: int) -> torch.Tensor:
        """``[layers, max_seqs, kv_heads]`` int32 on the device: of the next ``horizon`` (<= window + 1) decode
        steps, those whose token leaving the window was marked, so that the step's new token takes its slot.
        Step ``j`` from now (step index ``t``) reads ring entry ``(t + j) % (window + 1)``, the token ``t + j -
        window - 1``, whose flag no step before it changes (docs/DMS.md, "Cache and decode"; entry ``t - 1``'s
        flag, unset until step ``t`` sets it, counts as an append, which keeps the count a lower bound). A
        sequence's heads in a layer decode the same tokens, so head 0's step index serves them all."""
        layers, seqs, heads = self.lengths.shape
        step = self.step_index.view(layers, seqs, heads)[:, :, :1, None]
        entries = (step + torch.arange(horizon, device=self.device)) % (self.window + 1)
        return torch.gather(self.ring_flag, 3, entries.expand(layers, seqs, heads, horizon)).sum(-1, dtype=torch.int32)

    def trim(self, *, wait: bool = True) -> bool:
        """Return every page past what a live head may hold: the pages ``reserve_ahead`` gave for appends
        that slot reuse made unnecessary. Applies the lengths ``request_trim`` read back (requesting them
        now if it was not asked); a head's bound becomes its length then plus its growth since (``_growth``).
        ``wait=False``: do nothing and return False while the read-back is still on its way (no host
        sync); else returns True. Slots released, admitted or prefilled since the request keep their bounds; a
        sequence moved since takes its old slot's lengths."""
        if self._snapshot is None:
            if not wait:
                return False
            self.request_trim()
        host, ready, since_then, horizon = self._snapshot
        if ready is not None and not ready.query():
            if not wait:
                return False
            ready.synchronize()
        self._snapshot = None
        # Each live slot's column of the read-back (a sequence moved since reads its old slot's)
        valid = self._live & (self._snapshot_slot >= 0)
        column = np.where(valid, self._snapshot_slot, 0)
        counts = host.numpy().astype(np.int64)[..., column, :]
        lengths, reused = (counts[0], counts[1]) if horizon else (counts, 0)
        since_then = since_then[column]
        self._snapshot_slot[:] = -1
        fresh, live = valid[None, :, None], self._live[None, :, None]
        self._since = np.where(valid, self._since - since_then, np.where(self._live, self._since, 0))
        self._rows = np.where(fresh, lengths, np.where(live, self._rows, 0))
        self._horizon = np.where(fresh, horizon, np.where(live, self._horizon, 0))
        self._reused = np.where(fresh, reused, np.where(live, self._reused, 0))
        keep = np.where(live, np.minimum(_pages_for(self.bounds(), self.page_rows), self._pages), 0)
        # The surplus: columns keep .. pages - 1 of each head that holds more than it keeps
        heads = np.flatnonzero(keep < self._pages)
        flat = self._columns(heads, keep.reshape(-1)[heads], (self._pages - keep).reshape(-1)[heads])
        pages = self._table.reshape(-1)[flat]
        self._free[self._free_count : self._free_count + pages.size] = pages
        self._free_count += pages.size
        self._table.reshape(-1)[flat] = NO_PAGE
        self._write(self.block_table, flat, np.full_like(flat, NO_PAGE))
        self._pages = keep
        self._bound_memo.clear()
        self._update_room()
        return True

    # --- reading -------------------------------------------------------------------------------------

    def head_rows(self, layer: int, slot: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``(layer, slot, head)``'s K and V rows in order, ``[length, head_dim]`` each (reads its
        length back: for tests and inspection, not for a decode step)."""
        table, length = self.block_table[layer, slot, head], self.lengths[layer, slot, head]
        n = int(length)
        return (gather_rows(self.keys, table, length, n), gather_rows(self.values, table, length, n))

    # --- internals -----------------------------------------------------------------------------------

    def _check_live(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_seqs or not self._live[slot]:
            raise ValueError(f"slot {slot!r} holds no live sequence (live: {self.live_slots})")
        return slot

    def _hand_out(self, heads: np.ndarray, counts: np.ndarray) -> None:
        """Append ``counts[i]`` free pages to the block table of each flat head ``heads[i]`` (distinct), all
        or none (callers keep every head within ``max_pages_per_head``: rows are checked at prefill, reserves
        capped)."""
        total = int(counts.sum())
        if total > self._free_count:
            raise PagesExhausted(
                f"paged KV pool exhausted: {total} pages asked with {self._free_count} of {self.num_pages} free "
                f"({self.num_pages * self.page_bytes(self.page_rows, self.head_dim, self.dtype) / 2**30:.2f} GiB "
                "of pages); give the pool a larger memory budget or admit fewer sequences"
            )
        if total == 0:
            return
        pages = self._free[self._free_count - total : self._free_count].copy()
        self._free_count -= total
        # A head's new pages go to the columns after the pages it holds, in the order of ``pages``.
        flat = self._columns(heads, self._pages.reshape(-1)[heads], counts)
        self._table.reshape(-1)[flat] = pages
        self._pages.reshape(-1)[heads] += counts
        self._peak = max(self._peak, self.pages_in_use)
        self._write(self.block_table, flat, pages)

    def _columns(self, heads: np.ndarray, first: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Flat block-table indices of columns ``first[i] .. first[i] + counts[i] - 1`` of each flat head
        ``heads[i]``, head by head."""
        run_start = counts.cumsum() - counts  # where each head's run starts in the result
        column = np.repeat(first, counts) + np.arange(int(counts.sum())) - np.repeat(run_start, counts)
        return np.repeat(heads, counts) * self.max_pages_per_head + column

    def _write(self, target: torch.Tensor, flat: np.ndarray, values: np.ndarray) -> None:
        """``target.view(-1)[flat] = values`` without waiting for the device (pinned, non-blocking on CUDA)."""
        if flat.size == 0:
            return
        staged = torch.from_numpy(np.stack([flat, values]).astype(np.int64))
        if self.device.type == "cuda":
            staged = staged.pin_memory().to(self.device, non_blocking=True)
        else:
            staged = staged.to(self.device)
        target.view(-1).index_copy_(0, staged[0], staged[1].to(target.dtype))

    def _update_room(self, slots: np.ndarray | None = None) -> None:
        """Decode steps each live slot's heads all have pages for (``advance`` spends them); of ``slots`` only
        (the others unchanged), or of all."""
        index = slice(None) if slots is None else slots
        pages, rows, horizon, reused = (a[:, index] for a in (self._pages, self._rows, self._horizon, self._reused))
        # The most steps x since the read-back whose growth the pages hold (``_growth`` is flat from horizon -
        # reused to horizon, so a head with room past that flat part gets its reuses on top), less those taken.
        rows_free = pages * self.page_rows - rows
        most = np.where(rows_free >= horizon - reused, rows_free + reused, rows_free)
        self._room[index] = np.where(self._live[index], most.min(axis=(0, 2)) - self._since[index], 0)
