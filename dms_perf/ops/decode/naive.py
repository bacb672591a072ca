"""The readable reference of DMS decode attention (tests only)."""

from __future__ import annotations

import torch


def dms_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """What :func:`dms_decode_attention` computes, written as literally as possible: for every query
    head ``h * G + g`` of every sequence b, softmax attention over exactly the ``lengths[b, h]`` rows of
    the caches from ``starts[b, h]`` (read on the host, one head at a time; no length bound at all, so
    nothing is cut short). A head of length 0 gives zeros.

    Computed and returned in ``compute_dtype``: fp64 for the truth; the input dtype measures what
    plain torch loses at that precision (the tests' tolerance rule, ``tests/ops/accuracy.py``).
    """
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // starts.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    firsts, counts = starts.tolist(), lengths.tolist()
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=compute_dtype, device=q.device)
    for b in range(batch):
        for hq in range(num_q_heads):
            first, n = firsts[b][hq // group], counts[b][hq // group]
            if n <= 0:
                continue
            keys = k_cache[first : first + n].to(compute_dtype)
            values = v_cache[first : first + n].to(compute_dtype)
            probs = torch.softmax((keys @ q[b, hq].to(compute_dtype)) * scale, dim=0)
            out[b, hq] = probs @ values
    return out


# The block table's entry for a page a head does not hold (dms_perf.model.paged.NO_PAGE; ops do not import
# the model).
NO_PAGE = -1


def paged_head_rows(pages: torch.Tensor, table: list[int], length: int, page_rows: int) -> torch.Tensor:
    """One head's rows ``0 .. length - 1`` in order, read page by page from its table entries ``table``
    (a host list): entry ``j`` holds rows ``j * page_rows ..`` in page ``table[j]`` of ``pages``
    ``[num_pages, page_rows, D]``. A ``NO_PAGE`` entry's rows, and rows past the table, are left out
    (the kernels treat them as masked)."""
    rows = []
    for j, page in enumerate(table):
        first = j * page_rows
        if first >= length:
            break
        if page != NO_PAGE:
            rows.append(pages[page, : min(page_rows, length - first)])
    return torch.cat(rows) if rows else pages.new_empty((0, pages.shape[2]))


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    page_rows: int,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """:func:`dms_decode_attention` over a paged cache, as literally as possible: each head's rows are
    gathered by :func:`paged_head_rows` (a loop over its table entries on the host), then attended as in
    :func:`dms_decode_attention_reference`. ``k_cache`` / ``v_cache``: the pages viewed as
    ``[num_pages * page_rows, D]``. A head with no rows gives zeros."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // lengths.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    k_pages, v_pages = (c.view(-1, page_rows, head_dim) for c in (k_cache, v_cache))
    tables, counts = block_table.tolist(), lengths.tolist()
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=compute_dtype, device=q.device)
    for b in range(batch):
        for hq in range(num_q_heads):
            table, n = tables[b][hq // group], counts[b][hq // group]
            keys = paged_head_rows(k_pages, table, n, page_rows).to(compute_dtype)
            values = paged_head_rows(v_pages, table, n, page_rows).to(compute_dtype)
            if keys.shape[0] == 0:
                continue
            probs = torch.softmax((keys @ q[b, hq].to(compute_dtype)) * scale, dim=0)
            out[b, hq] = probs @ values
    return out
