"""Which cases a shard or an xdist worker runs: ``--shard I/N`` selection and one GPU per worker."""

from __future__ import annotations

import re

from dms_perf.ci.baselines import GateError


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> (2, 4): shard 2 of 4, 1-based."""
    if not text:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise GateError(f"--shard must look like I/N (e.g. 1/2), got {text!r}") from None
    if not 1 <= index <= count:
        raise GateError(f"--shard {text!r}: need 1 <= I <= N")
    return index, count


def _context_of(node_id: str) -> int:
    match = re.search(r"ctx(\d+)", node_id)
    return int(match.group(1)) if match else 0


def shard_node_ids(node_ids: list[str], index: int, count: int) -> list[str]:
    """Round-robin over the ids sorted by context length, then name: each shard gets the same number of
    cases of each context length, whose cost dominates (sorted by name alone, ``test_end_to_end[M-ctxN]``
    puts the lengths of a method next to each other, and one shard could get every 16K case)."""
    ordered = sorted(node_ids, key=lambda nid: (_context_of(nid), nid))
    return sorted(nid for k, nid in enumerate(ordered) if k % count == index - 1)


def gpu_for_worker(worker_id: str, device_count: int) -> int | None:
    """The GPU of pytest-xdist worker ``gwK`` (K mod the GPU count); None outside xdist or on one GPU."""
    if device_count < 2 or not worker_id.startswith("gw"):
        return None
    return int(worker_id[2:]) % device_count
