"""The paged KV pool (dms_perf.model.paged) against a plain-Python shadow of its allocator: pages are
never shared, every row reads back as written through the block tables, pages come back when their
sequence ends, running out is an all-or-nothing out-of-memory error, and no buffer ever moves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dms_perf.bench.generation import failure_status
from dms_perf.model.paged import NO_PAGE, PagedKVPool, PagesExhausted, gather_rows, store_rows
from dms_perf.model.qwen3_dms import build_model, tiny_config

HEAD_DIM = 2


def _pool(num_pages=8, page_rows=4, *, layers=1, max_seqs=2, kv_heads=2, max_rows_per_head=64):
    return PagedKVPool(num_pages, page_rows, HEAD_DIM, layers=layers, max_seqs=max_seqs, kv_heads=kv_heads,
                       max_rows_per_head=max_rows_per_head, dtype=torch.float32, device="cpu")


def _row(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of a row tagged ``value`` (distinct per written row)."""
    k = torch.tensor([value, value + 0.5])
    return k, -k


def _write(pool, layer, slot, head, rows: list[int], values: list[float]) -> None:
    keys, vals = zip(*(_row(v) for v in values), strict=True) if values else ((), ())
    table = pool.block_table[layer, slot, head]
    index = torch.tensor(rows, dtype=torch.int64)
    store_rows(pool.keys, table, index, torch.stack(keys) if keys else torch.zeros(0, HEAD_DIM))
    store_rows(pool.values, table, index, torch.stack(vals) if vals else torch.zeros(0, HEAD_DIM))


def _state(pool) -> tuple:
    """Everything an operation may change, for 'nothing changed' checks."""
    return (pool.block_table.clone(), pool.lengths.clone(), pool.keys.clone(), pool.values.clone(),
            pool.free_pages, pool.pages_in_use, pool.peak_pages_in_use, pool.live_slots)


def _assert_unchanged(before: tuple, pool) -> None:
    after = _state(pool)
    for a, b in zip(before[:4], after[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert before[4:] == after[4:]


def _pointers(pool) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in (pool.keys, pool.values, pool.block_table, pool.lengths))


class PagedPoolMachine(RuleBasedStateMachine):
    """Random admit / prefill / decode / reserve_ahead / read-back / trim / move / release sequences on a small
    pool.

    The shadow knows no block table: per head, a list of the values its rows hold (in row order), its
    page count, and the length the host knew at the last prefill or trim; per slot, the decode steps
    since. Expected page counts and exhaustion follow from docs alone (ceil of rows over page_rows). A
    read-back started before moves, admissions and releases is applied to the sequences it saw, where they
    are now.
    """

    @initialize(page_rows=st.sampled_from([1, 2, 4, 8]), layers=st.integers(1, 2), kv_heads=st.integers(1, 3),
                max_seqs=st.integers(1, 3), num_pages=st.integers(1, 64), max_rows_per_head=st.integers(1, 40))
    def build(self, page_rows, layers, kv_heads, max_seqs, num_pages, max_rows_per_head):
        self.pool = PagedKVPool(num_pages, page_rows, HEAD_DIM, layers=layers, max_seqs=max_seqs, kv_heads=kv_heads,
                                max_rows_per_head=max_rows_per_head, dtype=torch.float32, device="cpu")
        self.pointers = _pointers(self.pool)
        self.heads = [(layer, head) for layer in range(layers) for head in range(kv_heads)]
        self.rows: dict[tuple[int, int, int], list[float]] = {}
        self.pages: dict[tuple[int, int, int], int] = {}
        self.known: dict[tuple[int, int, int], int] = {}
        self.since: dict[int, int] = {}
        # A read-back on its way: each head's rows and each slot's steps then, and each live slot's slot then
        self.snap: tuple[dict, dict, dict] | None = None
        self.peak = 0
        self.next_value = 1.0

    # --- shadow helpers ---

    def _free(self) -> int:
        return self.pool.num_pages - sum(self.pages.values())

    def _value(self) -> float:
        self.next_value += 1.0
        return self.next_value

    def _room(self, slot) -> int:
        """Rows every head of ``slot`` has pages for beyond its host-known bound."""
        P = self.pool.page_rows
        return min(self.pages[(l, slot, h)] * P - self.known[(l, slot, h)] - self.since[slot] for l, h in self.heads)

    def _fresh(self, slot) -> bool:
        return self.since[slot] == 0 and not any(self.known[(l, slot, h)] for l, h in self.heads)

    # --- rules ---

    @rule(choose=st.booleans(), data=st.data())
    def admit(self, choose, data):
        free = [s for s in range(self.pool.max_seqs) if s not in self.since]
        if not free:
            with pytest.raises(ValueError):
                self.pool.admit()
            return
        slot = self.pool.admit(data.draw(st.sampled_from(free)) if choose else None)
        assert slot in free and (choose or slot == free[0])
        self.since[slot] = 0
        if self.snap:
            self.snap[2].pop(slot, None)
        for l, h in self.heads:
            self.rows[(l, slot, h)], self.pages[(l, slot, h)], self.known[(l, slot, h)] = [], 0, 0

    @precondition(lambda self: any(self._fresh(slot) for slot in self.since))
    @rule(data=st.data())
    def prefill(self, data):
        slot = data.draw(st.sampled_from([slot for slot in sorted(self.since) if self._fresh(slot)]))
        # Uneven heads: each drawn on its own, from empty to the bound.
        counts = {key: data.draw(st.integers(0, self.pool.max_rows_per_head)) for key in self.heads}
        rows = [[counts[(l, h)] for h in range(self.pool.kv_heads)] for l in range(self.pool.layers)]
        P = self.pool.page_rows
        need = sum(max(0, math.ceil(n / P) - self.pages[(l, slot, h)]) for (l, h), n in counts.items())
        before = _state(self.pool)
        if need > self._free():
            event("prefill: exhausted")
            with pytest.raises(PagesExhausted):
                self.pool.prefill(slot, rows)
            _assert_unchanged(before, self.pool)
            return
        self.pool.prefill(slot, rows)
        event("prefill: uneven heads" if len(set(counts.values())) > 1 else "prefill: even heads")
        if self.snap:  # a read-back on its way saw none of these rows
            self.snap[2].pop(slot, None)
        for (l, h), n in counts.items():
            key = (l, slot, h)
            self.pages[key] = max(self.pages[key], math.ceil(n / self.pool.page_rows))
            self.known[key] = n
            self.rows[key] = [self._value() for _ in range(n)]
            _write(self.pool, l, slot, h, list(range(n)), self.rows[key])
        self.peak = max(self.peak, sum(self.pages.values()))

    @precondition(lambda self: self.since)
    @rule(steps=st.integers(1, 6), data=st.data())
    def decode(self, steps, data):
        """Decode steps as the kernels take them: each head appends a row or rewrites one it holds."""
        for _ in range(steps):
            if any(self._room(slot) < 1 for slot in self.since):
                before = _state(self.pool)
                event("decode: no room")
                with pytest.raises(RuntimeError, match="reserve_ahead"):
                    self.pool.advance()
                _assert_unchanged(before, self.pool)
                return
            self.pool.advance()
            for slot in self.since:
                self.since[slot] += 1
                for l, h in self.heads:
                    key, value = (l, slot, h), self._value()
                    held = self.rows[key]
                    if held and data.draw(st.booleans()):
                        row = data.draw(st.integers(0, len(held) - 1))
                        held[row] = value
                    else:
                        row = len(held)
                        held.append(value)
                        self.pool.lengths[l, slot, h] += 1
                    _write(self.pool, l, slot, h, [row], [value])

    @rule(steps=st.integers(1, 20))
    def reserve_ahead(self, steps):
        P, limit = self.pool.page_rows, self.pool.max_rows_per_head
        target = {key: max(self.pages[key], math.ceil(min(self.known[key] + self.since[key[1]] + steps, limit) / P))
                  for key in self.pages}
        need = sum(target[key] - self.pages[key] for key in self.pages)
        assert self.pool.pages_short(steps) == need  # what a request stream keeps back for the hand-out
        before = _state(self.pool)
        if need > self._free():
            event("reserve_ahead: exhausted")
            with pytest.raises(PagesExhausted):
                self.pool.reserve_ahead(steps)
            _assert_unchanged(before, self.pool)
            return
        self.pool.reserve_ahead(steps)
        for key in self.pages:
            assert target[key] - self.pages[key] <= math.ceil(steps / P)  # the bound the docstring states
            self.pages[key] = target[key]
        self.peak = max(self.peak, sum(self.pages.values()))
        for slot in self.since:
            assert self._room(slot) >= min(steps, limit - max(self.known[(l, slot, h)] + self.since[slot]
                                                               for l, h in self.heads))

    @rule()
    def request_trim(self):
        """A hand-out's read-back, applied by a later trim."""
        self.pool.request_trim()
        self.snap = ({key: len(held) for key, held in self.rows.items()}, dict(self.since),
                     {slot: slot for slot in self.since})

    @rule()
    def trim(self):
        self.pool.trim()
        if self.snap is None:  # read back now
            for key, held in self.rows.items():
                self.known[key] = len(held)
                self.pages[key] = math.ceil(len(held) / self.pool.page_rows)
            for slot in self.since:
                self.since[slot] = 0
            return
        rows_then, since_then, slot_then = self.snap
        self.snap = None
        for slot, then in slot_then.items():
            event("trim: a sequence moved since its read-back" if slot != then else "trim: read-back applied")
            for l, h in self.heads:
                self.known[(l, slot, h)] = rows_then[(l, then, h)]
            self.since[slot] -= since_then[then]
        for key in self.pages:  # a head keeps the pages of its bound: rows then plus a row a step since
            bound = min(self.known[key] + self.since[key[1]], self.pool.max_rows_per_head)
            self.pages[key] = min(self.pages[key], math.ceil(bound / self.pool.page_rows))

    @precondition(lambda self: self.since and len(self.since) < self.pool.max_seqs)
    @rule(data=st.data())
    def move(self, data):
        """A finished sequence's slot taken by another (a request stream keeps its sequences in the lowest)."""
        source = data.draw(st.sampled_from(sorted(self.since)))
        dest = data.draw(st.sampled_from([s for s in range(self.pool.max_seqs) if s not in self.since]))
        self.pool.move(source, dest)
        for l, h in self.heads:
            for table in (self.rows, self.pages, self.known):
                table[(l, dest, h)] = table.pop((l, source, h))
        self.since[dest] = self.since.pop(source)
        if self.snap and source in self.snap[2]:
            self.snap[2][dest] = self.snap[2].pop(source)

    @precondition(lambda self: self.since and len(self.since) < self.pool.max_seqs)
    @rule(data=st.data())
    def read_back_move_trim(self, data):
        """A request stream's order, which the rules above rarely draw: a hand-out's read-back, a finished
        sequence's slot taken by another, the next hand-out's trim."""
        self.request_trim()
        self.move(data)
        self.trim()

    @rule(slot=st.integers(-1, 3))
    def release(self, slot):
        if slot not in self.since:
            before = _state(self.pool)
            with pytest.raises(ValueError):
                self.pool.release(slot)
            _assert_unchanged(before, self.pool)
            return
        free_before, held = self.pool.free_pages, self.pool.pages_held(slot)
        assert held == sum(self.pages[(l, slot, h)] for l, h in self.heads)
        self.pool.release(slot)
        event(f"release: {'pages returned' if held else 'no pages'}")
        assert self.pool.free_pages == free_before + held
        del self.since[slot]
        if self.snap:
            self.snap[2].pop(slot, None)
        for l, h in self.heads:
            del self.rows[(l, slot, h)], self.pages[(l, slot, h)], self.known[(l, slot, h)]

    # --- invariants ---

    @invariant()
    def accounting(self):
        in_use = sum(self.pages.values())
        assert self.pool.pages_in_use == in_use
        assert self.pool.free_pages == self.pool.num_pages - in_use
        assert self.pool.bytes_in_use == in_use * 2 * self.pool.page_rows * HEAD_DIM * 4
        assert self.pool.peak_pages_in_use == self.peak
        assert self.pool.live_slots == sorted(self.since)
        if not self.since:
            assert self.pool.free_pages == self.pool.num_pages

    @invariant()
    def pages_have_one_owner(self):
        table = self.pool.block_table.tolist()
        owner = {}
        for l in range(self.pool.layers):
            for s in range(self.pool.max_seqs):
                for h in range(self.pool.kv_heads):
                    held = self.pages.get((l, s, h), 0)
                    entries = table[l][s][h]
                    assert all(e == NO_PAGE for e in entries[held:]), (l, s, h, entries, held)
                    for page in entries[:held]:
                        assert 0 <= page < self.pool.num_pages and page not in owner, (page, owner.get(page))
                        owner[page] = (l, s, h)

    @invariant()
    def rows_read_back_as_written(self):
        lengths = torch.zeros(self.pool.lengths.shape, dtype=torch.int32)
        for (l, s, h), held in self.rows.items():
            lengths[l, s, h] = len(held)
        assert torch.equal(self.pool.lengths, lengths)
        longest = int(lengths.max())
        keys = gather_rows(self.pool.keys, self.pool.block_table, self.pool.lengths, longest)
        values = gather_rows(self.pool.values, self.pool.block_table, self.pool.lengths, longest)
        expected = torch.zeros(keys.shape)
        for (l, s, h), held in self.rows.items():
            for row, value in enumerate(held):
                expected[l, s, h, row] = _row(value)[0]
        assert torch.equal(keys, expected)
        assert torch.equal(values, -expected)

    @invariant()
    def buffers_never_move(self):
        assert _pointers(self.pool) == self.pointers


PagedPoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPagedPool = PagedPoolMachine.TestCase


@pytest.mark.parametrize("page_rows", [0, 3, 6, 12, -4, 2.0, True])
def test_page_rows_must_be_a_power_of_two(page_rows):
    with pytest.raises(ValueError, match=f"page_rows must be a power of two, got {page_rows!r}"):
        _pool(page_rows=page_rows)
    with pytest.raises(ValueError, match=f"got {page_rows!r}"):
        PagedKVPool.for_budget(tiny_config(), 2**20, max_seqs=1, page_rows=page_rows, dtype=torch.float32,
                               device="cpu")


def test_for_budget_sizes_pages_after_the_block_table():
    config = tiny_config()  # 2 layers, 2 KV heads, head_dim 32, 4096 positions
    table = PagedKVPool.table_bytes(2, 3, 2, 4096 // 16, config.dms_window_size)  # the DMS ring included
    assert table == 2 * 3 * 2 * (4 * (256 + 1) + 9 * (config.dms_window_size + 1) + 8)
    page = 2 * 16 * 32 * 2
    pool = PagedKVPool.for_budget(config, table + 5 * page + page - 1, max_seqs=3, page_rows=16,
                                  dtype=torch.bfloat16, device="cpu")
    assert (pool.num_pages, pool.page_rows, pool.head_dim, pool.layers, pool.kv_heads) == (5, 16, 32, 2, 2)
    assert pool.max_pages_per_head == 256 and pool.nbytes == table + 5 * page
    assert tuple(pool.block_table.shape) == (2, 3, 2, 256) and tuple(pool.keys.shape) == (5, 16, 32)
    with pytest.raises(ValueError, match="holds no page"):
        PagedKVPool.for_budget(config, table + page - 1, max_seqs=3, page_rows=16, dtype=torch.bfloat16,
                               device="cpu")
    with pytest.raises(ValueError, match="dtype and device"):
        PagedKVPool.for_budget(config, 2**30, max_seqs=3)


def test_for_budget_takes_a_model():
    model = build_model(tiny_config(), backend=None, dtype=torch.float32, device="cpu")
    pool = PagedKVPool.for_budget(model, 2**20, max_seqs=2, page_rows=32, max_rows_per_head=100)
    assert (pool.dtype, pool.device.type, pool.max_pages_per_head) == (torch.float32, "cpu", 4)
    assert pool.num_pages == (2**20 - PagedKVPool.table_bytes(2, 2, 2, 4)) // (2 * 32 * 32 * 4)


def test_release_twice_or_unknown_slot():
    pool = _pool()
    slot = pool.admit()
    pool.prefill(slot, [[5, 1]])
    pool.release(slot)
    for bad in (slot, 1, -1, 2, None, "0"):
        with pytest.raises(ValueError, match="holds no live sequence"):
            pool.release(bad)
    assert pool.free_pages == pool.num_pages


def test_admit_checks_slots():
    pool = _pool(max_seqs=2)
    assert pool.admit(1) == 1 and pool.admit() == 0
    with pytest.raises(ValueError, match="all 2 sequence slots are live"):
        pool.admit()
    pool.release(1)
    with pytest.raises(ValueError, match="already holds a live sequence"):
        pool.admit(0)
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\), got 2"):
        pool.admit(2)
    assert pool.admit() == 1


def test_exhaustion_is_all_or_nothing():
    pool = _pool(num_pages=4, page_rows=4)
    slot = pool.admit()
    pool.prefill(slot, [[6, 1]])  # 2 + 1 pages
    other = pool.admit()
    before = _state(pool)
    with pytest.raises(PagesExhausted, match="3 pages asked with 1 of 4 free") as caught:
        pool.prefill(other, [[4, 5]])  # 1 + 2 pages: the first head's page would fit, the second's not
    _assert_unchanged(before, pool)
    assert isinstance(caught.value, torch.OutOfMemoryError) and isinstance(caught.value, PagesExhausted)
    assert failure_status(caught.value) == "OOM"
    with pytest.raises(PagesExhausted):
        pool.reserve_ahead(9)  # 2 + 2 pages for the first slot's heads, 3 + 3 for the second's
    _assert_unchanged(before, pool)
    pool.prefill(other, [[1, 0]])  # the last page
    assert pool.free_pages == 0 and pool.peak_pages_in_use == 4


def test_reserve_ahead_bound_and_advance():
    pool = _pool(num_pages=64, page_rows=4, max_seqs=1, kv_heads=2)
    slot = pool.admit()
    pool.prefill(slot, [[5, 8]])  # 2 + 2 pages, the first head has 3 spare rows, the second none
    with pytest.raises(RuntimeError, match="reserve_ahead"):
        pool.advance()
    pool.reserve_ahead(9)  # rows 14 and 17: 4 and 5 pages, at most ceil(9 / 4) = 3 new each
    assert pool.pages_held(slot) == 9
    pool.advance(11)  # the first head's pages hold 16 rows: room for 11 steps
    with pytest.raises(RuntimeError, match=r"pages for \[0\] more decode steps"):
        pool.advance()
    pool.reserve_ahead(1)  # bounds 16 and 19: the first head takes a page, the second has room
    assert pool.pages_held(slot) == 10
    pool.advance()
    pool.reserve_ahead(1)  # bounds 17 and 20: now the second head takes one
    assert pool.pages_held(slot) == 11


def test_a_read_back_of_a_dms_pool_counts_the_slot_reuses_ahead():
    """A window of 4 (ring of 5), step index 10: entries (10 + j) % 5 are read at steps j = 0..4, and the flags
    set at entries 0, 1 and 3 mean steps 0, 1 and 3 reuse a slot. Over the next 5 steps a head then grows by at
    most 2 rows (after 2 steps, if the reuses come last), then a row a step; pages and room follow."""
    pool = PagedKVPool(64, 4, HEAD_DIM, layers=1, max_seqs=1, kv_heads=2, max_rows_per_head=64,
                       dtype=torch.float32, device="cpu", window=4)
    slot = pool.admit()
    pool.prefill(slot, [[6, 6]])
    pool.step_index.fill_(10)
    pool.ring_flag[0, slot, 0, [0, 1, 3]] = True  # head 1: no flag, every step appends
    pool.request_trim(horizon=8)  # at most window + 1 = 5 steps are known
    pool.trim()
    assert pool.bounds(1).tolist() == [[[6, 6]]]
    assert pool.pages_short(5) == 0 + 1  # what a stream keeps back: head 0's 2 pages hold 8 rows already
    pool.reserve_ahead(5)  # head 0: 6 + 2 rows, 2 pages; head 1: 6 + 5, 3 pages
    assert pool.pages_held(slot) == 2 + 3
    assert pool.room(1) == 5  # head 0's 8 rows hold steps 0..4 (growth 2), no further
    pool.advance(5)
    assert pool.bounds(1).tolist() == [[[8, 11]]]
    with pytest.raises(RuntimeError, match="reserve_ahead"):
        pool.advance()
    pool.reserve_ahead(1)  # step 5 is not known: head 0 may reach 9 rows, a third page
    assert pool.pages_held(slot) == 3 + 3
    pool.advance()
    assert pool.bounds(1).tolist() == [[[9, 12]]]
    pool.release(slot)  # what the read-back knew goes with the sequence
    again = pool.admit()
    pool.prefill(again, [[6, 6]])
    pool.reserve_ahead(5)
    assert pool.pages_held(again) == 3 + 3  # 6 + 5 rows each: nothing known of the new sequence


def test_a_read_back_follows_a_sequence_moved_before_it_is_applied():
    """A request stream moves its last sequence into a finished one's slot between a hand-out, which starts a
    read-back, and the next, which applies it without a wait: the moved sequence takes its old slot's lengths
    and slot reuses (the tight DMS bound), and the one admitted since into that old slot keeps its own
    (nothing known). Until 2026-12-08 a move dropped the read-back, and the next hand-out gave every head a row
    a step: on an H100 stream completing ~1 request a second the pages swung 0.92 -> 0.99 of the pool and back
    at each forced trim (benchmarks/NOTES.md, session 15)."""
    pool = PagedKVPool(64, 4, HEAD_DIM, layers=1, max_seqs=3, kv_heads=1, max_rows_per_head=64,
                       dtype=torch.float32, device="cpu", window=4)
    finished, moved = pool.admit(), pool.admit()
    pool.prefill(finished, [[3]])
    pool.prefill(moved, [[6]])
    pool.step_index.fill_(10)
    pool.ring_flag[0, moved, 0, [0, 1, 3]] = True  # of the next 5 steps, 0, 1 and 3 reuse a slot
    pool.hand_out(2)  # pages for 2 steps; starts the read-back (horizon min(4 x 2, window + 1) = 5 steps)
    pool.advance(2)
    pool.release(finished)
    pool.move(moved, finished)
    fresh = pool.admit()
    assert fresh == moved  # the stream admits into the slot after the running ones: the moved one's old slot
    pool.prefill(fresh, [[5]])
    pool.hand_out(2)  # applies the read-back, then pages for 2 steps more
    bounds = pool.bounds(3)[0, :, 0].tolist()
    assert bounds[finished] == 6 + 2  # 2 steps since the read-back: at most 2 rows (5 - 3 reuses)
    assert pool.bounds(3, ahead=2)[0, finished, 0] == 8  # steps 2..3 add none: 2 pages, not 10 rows' 3
    assert pool.pages_held(finished) == 2
    assert bounds[fresh] == 5 and pool.pages_held(fresh) == 2  # its prefill, and 2 steps of a row each


def test_bound_spread_is_the_most_uneven_layers_longest_over_mean_bound():
    pool = _pool(num_pages=64, page_rows=4, layers=2, max_seqs=2, kv_heads=2)
    assert pool.bound_spread(2) == 1.0  # nothing held
    first, second = pool.admit(), pool.admit()
    pool.prefill_layer(0, [first, second], torch.tensor([[8, 8], [8, 8]]))
    pool.prefill_layer(1, [first, second], torch.tensor([[2, 2], [2, 10]]))
    assert pool.bound_spread(1) == 1.0  # slot 0 alone: every head of each layer as long as the others
    assert pool.bound_spread(2) == pytest.approx(10 / 4)  # layer 1: longest 10 over a mean of 4
    assert pool.longest_bound(None, 2) == 10
    pool.reserve_ahead(6)
    pool.advance(6)  # every bound 6 rows longer: layer 1's spread falls to 16 / 10
    assert pool.bound_spread(2) == pytest.approx(16 / 10) and pool.longest_bound(None, 2) == 16
    pool.release(second)  # not the figures asked before: slot 1's heads now hold nothing, slot 0's 14 and 8
    assert pool.bound_spread(2) == pytest.approx(14 / 7) and pool.longest_bound(None, 2) == 14


def test_trim_returns_pages_no_row_reached():
    pool = _pool(num_pages=16, page_rows=4, max_seqs=1, kv_heads=2)
    slot = pool.admit()
    pool.prefill(slot, [[3, 4]])
    _write(pool, 0, slot, 0, [0, 1, 2], [1.0, 2.0, 3.0])
    _write(pool, 0, slot, 1, [0, 1, 2, 3], [4.0, 5.0, 6.0, 7.0])
    pool.reserve_ahead(8)
    assert pool.pages_held(slot) == 3 + 3
    pool.advance(8)
    _write(pool, 0, slot, 0, [3, 4], [8.0, 9.0])  # the first head appended twice; slot reuse otherwise
    pool.lengths[0, slot, 0] += 2
    pool.trim()
    assert pool.pages_held(slot) == 2 + 1 and pool.free_pages == 13
    keys, values = pool.head_rows(0, slot, 0)
    assert keys[:, 0].tolist() == [1.0, 2.0, 3.0, 8.0, 9.0] and torch.equal(values, -keys)
    assert pool.head_rows(0, slot, 1)[0][:, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(RuntimeError, match="reserve_ahead"):
        pool.advance()  # the second head's page is full


def test_rows_read_back_in_order_from_scattered_pages():
    pool = _pool(num_pages=6, page_rows=2, max_seqs=3, kv_heads=1)
    a, b, c = pool.admit(), pool.admit(), pool.admit()
    for slot in (a, b, c):
        pool.prefill(slot, [[2]])
    pool.release(b)
    pool.reserve_ahead(3)  # a and c take two pages each: b's and the free ones, in any order
    for slot in (a, c):
        _write(pool, 0, slot, 0, [0, 1, 2, 3, 4], [10.0 * slot + i for i in range(5)])
        pool.lengths[0, slot, 0] = 5
    tables = pool.block_table[0, [a, c], 0].tolist()
    assert sorted(p for t in tables for p in t if p != NO_PAGE) == list(range(6))
    out = gather_rows(pool.keys, pool.block_table[0, [a, c], 0], pool.lengths[0, [a, c], 0], 6)
    assert out[..., 0].tolist() == [[0.0, 1, 2, 3, 4, 0], [20.0, 21, 22, 23, 24, 0]]


def test_buffers_never_move():
    pool = _pool(num_pages=8, page_rows=2, max_seqs=2)
    pointers = _pointers(pool)
    operations = [
        pool.admit, lambda: pool.prefill(0, [[3, 0]]), lambda: pool.reserve_ahead(2), pool.advance,
        pool.trim, lambda: pool.admit(1), lambda: pool.prefill(1, [[1, 4]]), lambda: pool.release(0),
        lambda: pool.reserve_ahead(4), lambda: pool.release(1),
    ]
    for operation in operations:
        operation()
        assert _pointers(pool) == pointers
    assert pool.free_pages == pool.num_pages


def test_prefill_checks_rows():
    pool = _pool(max_rows_per_head=10)
    slot = pool.admit()
    with pytest.raises(ValueError, match=r"\[layers, kv_heads\] = \[1, 2\]"):
        pool.prefill(slot, [1, 2])
    with pytest.raises(ValueError, match=r"row counts must lie in \[0, 10\]"):
        pool.prefill(slot, [[11, 0]])
    pool.prefill(slot, torch.tensor([[10, 0]]))
    with pytest.raises(ValueError, match="prefilled once"):
        pool.prefill(slot, [[1, 1]])


def test_hand_out_keeps_a_late_read_back_and_waits_for_it_one_hand_out_later():
    """A host running ahead of the device: the read-back started at a hand-out has not landed by the next.
    It is kept (a newer one would not land either), not waited for; the hand-out after waits for it and
    trims by it, returning the pages slot reuse left empty."""

    class Late:  # a CUDA event that has not fired until waited for
        waits = 0

        def query(self):
            return False

        def synchronize(self):
            Late.waits += 1

    pool = _pool(num_pages=16, page_rows=4, max_seqs=1, kv_heads=1)
    slot = pool.admit()
    pool.prefill(slot, [[3]])
    pool.hand_out(4)  # pages for 3 + 4 rows; its read-back (3 rows) starts
    snapshot = pool._snapshot
    pool._snapshot = (snapshot[0], Late(), *snapshot[2:])
    late = pool._snapshot
    pool.advance(4)  # the device reuses slots: the head stays at 3 rows
    pool.hand_out(4)
    assert pool._snapshot is late and Late.waits == 0  # kept, not waited for, not replaced
    assert pool.pages_held(slot) == 3  # bound 3 + 4 + 4 rows: nothing trimmed yet
    pool.advance(4)
    pool.hand_out(4)
    assert Late.waits == 1 and pool._snapshot is not late  # waited for, applied, a new read-back started
    # trimmed by 3 rows + the 8 steps since the read-back, then 4 more reserved: 15 rows, 4 pages
    assert pool.pages_held(slot) == 4
