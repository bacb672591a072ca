"""Results of ``dms-perf bench``: results.json (written after every cell), results.md, PNG plots.

results.md holds the two tables of the kvcompress study: the full comparison (context, method, time,
tok/s, VRAM, TTFT, decode tok/s, KV bytes, compression, retrieval) and the DMS prefill speedup
(hub vs hub-triton vs triton: prefill seconds, speedups, VRAM saved).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from dms_perf.bench.methods import DEFAULT_METHODS, FAMILIES, model_config

JSON_NAME = "results.json"
MD_NAME = "results.md"
TIME_PLOT = "time_vs_context.png"
MEMORY_PLOT = "vram_vs_context.png"
DASH = "—"


class ResultsWriter:
    """Collects rows; every ``add`` rewrites results.json atomically, so an interrupted run loses nothing."""

    def __init__(self, out_dir: str | os.PathLike, meta: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.rows: list[dict[str, Any]] = []
        self._write_json()

    @property
    def json_path(self) -> Path:
        return self.out_dir / JSON_NAME

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write_json()

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str) + "\n")
        os.replace(tmp, self.json_path)

    def finish(self) -> list[Path]:
        """Write results.md and the plots; returns every file written."""
        md = self.out_dir / MD_NAME
        md.write_text(render_markdown(self.meta, self.rows))
        return [self.json_path, md, *write_plots(self.rows, self.out_dir)]


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a results.json, or of the results.json inside a directory, or of a pytest-benchmark
    JSON of ``benchmarks/test_end_to_end.py`` (``results_from_benchmarks``)."""
    path = Path(path)
    data = json.loads((path / JSON_NAME if path.is_dir() else path).read_text())
    if "benchmarks" in data and "meta" not in data:
        return results_from_benchmarks(data, source=path.name)
    return data["meta"], data["rows"]


def results_from_benchmarks(data: dict[str, Any], source: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) from a pytest-benchmark run: the end-to-end cases (``benchmarks/test_end_to_end.py``)
    keep each cell's row in ``extra_info``, measured by the helpers ``dms-perf bench`` uses; other cases
    are ignored. Cells skipped there (out of memory, prompt too short) have no row."""
    rows = []
    for case in data["benchmarks"]:
        info = case.get("extra_info", {})
        if "total_s" not in info or "method" not in info:
            continue
        row = {"context": case["params"]["context_length"], "method": info["method"],
               "new_tokens": info["generated_tokens"], "status": "ok"}
        row.update({k: v for k, v in info.items() if k not in row})
        rows.append(row)
    if not rows:
        raise ValueError(f"{source or 'this run'} holds no end-to-end case (benchmarks/test_end_to_end.py)")
    # A sharded run lists its cases shard by shard: order them as dms-perf bench does, by context, then in
    # the registry's order of the default methods (others after, by name).
    order = {name: i for i, name in enumerate(DEFAULT_METHODS)}
    rows.sort(key=lambda r: (r["context"], order.get(r["method"], len(order)), r["method"]))
    first = rows[0]
    target = first.get("target_cr")
    weights = first.get("weights", "random weights")
    if target and any(r.get("calibrated_marked_fraction") is not None for r in rows):
        weights += f", eviction calibrated to {target:g}x"
    meta = {
        "date": data.get("datetime", "")[:16].replace("T", " ") + " UTC",
        "device": data.get("machine_info", {}).get("dms_perf_device", {}),
        "model": first.get("model"),
        "dtype": first.get("dtype"),
        "weights": weights,
        "contexts": sorted({r["context"] for r in rows}),
        "methods": list(dict.fromkeys(r["method"] for r in rows)),
        "new_tokens": first["new_tokens"],
        "repeats": first.get("repeats"),
        "warmup": first.get("warmup_runs"),
        "needle_depth": first.get("needle_depth"),
        "calibration": {},
        "command": "pytest benchmarks/test_end_to_end.py" + (f" (pytest-benchmark JSON {source})" if source else ""),
    }
    for row in rows:  # the run's text on every row, as merge_results keeps it (extra_info has the model's only)
        row["weights"] = weights
    return meta, rows


def merge_results(paths: list[str | os.PathLike]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join runs made in parts (e.g. one device call per group of methods, or a ``--methods vanilla`` run
    with a default one) on the same card.

    Runs join when their card (``device["gpu"]``), model, dtype and seed agree (a seed a run does not
    record agrees with any); other runs raise ValueError. Each row keeps the weights text of the run it
    came from (``row["weights"]``: "random weights", "random weights, eviction calibrated to 8x", ...), so
    runs calibrated differently can be joined and still be told apart. Metadata is the first run's, with
    the union of contexts and methods (in the order the runs list them) and every command; a cell
    measured twice keeps the later run's row. Rows come in method order, then by context.
    """
    if not paths:
        raise ValueError("merge_results needs at least one results.json")
    meta: dict[str, Any] = {}
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for path in paths:
        m, r = load_results(path)
        if not meta:
            meta = {**m, "commands": []}
        for what, mine, first in (
            ("device gpu", m.get("device", {}).get("gpu"), meta.get("device", {}).get("gpu")),
            ("model", m.get("model"), meta.get("model")),
            ("dtype", m.get("dtype"), meta.get("dtype")),
        ):
            if mine != first:
                raise ValueError(f"cannot merge {path}: its {what} {mine!r} differs from {first!r}")
        if m.get("seed") is not None:
            if meta.get("seed") is None:
                meta["seed"] = m["seed"]
            elif m["seed"] != meta["seed"]:
                raise ValueError(f"cannot merge {path}: its seed {m['seed']!r} differs from {meta['seed']!r}")
        meta["commands"].append(m.get("command"))
        meta["contexts"] = sorted(set(meta.get("contexts", [])) | set(m.get("contexts", [])))
        meta["methods"] = list(dict.fromkeys([*meta.get("methods", []), *m.get("methods", [])]))
        meta["calibration"] = {**meta.get("calibration", {}), **m.get("calibration", {})}
        for row in r:
            row = dict(row)
            if not m.get("weights_by_row") and m.get("weights") is not None:
                row["weights"] = m["weights"]  # the run's own text (a row of an older file may hold less)
            rows[(row["context"], row["method"])] = row
    meta["command"] = " ; ".join(c for c in meta.pop("commands") if c)
    merged = ordered_rows(list(rows.values()), meta["methods"])
    texts = list(dict.fromkeys(r["weights"] for r in merged if r.get("weights") is not None))
    meta.pop("weights_by_row", None)
    if len(texts) > 1:
        meta["weights"] = "per row: " + " | ".join(texts)
        meta["weights_by_row"] = True
    elif texts:
        meta["weights"] = texts[0]
    return meta, merged


def method_order(rows: list[dict[str, Any]], methods: list[str] | None = None) -> list[str]:
    """Methods of ``rows`` in the order ``methods`` (a run's ``--methods``, its meta) lists them, repeats
    dropped; methods it does not list (or all, without it) follow in the registry's default order, then
    in the order of the rows."""
    present = set(r["method"] for r in rows)
    listed = [m for m in dict.fromkeys(methods or []) if m in present]
    rest = [m for m in DEFAULT_METHODS if m in present and m not in listed]
    rest += [m for m in dict.fromkeys(r["method"] for r in rows) if m not in listed and m not in rest]
    return listed + rest


def ordered_rows(rows: list[dict[str, Any]], methods: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (context, method) cell, a cell listed twice keeping its later row, in method order
    (``method_order``), then by context."""
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        cells[(r["context"], r["method"])] = r
    order = {m: i for i, m in enumerate(method_order(rows, methods))}
    return sorted(cells.values(), key=lambda r: (order[r["method"]], r["context"]))


# --- formatting ------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _gib(value) -> str:
    return DASH if value is None else f"{value / 2**30:.2f}"


def _mib(value) -> str:
    return DASH if value is None else f"{value / 2**20:,.1f}"


def _ok(row) -> bool:
    return row.get("status") == "ok"


def _tok_s(row) -> float | None:
    """End-to-end throughput: generated tokens over total seconds (prefill included)."""
    return row["generated_tokens"] / row["total_s"] if row.get("total_s") else None


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _weights_differ(rows: list[dict[str, Any]]) -> bool:
    return len({r["weights"] for r in rows if r.get("weights") is not None}) > 1


def comparison_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """The full comparison, one row per cell in ``methods`` order, then by context (``ordered_rows``); a
    Weights column (each row's run's weights text) where joined runs differ."""
    rows = ordered_rows(rows, methods)
    weights = _weights_differ(rows)
    head = ("| Context | Method | Time (s) | tok/s | Peak VRAM (GiB) | TTFT (s) | Prefill tok/s | Decode tok/s "
            "| KV cache (MiB) | Compression | Retrieval |" + (" Weights |" if weights else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tail = f" {r.get('weights') or DASH} |" if weights else ""
        if not _ok(r):
            lines.append(f"| {_ctx(r['context'])} | {r['method']} | {r['status']} |" + f" {DASH} |" * 8 + tail)
            continue
        compression = DASH if r.get("compression") is None else f"{r['compression']:.2f}x"
        lines.append(
            f"| {_ctx(r['context'])} | {r['method']} | {_num(r['total_s'])} | {_num(_tok_s(r))} "
            f"| {_gib(r.get('peak_vram_bytes'))} | {_num(r['prefill_s'])} | {_num(r['prefill_tok_s'])} "
            f"| {_num(r.get('decode_tok_s'))} | {_mib(r['kv_bytes'])} | {compression} | {r['retrieval']} |" + tail
        )
    return "\n".join(lines)


def speedup_rows(rows: list[dict[str, Any]], base: str = "dms-hub", fast: str = "dms-triton",
                 mid: str = "dms-hub-triton") -> list[dict[str, Any]]:
    """Per context with ``base`` and ``fast`` or ``mid`` present: prefill seconds of the three (None where
    a method is absent or failed, its status then in ``*_status``), the speedups of ``mid`` and ``fast``
    over ``base`` and of ``fast`` over ``mid``, and the VRAM ``fast`` saves over ``base`` (None if n/a)."""
    by = {(r["context"], r["method"]): r for r in rows}
    out = []
    for ctx in sorted({r["context"] for r in rows}):
        b, m, f = by.get((ctx, base)), by.get((ctx, mid)), by.get((ctx, fast))
        if b is None or (f is None and m is None):
            continue
        prefill = {k: r["prefill_s"] if r is not None and _ok(r) else None for k, r in (("b", b), ("m", m), ("f", f))}
        vram_b = b.get("peak_vram_bytes") if _ok(b) else None
        vram_f = f.get("peak_vram_bytes") if f is not None and _ok(f) else None
        out.append({
            "context": ctx,
            "base_status": b["status"], "mid_status": m and m["status"], "fast_status": f and f["status"],
            "base_prefill_s": prefill["b"], "mid_prefill_s": prefill["m"], "fast_prefill_s": prefill["f"],
            "speedup": _ratio(prefill["b"], prefill["f"]),
            "mid_speedup": _ratio(prefill["b"], prefill["m"]),
            "fast_over_mid": _ratio(prefill["m"], prefill["f"]),
            "base_vram_bytes": vram_b, "fast_vram_bytes": vram_f,
            "vram_saved_bytes": vram_b - vram_f if vram_b is not None and vram_f is not None else None,
        })
    return out


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow is not None and fast else None


def speedup_table(rows: list[dict[str, Any]]) -> str:
    """dms-hub vs dms-hub-triton vs dms-triton prefill; a method absent from the run shows a dash, a
    failed one its status."""
    lines = [
        "| Context | Hub prefill (s) | Hub-triton prefill (s) | Triton prefill (s) | Hub-triton speedup over hub "
        "| Triton speedup over hub | Triton over hub-triton | Hub peak VRAM (GiB) | Triton peak VRAM (GiB) "
        "| VRAM saved (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def prefill(status, seconds):
        return DASH if status is None else _num(seconds) if status == "ok" else status

    def times(value):
        return DASH if value is None else f"{value:.2f}x"

    for s in speedup_rows(rows):
        lines.append(
            f"| {_ctx(s['context'])} | {prefill(s['base_status'], s['base_prefill_s'])} "
            f"| {prefill(s['mid_status'], s['mid_prefill_s'])} | {prefill(s['fast_status'], s['fast_prefill_s'])} "
            f"| {times(s['mid_speedup'])} | {times(s['speedup'])} | {times(s['fast_over_mid'])} "
            f"| {_gib(s['base_vram_bytes'])} | {_gib(s['fast_vram_bytes'])} | {_gib(s['vram_saved_bytes'])} |"
        )
    return "\n".join(lines)


def _no_gpu(meta: dict[str, Any]) -> bool:
    device = meta.get("device") or {}
    return device.get("gpu") in (None, "none") or device.get("gpu_slug") == "cpu"


def _family(method: str):
    return FAMILIES.get(method.partition(":")[0])


def _dms_window(model: str | None) -> int | None:
    """The DMS sliding window of a random model (``tiny``, ``qwen3-8b``); None for a checkpoint."""
    try:
        return int(model_config(model).dms_window_size)
    except (ValueError, TypeError, AttributeError):
        return None


def reading_notes(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What in these tables looks wrong and is not, each only where it applies: DMS compression below its
    calibration (the window), Triton in the interpreter, VRAM not measured, single-repeat CPU figures."""
    rows = ordered_rows(rows, meta.get("methods"))
    ok = [r for r in rows if _ok(r)]
    notes = []

    below: dict[float, list[dict[str, Any]]] = {}  # calibrated target -> its evicting DMS rows below it
    for r in ok:
        found = re.search(r"calibrated to ([0-9.]+)x", r.get("weights") or meta.get("weights") or "")
        family = _family(r["method"])
        if found and family and family.backend and family.evict and r.get("compression") is not None:
            target = float(found.group(1))
            if r["compression"] < 0.9 * target:
                below.setdefault(target, []).append(r)
    for target, low in below.items():
        example = [r for r in low if r["method"] == low[0]["method"]]
        seen = f"{example[0]['method']}: {example[0]['compression']:.2f}x at {_ctx(example[0]['context'])}"
        if len(example) > 1:
            seen += f", {example[-1]['compression']:.2f}x at {_ctx(example[-1]['context'])}"
        window = _dms_window(meta.get("model"))
        what = f"the {window}-token window" if window else "the DMS window"
        last = f"the last {window} tokens" if window else "the tokens of its sliding window"
        notes.append(f"At short contexts {what} dominates: DMS never evicts {last}, so eviction calibrated to "
                     f"{target:g}x shows less compression ({seen}), nearing {target:g}x as the prompt grows.")

    if _no_gpu(meta):
        triton = list(dict.fromkeys(r["method"] for r in ok if "triton" in r["method"].partition(":")[0]))
        if triton:
            speedups = [v for s in speedup_rows(rows) for v in (s["speedup"], s["mid_speedup"]) if v is not None]
            example = f" (e.g. the {speedups[0]:.2f}x below)" if speedups else ""
            notes.append(f"No GPU: the Triton rows ({', '.join(triton)}) ran in Triton's interpreter "
                         f"(TRITON_INTERPRET=1, each kernel program stepped through in NumPy), so their times are "
                         f"not speeds, and a speedup computed from them{example} is not a speedup.")
    if any(r.get("peak_vram_bytes") is None for r in ok):
        notes.append(f"{DASH} under Peak VRAM means not measured"
                     + (": there is no GPU here (peak VRAM is CUDA's allocator peak)." if _no_gpu(meta) else "."))
    if _no_gpu(meta) and any(r.get("repeats", meta.get("repeats")) == 1 for r in ok):
        notes.append("CPU figures from one timed run per cell (--repeats 1"
                     + (", tiny random model" if meta.get("model") == "tiny" else "")
                     + ") are smoke figures: they show that every method runs end to end, not how fast it is.")
    return notes


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    device = meta.get("device", {})
    if not meta.get("weights_by_row"):  # one run: its text on every row that has none of its own
        rows = [r if r.get("weights") or meta.get("weights") is None else {**r, "weights": meta["weights"]}
                for r in rows]
    weights = meta.get("weights", DASH)
    if _weights_differ(rows):
        weights = "weights differ between the joined runs (Weights column): " + ", ".join(
            f'"{text}"' for text in dict.fromkeys(r["weights"] for r in rows if r.get("weights")))
    card = "no GPU (CPU)" if device.get("gpu") == "none" else device.get("gpu", DASH)
    parts = [
        "# dms-perf bench results",
        "",
        f"- date: {meta.get('date', DASH)}",
        f"- card: {card} (torch {device.get('torch', DASH)}, triton {device.get('triton', DASH)})",
        f"- model: {meta.get('model', DASH)}, {meta.get('dtype', DASH)}; {weights}",
        f"- workload: needle in a haystack, needle at depth {meta.get('needle_depth', DASH)}, "
        f"{meta.get('new_tokens', DASH)} new tokens, median of {meta.get('repeats', DASH)} runs after "
        f"{meta.get('warmup', DASH)} warm-up",
        f"- command: `{meta.get('command', DASH)}`",
        "",
        "Time = TTFT (prefill, first token included) + decode; tok/s = generated tokens / time; peak VRAM "
        "includes the weights; compression = dense KV slots / slots still attended at the end.",
        "",
    ]
    notes = reading_notes(meta, rows)
    if notes:
        parts += ["**Reading this table**", "", *(f"- {n}" for n in notes), ""]
    parts += [
        "## Full comparison",
        "",
        comparison_table(rows, meta.get("methods")),
        "",
        "## DMS prefill speedup (hub vs hub-triton vs triton)",
        "",
    ]
    if speedup_rows(rows):
        parts.append(speedup_table(rows))
    else:
        parts.append("Needs both dms-hub and dms-triton (or dms-hub-triton) in --methods.")
    return "\n".join(parts) + "\n"


# --- plots -------------------------------------------------------------------------------------------


def write_plots(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """time_vs_context.png (total and TTFT) and vram_vs_context.png (peak VRAM and KV cache) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = ordered_rows(rows)
    ok = [r for r in rows if _ok(r)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = {
        TIME_PLOT: (("total_s", "total time (s)", 1.0), ("prefill_s", "TTFT / prefill (s)", 1.0)),
        MEMORY_PLOT: (("peak_vram_bytes", "peak VRAM (GiB)", 2**-30), ("kv_bytes", "KV cache at end (MiB)", 2**-20)),
    }
    written = []
    for filename, specs in panels.items():
        fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5))
        for ax, (key, label, scale) in zip(axes, specs, strict=True):
            plotted = False
            for m in methods:
                pts = sorted((r["context"], r[key] * scale) for r in ok if r["method"] == m and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=m)
                    plotted = True
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if plotted:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured here (no CUDA device)" if key == "peak_vram_bytes" else "no data",
                        ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
