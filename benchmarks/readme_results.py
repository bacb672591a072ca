"""The README's "Results" section, rendered from the committed JSON of one card (never typed by hand).

    python -m benchmarks.readme_results                 # print the section for the README's card
    python -m benchmarks.readme_results --write         # replace it in README.md

Sources, all under version control: the card's newest pytest-benchmark baseline with ``test_decode_batch``
cases (``benchmarks/baselines/<card>/*/NNNN_baseline.json``), the serving run
(``benchmarks/results/<card>/serving/results.json``, ``dms-perf bench``) and the capacity runs
(``benchmarks/results/<card>/capacity/capacity.json`` and ``LONG_CAPACITY``'s, ``dms-perf capacity``).
Every table names its card, command, date and commit. ``tests/test_readme.py`` checks that README.md holds
exactly this rendering.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dms_perf.bench.report import card_name

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CARD = "nvidia-h100-80gb-hbm3"  # the card the README shows
BEGIN, END = "<!-- results: begin (python -m benchmarks.readme_results --write) -->", "<!-- results: end -->"
PAIR = ("dms-triton", "dense-triton")
# The long-generation capacity run the README shows (1K prompts, 16K generated; both methods, joined).
LONG_CAPACITY = "capacity-1k-16k-card-bbf9461"
# (context, batch) cells of the decode-batch table, in order.
DECODE_CELLS = ((32768, 1), (32768, 8), (32768, 32), (8192, 1), (8192, 8), (8192, 32))


def newest_baseline(card: str = CARD, test: str = "test_decode_batch") -> Path:
    """The card's newest baseline holding cases of ``test`` (a baseline may re-measure only some benchmarks)."""
    files = sorted((REPO / "benchmarks" / "baselines" / card).glob("*/[0-9][0-9][0-9][0-9]_*.json"))
    for path in reversed(files):
        if any(case["name"].startswith(test + "[") for case in json.loads(path.read_text())["benchmarks"]):
            return path
    raise FileNotFoundError(f"no baseline with {test} cases for {card} under benchmarks/baselines/{card}/")


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _n(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _where(meta: dict, path: Path) -> str:
    commit = meta.get("commit") or "unknown commit"
    return f"`{path.relative_to(REPO)}`, {meta['card']}, {meta['date']}, commit {commit}"


def decode_table(path: Path) -> str:
    """``test_decode_batch``: ms per step with its floor fraction and tok/s, DMS against dense, per cell."""
    data = json.loads(path.read_text())
    cases = {}
    for case in data["benchmarks"]:
        info = case["extra_info"]
        if case["name"].startswith("test_decode_batch["):
            cases[info["context_length"], info["method"], info["batch"]] = info
    device = data["machine_info"].get("dms_perf_device", {})
    meta = {"card": card_name({"device": device}), "date": data["datetime"][:16].replace("T", " ") + " UTC",
            "commit": device.get("commit")}
    lines = [
        f"Decode steps of B sequences on the engine (`pytest benchmarks/test_model.py -k decode_batch`; "
        f"{_where(meta, path)}). tok/s over all sequences; in brackets ms per step and the fraction of the "
        "step's read floor (the weights it reads and the kept K/V at the measured copy bandwidth).",
        "",
        f"| sequences x context | {PAIR[0]} | {PAIR[1]} | DMS / dense | floors' ratio |",
        "|---|---|---|---|---|",
    ]
    for ctx, batch in DECODE_CELLS:
        cells, figures = [], []
        for method in PAIR:
            info = cases.get((ctx, method, batch))
            if info is None:
                cells.append("not in the run")
                figures.append(None)
            elif "oom" in info:
                cells.append(f"out of memory ({info['oom']})")
                figures.append(None)
            else:
                cells.append(f"{_n(info['decode_tok_s'])} ({info['decode_step_ms']:.2f} ms, "
                             f"{info['floor_fraction']:.2f})")
                figures.append(info)
        ratio = floors = ""
        if all(figures):
            ratio = f"{figures[0]['decode_tok_s'] / figures[1]['decode_tok_s']:.2f}x"
            floors = f"{figures[1]['floor_ms'] / figures[0]['floor_ms']:.2f}x"
        lines.append(f"| {batch} x {_k(ctx)} | {cells[0]} | {cells[1]} | {ratio} | {floors} |")
    return "\n".join(lines)


def _run_meta(meta: dict) -> dict:
    return {"card": card_name(meta), "date": meta["date"], "commit": (meta.get("device") or {}).get("commit")}


def _head(what: str, meta: dict, path: Path, columns: str, more: str = "") -> list[str]:
    """A run's sentence (what, its command, file, card, date and commit) and its table's header."""
    return [f"{what} (`{meta['command']}`; {_where(_run_meta(meta), path)}{more}).", "", columns,
            "|" + "---|" * columns.count(" | ") + "---|"]


def serving_table(path: Path) -> str:
    """``dms-perf bench``: decode tok/s, TTFT and KV bytes held / kept per (method, context, batch) cell."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    lines = _head(f"Whole generations of {meta['new_tokens']} tokens on needle prompts", meta, path,
                  "| method | sequences x context | decode tok/s | TTFT s | KV held GB | KV kept GB |",
                  f"; median of {meta['repeats']}")
    for row in data["rows"]:
        cell = f"{row.get('batch', 1)} x {_k(row['context'])}"
        if row.get("status") != "ok":
            lines.append(f"| {row['method']} | {cell} | {row.get('status')} | | | |")
            continue
        held = row["kv_bytes"]
        kept = row.get("kept_kv_bytes")
        lines.append(f"| {row['method']} | {cell} | {_n(row['decode_tok_s'])} | {row['prefill_s']:.2f} | "
                     f"{held / 1e9:.2f} | {'' if kept is None else f'{kept / 1e9:.2f}'} |")
    return "\n".join(lines)


def capacity_table(path: Path) -> str:
    """``dms-perf capacity``: the largest batch within the budget and its decode throughput, per method; with
    ``--new-tokens``, the largest batch whose whole generation fits and the throughput over it."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    budget = f"{meta['memory_budget_gib']:.1f} GiB"
    if meta.get("new_tokens"):
        what = f"The largest batch whose whole {_k(meta['new_tokens'])}-token generation fits {budget}"
        columns = "| method | prompt | largest batch | tok/s over the generation | ms/step | peak GiB |"
    else:
        what = f"The largest batch whose decode fits {budget}"
        columns = "| method | context | largest batch | decode tok/s at it | ms/step | peak GiB |"
    lines = _head(what, meta, path, columns)
    for r in data["results"]:
        if not r["largest_batch"]:
            lines.append(f"| {r['method']} | {_k(r['context'])} | none fits | | | |")
            continue
        largest = f"{r['largest_batch']}" + (" (the --max-batch ceiling)" if r["ceiling_reached"] else
                                             " (at least: the search stopped)" if r["stopped"] else "")
        lines.append(f"| {r['method']} | {_k(r['context'])} | {largest} | {_n(r['tok_s'])} | "
                     f"{r['step_ms']:.1f} | {r['peak_bytes'] / 2**30:.1f} |")
    return "\n".join(lines)


def render(card: str = CARD) -> str:
    results = REPO / "benchmarks" / "results" / card
    return "\n".join([
        BEGIN,
        decode_table(newest_baseline(card)),
        "",
        serving_table(results / "serving" / "results.json"),
        "",
        capacity_table(results / "capacity" / "capacity.json"),
        "",
        capacity_table(results / LONG_CAPACITY / "capacity.json"),
        END,
    ])


def readme_block(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no results block between {BEGIN!r} and {END!r}")
    return text[start:end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", default=CARD, help="baseline / results folder name of the card")
    parser.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = parser.parse_args(argv)
    block = render(args.card)
    if args.write:
        text = README.read_text(encoding="utf-8")
        README.write_text(text.replace(readme_block(text), block), encoding="utf-8")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
