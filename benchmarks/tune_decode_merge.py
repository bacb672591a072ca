"""Sweep the balanced decode scheduler's merge geometry on this GPU (how ``MERGE_TILE`` and
``MERGE_COLUMNS`` were chosen).

    PYTHONPATH=. python3 benchmarks/tune_decode_merge.py --context-length 32768 --out merge.json

With the balanced scheduler a head's merge takes ``cdiv(its chunks, MERGE_TILE)`` dependent steps, so a
head holding several times the mean length adds steps that even heads do not. For each (``MERGE_TILE``,
``MERGE_COLUMNS``) this times ``dms_decode_attention`` (bf16, Qwen3-8B heads) on the decode-attention
benchmark's caches (``benchmarks/test_decode_step.py``: the same lengths, ``even``, ``heads`` and ``trained``
spreads at equal rows, batch 1 / 8 / 32) as the benchmark times them (CUDA graphs of 8 calls, inputs
rotated past L2), and prints each median, its floor fraction, its time over the even case's of the same
geometry, and its output's largest difference from the first geometry's. Results: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.test_decode_step import CALLS_PER_GRAPH, _attention_inputs, _kept_lengths, attention_bytes
from dms_perf.bench.floors import bandwidth_floor
from dms_perf.bench.timing import median_call_ms, rotating
from dms_perf.ops.decode import kernel

CANDIDATES = [(16, 128), (16, 32), (64, 128), (64, 32), (128, 32), (256, 16)]  # (MERGE_TILE, MERGE_COLUMNS)
SPREADS = ("even", "heads", "trained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-length", type=int, default=32768)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "merge geometries", CANDIDATES)
    rows = []
    for batch, spread in itertools.product((int(b) for b in args.batches.split(",")), SPREADS):
        lengths = _kept_lengths(spread, batch, args.context_length)
        kv_bytes, moved, _ = attention_bytes(lengths)
        first = None
        torch.manual_seed(batch)
        check = _attention_inputs(lengths)  # one fixed input set for the outputs' agreement
        for tile, columns in CANDIDATES:
            kernel.MERGE_TILE, kernel.MERGE_COLUMNS = tile, columns
            out = check().float()
            first = out if first is None else first
            next_call = rotating(lambda lengths=lengths: _attention_inputs(lengths), kv_bytes)
            ms = median_call_ms(lambda next_call=next_call: next_call()(), cuda_graph=True,
                                calls_per_graph=CALLS_PER_GRAPH)
            floor = bandwidth_floor(moved, ms * 1e-3)
            row = dict(batch=batch, spread=spread, merge_tile=tile, merge_columns=columns, ms=ms,
                       floor_fraction=floor["floor_fraction"], max_over_mean=float(lengths.max()) / args.context_length,
                       max_diff_vs_first=float((out - first).abs().max()))
            rows.append(row)
        for row in rows[-len(CANDIDATES):]:
            even = next(r for r in rows if r["batch"] == batch and r["spread"] == "even"
                        and (r["merge_tile"], r["merge_columns"]) == (row["merge_tile"], row["merge_columns"]))
            row["over_even"] = row["ms"] / even["ms"]
            print(f"b{batch} {spread:8s} tile {row['merge_tile']:3d} cols {row['merge_columns']:3d}: "
                  f"{row['ms'] * 1e3:8.1f} us  floor {row['floor_fraction']:.3f}  over even {row['over_even']:.3f}  "
                  f"diff {row['max_diff_vs_first']:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "context_length": args.context_length,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
