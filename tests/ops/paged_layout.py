"""Paged K/V layouts for the decode kernels' tests (decode attention, the cache update, the fused step).

Pages are handed out in a shuffled order, so a head's pages are neither contiguous nor ascending; every
table has ``NO_PAGE`` entries past each head's pages, and the buffers hold spare pages no head owns.
Rows are placed and looked up by loops over a head's table entries, never by the kernels' arithmetic.
"""

from __future__ import annotations

import torch

from dms_perf.ops.decode.naive import NO_PAGE
from dms_perf.testing import poison

SPARE_ENTRIES = 2  # NO_PAGE entries past the longest head's pages
SPARE_PAGES = 3  # pages no head owns


def shuffled_block_table(lengths: torch.Tensor, page_rows: int) -> tuple[torch.Tensor, int]:
    """A table giving each head of ``lengths`` ``[B, Hkv]`` the pages its rows need, drawn from a random
    permutation of all pages: ``(block_table [B, Hkv, max_pages] int32 on lengths' device, num_pages)``.
    A head of length 0 holds no page."""
    counts = [-(-n // page_rows) for n in lengths.flatten().tolist()]
    max_pages = max(counts) + SPARE_ENTRIES
    num_pages = sum(counts) + SPARE_PAGES
    order = torch.randperm(num_pages).tolist()
    table = torch.full((len(counts), max_pages), NO_PAGE, dtype=torch.int32)
    taken = 0
    for head, count in enumerate(counts):
        table[head, :count] = torch.tensor(order[taken : taken + count], dtype=torch.int32)
        taken += count
    return table.view(*lengths.shape, max_pages).to(lengths.device), num_pages


def empty_pages(num_pages: int, page_rows: int, head_dim: int, dtype, device) -> torch.Tensor:
    """``[num_pages * page_rows, D]`` pages, all NaN: a row read that was never written shows."""
    return poison(torch.empty(num_pages * page_rows, head_dim, dtype=dtype, device=device))


def physical_row(table: list[int], slot: int, page_rows: int) -> int | None:
    """Where logical ``slot`` of a head with table entries ``table`` lives in the pages viewed as
    ``[num_pages * page_rows, D]``, or None if no page holds it (a ``NO_PAGE`` entry, or past the table)."""
    for j, page in enumerate(table):
        if j * page_rows <= slot < (j + 1) * page_rows:
            return None if page == NO_PAGE else page * page_rows + slot - j * page_rows
    return None


def write_head(pages: torch.Tensor, table: list[int], rows: torch.Tensor, page_rows: int) -> None:
    """Store a head's logical rows ``rows`` ``[n, D]`` (row i at slot i) in ``pages`` through ``table``."""
    for slot in range(rows.shape[0]):
        row = physical_row(table, slot, page_rows)
        assert row is not None, f"slot {slot} has no page in {table}"
        pages[row] = rows[slot]


def strided_view(table: torch.Tensor, fill: int) -> torch.Tensor:
    """``table`` ``[B, Hkv, max_pages]`` as a non-contiguous view into a larger pool-like table (layers x
    slots x heads x wider rows), everything outside the view set to page ``fill``: a kernel that reads
    past the view's entries or ignores its strides reads that page."""
    B, Hkv, max_pages = table.shape
    holder = torch.full((2, B + 1, Hkv, max_pages + 2), fill, dtype=table.dtype, device=table.device)
    view = holder[1, :B, :, :max_pages]
    view.copy_(table)
    assert not view.is_contiguous()
    return view


def spare_page(table: torch.Tensor, num_pages: int) -> int:
    """A page no head of ``table`` holds, not the first (a row just before it is still in the buffer)."""
    return max(set(range(num_pages)) - set(table.flatten().tolist()))


def ring_state(lengths: list[list[int]], window: int, seen: int, device) -> dict[str, torch.Tensor]:
    """The cache-update bookkeeping of heads that have seen ``seen`` tokens and hold ``lengths[b][h]``
    rows (at least ``window + 1``, or 0: a dead head): tokens ``seen - window - 1 .. seen - 1`` sit in
    distinct random slots below the length, their flags random; a dead head's ring is zeros.
    Returns ``ring_slot``, ``ring_flag`` ``[B, Hkv, window + 1]``, ``lengths`` int32 ``[B, Hkv]`` and the
    ``step`` counter int64 ``[B * Hkv]`` of ``decode_update`` / ``fused_decode_step``."""
    B, Hkv, w1 = len(lengths), len(lengths[0]), window + 1
    ring_slot = torch.zeros(B, Hkv, w1, dtype=torch.int64)
    ring_flag = torch.zeros(B, Hkv, w1, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            if lengths[b][h] == 0:
                continue
            assert lengths[b][h] >= w1, "a live head holds its whole window"
            slots = torch.randperm(lengths[b][h])[:w1]
            for i, token in enumerate(range(seen - w1, seen)):
                ring_slot[b, h, token % w1] = slots[i]
                ring_flag[b, h, token % w1] = bool(torch.rand(()) < 0.5)
    return {
        "ring_slot": ring_slot.to(device),
        "ring_flag": ring_flag.to(device),
        "lengths": torch.tensor(lengths, dtype=torch.int32, device=device),
        "step": torch.full((B * Hkv,), seen, dtype=torch.int64, device=device),
    }


def copy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in state.items()}


def paged_heads(lengths, reserve, page_rows, D, dtype, device):
    """Pages for heads of ``lengths`` (list ``[B][Hkv]``) plus ``reserve`` more rows each (``[B][Hkv]``,
    the pool's reserve-ahead), their rows random and every other row NaN: ``(k_pages, v_pages, table)``,
    the table a strided view."""
    rows = torch.tensor(lengths) + torch.tensor(reserve) * (torch.tensor(lengths) > 0)
    table, num_pages = shuffled_block_table(rows, page_rows)
    k_pages, v_pages = (empty_pages(num_pages, page_rows, D, dtype, device) for _ in "kv")
    for b, heads in enumerate(lengths):
        for h, n in enumerate(heads):
            for pages in (k_pages, v_pages):
                write_head(pages, table[b, h].tolist(), torch.randn(n, D, device=device).to(dtype), page_rows)
    return k_pages, v_pages, strided_view(table.to(device), spare_page(table, num_pages))


def expected_stores(pages, table, slots, new_rows, page_rows):
    """``pages`` after each head (b, h) stored ``new_rows[b, h]`` at logical ``slots[b][h]``, where a
    page holds that slot; elsewhere nothing."""
    expected = pages.clone()
    tables = table.tolist()
    for b, heads in enumerate(slots):
        for h, slot in enumerate(heads):
            row = physical_row(tables[b][h], slot, page_rows)
            if row is not None:
                expected[row] = new_rows[b, h]
    return expected


def assert_same_pages(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
