"""Results of ``dms-perf bench``: results.json (written after every cell), results.md, PNG plots.

results.md holds the two tables of the kvcompress study: the full comparison (context, method, time,
tok/s, VRAM, TTFT, decode tok/s, KV bytes, compression, retrieval) and the DMS prefill speedup
(hub vs hub-triton vs triton: prefill seconds, speedups, VRAM saved).

A cell is (context, method, batch); a row without ``batch`` (results written before batches existed)
is a batch-1 row (``row_batch``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from dms_perf.bench.generation import TRACE_KEYS
from dms_perf.bench.methods import DEFAULT_METHODS, FAMILIES, model_config

JSON_NAME = "results.json"
MD_NAME = "results.md"
TIME_PLOT = "time_vs_context.png"
MEMORY_PLOT = "vram_vs_context.png"
BATCH_PLOT = "throughput_vs_batch.png"  # written when the results hold more than one batch size
KV_TRACE_PLOT = "kv_vs_generated.png"  # written when a row holds a trace (runs since traces exist)
RATE_TRACE_PLOT = "tok_s_vs_generated.png"
ACCURACY_KV_PLOT = "accuracy_vs_kv.png"  # written when rows hold accuracy (dms-perf bench --accuracy)
ACCURACY_TIME_PLOT = "accuracy_vs_time.png"
DASH = "—"


class ResultsWriter:
    """Collects rows; every ``add`` rewrites results.json atomically, so an interrupted run loses nothing.
    A command with files of its own (``dms-perf capacity``) overrides ``json_name``, ``rows_key``,
    ``ordered`` and ``finish``."""

    json_name = JSON_NAME
    rows_key = "rows"

    def __init__(self, out_dir: str | os.PathLike, meta: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.rows: list[dict[str, Any]] = []
        self._write_json()

    @property
    def json_path(self) -> Path:
        return self.out_dir / self.json_name

    def ordered(self) -> list[dict[str, Any]]:
        """The rows as the JSON file lists them."""
        return self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write_json()

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, self.rows_key: self.ordered()}, indent=2, default=str) + "\n")
        os.replace(tmp, self.json_path)

    def finish(self) -> list[Path]:
        """Write results.md and the plots; returns every file written."""
        md = self.out_dir / MD_NAME
        md.write_text(render_markdown(self.meta, self.rows))
        return [self.json_path, md, *write_plots(self.rows, self.out_dir, self.meta)]


def row_batch(row: dict[str, Any]) -> int:
    """The batch of a row; 1 for a row of a results file older than batches."""
    return int(row.get("batch", 1))


def cell_key(row: dict[str, Any]) -> tuple[int, str, int]:
    """What makes a row one cell: (context, method, batch)."""
    return row["context"], row["method"], row_batch(row)


class ResultsFileError(ValueError):
    """A file ``load_results`` cannot read as results; the message names the file and what is wrong."""


# What a row needs to be drawn: every row its cell and status, a measured ("ok") row its figures.
CELL_KEYS = {"context": int, "method": str, "status": str}
FIGURE_KEYS = {"total_s": float, "prefill_s": float, "prefill_tok_s": float, "generated_tokens": int,
               "kv_bytes": int, "retrieval": str}
OPTIONAL_FIGURE_KEYS = ("batch", "peak_vram_bytes", "kept_kv_bytes", "decode_tok_s", "decode_tok_s_per_seq",
                        "ms_per_step", "compression", "repeats", "peak_kv_bytes", "decode_tok_s_first_quarter",
                        "decode_tok_s_last_quarter", "retrieval_accuracy", "retrieval_exact", "retrieval_prompts",
                        "answer_tokens", "perplexity", "perplexity_tokens")
# Accuracy fields (dms_perf.bench.accuracy): its statuses, and per prompt 1/0 and the needle depth (or null).
ACCURACY_TEXT_KEYS = ("accuracy_status", "perplexity_status")
ACCURACY_LIST_KEYS = ("retrieval_passed", "retrieval_depths")


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a results.json, or of the results.json inside a directory, or of a pytest-benchmark
    JSON of ``benchmarks/test_end_to_end.py`` (``results_from_benchmarks``).

    Raises ``ResultsFileError`` naming the file and, in one line, what is wrong with it: missing,
    unreadable, not JSON (truncated, binary), not a results object, or a row without what the tables need.
    """
    path = Path(path)
    file = path / JSON_NAME if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise ResultsFileError(f"{path}: a directory without {JSON_NAME} (expected a dms-perf bench output "
                               f"directory, its {JSON_NAME} or a pytest-benchmark JSON)")
    try:
        text = file.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise ResultsFileError(f"{file}: no such file or directory") from None
    except OSError as exc:
        raise ResultsFileError(f"{file}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{file}: not a results file: not text (UTF-8 JSON expected)") from None
    except json.JSONDecodeError as exc:
        what = "truncated JSON" if exc.pos >= len(text.rstrip()) else "not valid JSON"
        raise ResultsFileError(f"{file}: {what}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ResultsFileError(f"{file}: holds a JSON {_json_kind(data)}, not a results object "
                               '({"meta": {...}, "rows": [...]}) nor a pytest-benchmark JSON')
    if "benchmarks" in data and "meta" not in data:
        try:
            meta, rows = results_from_benchmarks(data, source=file.name)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ResultsFileError(f"{file}: not a pytest-benchmark JSON of end-to-end cases "
                                   f"({type(exc).__name__}: {exc})") from None
        except ValueError as exc:
            raise ResultsFileError(f"{file}: {exc}") from None
    else:
        meta, rows = data.get("meta"), data.get("rows")
        for key, value, kind in (("meta", meta, dict), ("rows", rows, list)):
            if not isinstance(value, kind):
                found = "no" if value is None else f"a JSON {_json_kind(value)} as its"
                raise ResultsFileError(f"{file}: not a results file: {found} {key!r} (a JSON "
                                       f"{_json_kind(kind())} expected)")
        for key, kind in (("device", dict), ("calibration", dict), ("contexts", list), ("methods", list),
                          ("batches", list)):
            if meta.get(key) is not None and not isinstance(meta[key], kind):
                raise ResultsFileError(f"{file}: its meta {key!r} is a JSON {_json_kind(meta[key])}, not a JSON "
                                       f"{_json_kind(kind())}")
    for index, row in enumerate(rows):
        if (problem := _row_problem(row)) is not None:
            raise ResultsFileError(f"{file}: row {index}: {problem}")
    return meta, rows


def _json_kind(value) -> str:
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "list"),
             (dict, "object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def _row_problem(row) -> str | None:
    """What a row lacks for the tables and plots (one line), or None."""
    if not isinstance(row, dict):
        return f"a JSON {_json_kind(row)}, not an object"
    measured = row.get("status") == "ok" or row.get("partial") is True
    needed = {**CELL_KEYS, **(FIGURE_KEYS if measured else {})}
    for key, kind in needed.items():
        if key not in row:
            return f"no {key!r}" + (f" (a row with status {row['status']!r} holds its figures)" if measured else "")
        if not _is(row[key], kind):
            return f"{key!r} is {row[key]!r}, not a {_json_kind(kind())}"
    for key in OPTIONAL_FIGURE_KEYS:
        if row.get(key) is not None and not _is(row[key], float):
            return f"{key!r} is {row[key]!r}, not a number"
    for key in ACCURACY_TEXT_KEYS:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"{key!r} is {row[key]!r}, not a string"
    for key in ACCURACY_LIST_KEYS:
        if row.get(key) is not None and (not isinstance(row[key], list)
                                         or not all(v is None or _is(v, float) for v in row[key])):
            return f"{key!r} is not a list of numbers"
    trace = row.get("trace")
    if trace is not None:
        if not isinstance(trace, dict) or any(not isinstance(trace.get(k), list) for k in TRACE_KEYS):
            return f"'trace' is not an object of lists {', '.join(TRACE_KEYS)}"
        if len({len(trace[k]) for k in TRACE_KEYS}) != 1 or not all(_is(v, float) for k in TRACE_KEYS
                                                                     for v in trace[k]):
            return f"'trace' lists {', '.join(TRACE_KEYS)} are not numbers of one length"
    return None


def _is(value, kind) -> bool:
    if isinstance(value, bool):  # JSON true/false are not numbers
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


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
    rows.sort(key=lambda r: (r["context"], order.get(r["method"], len(order)), r["method"], row_batch(r)))
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
        "batches": sorted({row_batch(r) for r in rows}),
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


def output_file(path, json_name: str) -> Path:
    """The JSON file a command's output ``path`` names: ``path/json_name`` for a directory, else ``path``."""
    return Path(path) / json_name if Path(path).is_dir() else Path(path)


def is_output(path, json_name: str) -> bool:
    """Whether ``path`` is an output holding ``json_name`` (a directory with that file, or the file itself)."""
    file = output_file(path, json_name)
    return file.is_file() if Path(path).is_dir() else file.name == json_name


def join_outputs(paths, *, json_name: str, rows_key: str, join_keys: tuple[str, ...], row_id, what: str,
                 check=None, absorb=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join the JSON outputs of a command run in parts (one method per device call, when both do not fit one
    call): (meta, rows). Each path is a directory holding ``json_name`` or that file. They join when their
    card and every meta key in ``join_keys`` agree, and ``check(rows so far, new rows)`` (optional) returns
    None; else ValueError naming the input and what differs (a file that cannot be read: ``ResultsFileError``).
    A row whose ``row_id(row)`` was seen keeps the later one; meta is the first run's, with every run's
    methods and commands, and ``absorb(meta, a later run's meta)`` (optional) takes what else it needs."""
    meta: dict[str, Any] = {}
    rows: dict[Any, dict[str, Any]] = {}
    commands = []
    for index, path in enumerate(paths):
        file = output_file(path, json_name)
        try:
            data = json.loads(file.read_text())
            m, r = data["meta"], data[rows_key]
            ids = [row_id(row) for row in r]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResultsFileError(f"{file}: not {what} ({type(exc).__name__}: {exc})") from None
        if not meta:
            meta = dict(m)
        differs = [(key, m.get(key), meta.get(key)) for key in join_keys if m.get(key) != meta.get(key)]
        gpus = ((m.get("device") or {}).get("gpu"), (meta.get("device") or {}).get("gpu"))
        differs += [("device gpu", *gpus)] if gpus[0] != gpus[1] else []
        if not differs and check is not None and (problem := check(list(rows.values()), r)) is not None:
            differs.append(problem)
        if differs:
            key, mine, first = differs[0]
            raise ValueError(f"cannot join {path}: its {key} {mine!r} differs from {first!r}")
        commands.append(m.get("command"))
        meta["methods"] = list(dict.fromkeys([*meta.get("methods", []), *m.get("methods", [])]))
        if absorb is not None and index:  # the first run's meta is meta itself
            absorb(meta, m)
        rows.update(zip(ids, r, strict=True))
    meta["command"] = " ; ".join(c for c in commands if c)
    return meta, list(rows.values())


def merge_results(paths: list[str | os.PathLike], *, per_model: bool = False) -> tuple[dict[str, Any],
                                                                                      list[dict[str, Any]]]:
    """Join runs made in parts (e.g. one device call per group of methods, or a ``--methods vanilla`` run
    with a default one) on the same card.

    ``per_model``: runs of different checkpoints join too (a base and its DMS retrofits, whose methods share
    names), each row's method named ``"<method> (<checkpoint directory name>)"`` and its ``model`` kept.

    Runs join when their card (``device["gpu"]``), model, dtype and seed agree (a seed a run does not
    record agrees with any); other runs raise ValueError. Each row keeps the weights text of the run it
    came from (``row["weights"]``: "random weights", "random weights, eviction calibrated to 8x", ...), so
    runs calibrated differently can be joined and still be told apart. Metadata is the first run's, with
    the union of contexts, methods (in the order the runs list them) and batches, and every command; a
    cell (context, method, batch) measured twice keeps the later run's row. Rows come in method order,
    then by context, then by batch.
    """
    if not paths:
        raise ValueError("merge_results needs at least one results.json")
    meta: dict[str, Any] = {}
    rows: dict[tuple[int, str, int], dict[str, Any]] = {}
    for path in paths:
        m, r = load_results(path)
        if per_model:
            label = Path(str(m.get("model"))).name
            r = [{**row, "method": f"{row['method']} ({label})", "model": m.get("model")} for row in r]
            m = {**m, "model": "per row", "methods": [f"{name} ({label})" for name in m.get("methods", [])],
                 "calibration": {f"{name} ({label})": v for name, v in (m.get("calibration") or {}).items()}}
        if not meta:
            meta = {**m, "commands": []}
        for what, mine, first in (
            ("device gpu", (m.get("device") or {}).get("gpu"), (meta.get("device") or {}).get("gpu")),
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
        meta["batches"] = sorted(set(meta.get("batches", [1])) | set(m.get("batches", [1])))
        meta["calibration"] = {**meta.get("calibration", {}), **m.get("calibration", {})}
        for row in r:
            row = dict(row)
            if not m.get("weights_by_row") and m.get("weights") is not None:
                row["weights"] = m["weights"]  # the run's own text (a row of an older file may hold less)
            rows[cell_key(row)] = row
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
    """One row per (context, method, batch) cell, a cell listed twice keeping its later row, in method
    order (``method_order``), then by context, then by batch."""
    cells: dict[tuple[int, str, int], dict[str, Any]] = {}
    for r in rows:
        cells[cell_key(r)] = r
    order = {m: i for i, m in enumerate(method_order(rows, methods))}
    return sorted(cells.values(), key=lambda r: (order[r["method"]], r["context"], row_batch(r)))


# --- formatting ------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _gib(value) -> str:
    return DASH if value is None else f"{value / 2**30:.2f}"


def _kv_unit(rows: list[dict[str, Any]]) -> tuple[str, float]:
    """(unit, bytes per unit) of the KV columns: MiB, or KiB when every cache holds less than 1 MiB (a tiny
    model's, whose figures would all read 0.1 or 0.2 MiB)."""
    held = [r[k] for r in rows if _ok(r) for k in ("kv_bytes", "peak_kv_bytes") if r.get(k) is not None]
    return ("MiB", 2**20) if not held or max(held) >= 2**20 else ("KiB", 2**10)


def _kv(value, scale: float) -> str:
    return DASH if value is None else f"{value / scale:,.1f}"


def _ok(row) -> bool:
    """Whether ``row`` holds figures: measured, or interrupted after some of its repeats (``partial``)."""
    return row.get("status") == "ok" or row.get("partial") is True


def _tok_s(row) -> float | None:
    """End-to-end throughput: generated tokens of all the batch's sequences over total seconds (prefill
    included)."""
    return row_batch(row) * row["generated_tokens"] / row["total_s"] if row.get("total_s") else None


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def long_generation(rows: list[dict[str, Any]]) -> bool:
    """Whether a measured row records the peak KV held or quarter decode rates (tables then show them)."""
    keys = ("peak_kv_bytes", "decode_tok_s_first_quarter", "decode_tok_s_last_quarter")
    return any(_ok(r) and r.get(k) is not None for r in rows for k in keys)


def _quarters(row) -> str:
    """``first → last`` quarter decode tok/s of a row, a dash for one it lacks."""
    first, last = row.get("decode_tok_s_first_quarter"), row.get("decode_tok_s_last_quarter")
    return DASH if first is None and last is None else f"{_num(first)} → {_num(last)}"


def batched(rows: list[dict[str, Any]]) -> bool:
    """Whether any row is of a batch other than 1 (tables then show the batch columns)."""
    return any(row_batch(r) != 1 for r in rows)


def _weights_differ(rows: list[dict[str, Any]]) -> bool:
    return len({r["weights"] for r in rows if r.get("weights") is not None}) > 1


def comparison_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """The full comparison, one row per cell in ``methods`` order, then by context and batch
    (``ordered_rows``); a Batch column, per-sequence decode tok/s and ms per step where a batch other than 1
    is present; a Weights column (each row's run's weights text) where joined runs differ; the first → last
    quarter's decode tok/s and the peak KV held where rows record them (``long_generation``)."""
    rows = ordered_rows(rows, methods)
    weights = _weights_differ(rows)
    batches = batched(rows)
    long = long_generation(rows)
    unit, scale = _kv_unit(rows)
    head = ("| Context | Method |" + (" Batch |" if batches else "") + " Time (s) | tok/s | Peak VRAM (GiB) "
            "| TTFT (s) | Prefill tok/s | Decode tok/s |" + (" Decode tok/s per seq | ms/step |" if batches else "")
            + (f" Decode tok/s first → last ¼ | KV peak ({unit}) |" if long else "")
            + f" KV held ({unit}) | KV kept ({unit}) | Compression | Retrieval |" + (" Weights |" if weights else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    figures = 9 + 2 * batches + 2 * long  # columns after the status of a failed row
    for r in rows:
        method = f"{r['method']} ({r['status']})" if r.get("partial") else r["method"]
        cell = f"| {_ctx(r['context'])} | {method} |" + (f" {row_batch(r)} |" if batches else "")
        tail = f" {r.get('weights') or DASH} |" if weights else ""
        if not _ok(r):
            lines.append(f"{cell} {r['status']} |" + f" {DASH} |" * figures + tail)
            continue
        compression = DASH if r.get("compression") is None else f"{r['compression']:.2f}x"
        per_seq = f" {_num(r.get('decode_tok_s_per_seq'))} | {_num(r.get('ms_per_step'))} |" if batches else ""
        per_seq += f" {_quarters(r)} | {_kv(r.get('peak_kv_bytes'), scale)} |" if long else ""
        lines.append(
            f"{cell} {_num(r['total_s'])} | {_num(_tok_s(r))} "
            f"| {_gib(r.get('peak_vram_bytes'))} | {_num(r['prefill_s'])} | {_num(r['prefill_tok_s'])} "
            f"| {_num(r.get('decode_tok_s'))} |{per_seq} {_kv(r['kv_bytes'], scale)} "
            f"| {_kv(r.get('kept_kv_bytes'), scale)} | {compression} | {r['retrieval']} |"
            + tail
        )
    return "\n".join(lines)


def speedup_rows(rows: list[dict[str, Any]], base: str = "dms-hub", fast: str = "dms-triton",
                 mid: str = "dms-hub-triton") -> list[dict[str, Any]]:
    """Per (context, batch) with ``base`` and ``fast`` or ``mid`` present: prefill seconds of the three (None
    where a method is absent or failed, its status then in ``*_status``), the speedups of ``mid`` and
    ``fast`` over ``base`` and of ``fast`` over ``mid``, and the VRAM ``fast`` saves over ``base`` (None if
    n/a)."""
    by = {cell_key(r): r for r in rows}
    out = []
    for ctx, batch in sorted({(r["context"], row_batch(r)) for r in rows}):
        b, m, f = by.get((ctx, base, batch)), by.get((ctx, mid, batch)), by.get((ctx, fast, batch))
        if b is None or (f is None and m is None):
            continue
        prefill = {k: r["prefill_s"] if r is not None and _ok(r) else None for k, r in (("b", b), ("m", m), ("f", f))}
        vram_b = b.get("peak_vram_bytes") if _ok(b) else None
        vram_f = f.get("peak_vram_bytes") if f is not None and _ok(f) else None
        out.append({
            "context": ctx, "batch": batch,
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
    """dms-hub vs dms-hub-triton vs dms-triton prefill (a batch's: its sequences one by one); a method absent
    from the run shows a dash, a failed one its status. A Batch column where a batch other than 1 is."""
    batches = batched(rows)
    head = ("| Context |" + (" Batch |" if batches else "") + " Hub prefill (s) | Hub-triton prefill (s) "
            "| Triton prefill (s) | Hub-triton speedup over hub | Triton speedup over hub | Triton over hub-triton "
            "| Hub peak VRAM (GiB) | Triton peak VRAM (GiB) | VRAM saved (GiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def prefill(status, seconds):  # a partial row: its figure and its status
        if status is None or seconds is None:
            return DASH if status is None else status
        return _num(seconds) if status == "ok" else f"{_num(seconds)} ({status})"

    def times(value):
        return DASH if value is None else f"{value:.2f}x"

    for s in speedup_rows(rows):
        lines.append(
            f"| {_ctx(s['context'])} |" + (f" {s['batch']} |" if batches else "")
            + f" {prefill(s['base_status'], s['base_prefill_s'])} "
            f"| {prefill(s['mid_status'], s['mid_prefill_s'])} | {prefill(s['fast_status'], s['fast_prefill_s'])} "
            f"| {times(s['mid_speedup'])} | {times(s['speedup'])} | {times(s['fast_over_mid'])} "
            f"| {_gib(s['base_vram_bytes'])} | {_gib(s['fast_vram_bytes'])} | {_gib(s['vram_saved_bytes'])} |"
        )
    return "\n".join(lines)


def no_gpu(meta: dict[str, Any]) -> bool:
    device = meta.get("device") or {}
    return device.get("gpu") in (None, "none") or device.get("gpu_slug") == "cpu"


def card_name(meta: dict[str, Any]) -> str:
    """The card a run's figures come from, as titles and tables name it."""
    device = meta.get("device") or {}
    return "CPU (no GPU)" if device and no_gpu(meta) else device.get("gpu", "unknown card")


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
        if (found and family and family.backend and family.evict and not family.calibrated
                and r.get("compression") is not None):
            target = float(found.group(1))
            if r["compression"] < 0.9 * target:
                below.setdefault(target, []).append(r)
    for target, low in below.items():
        example = [r for r in low if r["method"] == low[0]["method"] and row_batch(r) == row_batch(low[0])]
        seen = f"{example[0]['method']}: {example[0]['compression']:.2f}x at {_ctx(example[0]['context'])}"
        if len(example) > 1:
            seen += f", {example[-1]['compression']:.2f}x at {_ctx(example[-1]['context'])}"
        window = _dms_window(meta.get("model"))
        what = f"the {window}-token window" if window else "the DMS window"
        last = f"the last {window} tokens" if window else "the tokens of its sliding window"
        notes.append(f"At short contexts {what} dominates: DMS never evicts {last}, so eviction calibrated to "
                     f"{target:g}x shows less compression ({seen}), nearing {target:g}x as the prompt grows.")

    if no_gpu(meta):
        triton = list(dict.fromkeys(r["method"] for r in ok if "triton" in r["method"].partition(":")[0]))
        if triton:
            speedups = [v for s in speedup_rows(rows) for v in (s["speedup"], s["mid_speedup"]) if v is not None]
            example = f" (e.g. the {speedups[0]:.2f}x below)" if speedups else ""
            notes.append(f"No GPU: the Triton rows ({', '.join(triton)}) ran in Triton's interpreter "
                         f"(TRITON_INTERPRET=1, each kernel program stepped through in NumPy), so their times are "
                         f"not speeds, and a speedup computed from them{example} is not a speedup.")
    if any(r.get("partial") for r in ok):
        notes.append("A row marked \"interrupted after i of n repeats\" was stopped (Ctrl-C) during its timed runs: "
                     "its figures are the median of the i runs that finished.")
    if (note := _kv_note(ok)) is not None:
        notes.append(note)
    if (note := _reserved_rows_note(ok)) is not None:
        notes.append(note)
    if any(r.get("kept_kv_bytes") is None for r in ok):
        notes.append(f"{DASH} under KV kept means not recorded: rows written before results held it.")
    if any(r.get("peak_vram_bytes") is None for r in ok):
        notes.append(f"{DASH} under Peak VRAM means not measured"
                     + (": there is no GPU here (peak VRAM is CUDA's allocator peak)." if no_gpu(meta) else "."))
    if (caveat := repeats_caveat(meta, ok)) is not None:
        notes.insert(0, caveat)
    return notes


def repeats_caveat(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """One line where the speeds of ``rows`` are noise (one timed run on a CPU) or a single sample (one
    timed run on a GPU); None otherwise."""
    single = any(_ok(r) and r.get("repeats", meta.get("repeats")) == 1 for r in rows)
    if single and no_gpu(meta):
        return ("CPU figures from one timed run per cell (--repeats 1"
                + (", tiny random model" if meta.get("model") == "tiny" else "")
                + ") are smoke figures: they show that every method runs end to end, not how fast it is; on a "
                "shared CPU its speeds are noise (two identical runs differed ~70x in vanilla's decode tok/s).")
    if single:
        return ("One timed run per cell (--repeats 1): a figure is one sample, not a median, so one slow run "
                "(another process, clocks ramping up) is the figure; use --repeats 3 or more to compare speeds.")
    return None


def _kv_note(ok: list[dict[str, Any]]) -> str | None:
    """Why KV held exceeds KV kept, with an example of these rows (a DMS row holding more than vanilla at
    its cell if there is one); None where every row holds what it keeps."""
    over = [r for r in ok if r.get("kept_kv_bytes") is not None and r["kv_bytes"] > 1.01 * r["kept_kv_bytes"]]
    if not over:
        return None
    unit, scale = _kv_unit(ok)
    vanilla = {(r["context"], row_batch(r)): r for r in ok if r["method"] == "vanilla"}
    more = [(r, v) for r in over if (v := vanilla.get((r["context"], row_batch(r)))) and r["kv_bytes"] > v["kv_bytes"]]
    r, v = more[0] if more else (max(over, key=lambda r: r["kv_bytes"] / max(r["kept_kv_bytes"], 1)), None)
    example = (f"{r['method']} at {_ctx(r['context'])}: {_kv(r['kv_bytes'], scale)} {unit} held, "
               f"{_kv(r['kept_kv_bytes'], scale)} {unit} kept")
    if v is not None:
        example = f"{example}, vanilla {_kv(v['kv_bytes'], scale)} {unit}"
    return ("KV held counts every row a cache holds, those reserved for decoding included (off the engine a DMS "
            "cache reserves max(capacity step, new tokens) rows per KV head and each head's segment keeps spare "
            "rows; on the engine's paged pool a head holds whole pages, with pages for the next capacity step of "
            "rows handed out ahead); KV kept "
            "counts the keys and values still attended to, from which Compression is computed. So a compressed "
            + ("cache can hold more than vanilla's while keeping far less" if v is not None else
               "cache can hold much more than it keeps")
            + f" ({example}).")


def _reserved_rows_note(ok: list[dict[str, Any]]) -> str | None:
    """Why a long DMS generation holds about what a dense one does while keeping a fraction of it, with the
    longest such row of these rows (and a dense row of its cell); None where no evicting DMS row generated
    at least a capacity step of tokens holding more than it keeps."""
    from dms_perf.model.cache import DEFAULT_CAPACITY_STEP

    def evicting(r):
        family = _family(r["method"])
        return bool(family and family.backend and family.evict)

    over = [r for r in ok if evicting(r) and r.get("kept_kv_bytes") and r.get("generated_tokens", 0)
            >= DEFAULT_CAPACITY_STEP and r["kv_bytes"] > 1.01 * r["kept_kv_bytes"] and "kv_pool_bytes" not in r]
    if not over:
        return None
    unit, scale = _kv_unit(ok)
    r = max(over, key=lambda r: (r["generated_tokens"], r["kv_bytes"] / r["kept_kv_bytes"]))
    example = (f"{r['method']} at {_ctx(r['context'])}, {r['generated_tokens']} new tokens: "
               f"{_kv(r['kv_bytes'], scale)} {unit} held, {_kv(r['kept_kv_bytes'], scale)} {unit} kept")
    dense = [d for d in ok if cell_key(d)[0::2] == cell_key(r)[0::2] and d.get("generated_tokens") ==
             r["generated_tokens"] and d["method"] in ("dense-triton", "vanilla")]
    dense.sort(key=lambda d: d["method"] != "dense-triton")  # the same engine without eviction first
    if dense:
        example += f"; {dense[0]['method']} {_kv(dense[0]['kv_bytes'], scale)} {unit} held"
    return (f"A DMS generation off the engine reserves max(capacity step {DEFAULT_CAPACITY_STEP}, new tokens) decode "
            "rows per KV head when its decode starts (on the engine's paged pool pages follow each head instead), "
            "so its KV held grows "
            "with the new tokens as a dense cache's does while it keeps a fraction of them "
            f"({example}).")


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    device = meta.get("device") or {}
    if not meta.get("weights_by_row"):  # one run: its text on every row that has none of its own
        rows = [r if r.get("weights") or meta.get("weights") is None else {**r, "weights": meta["weights"]}
                for r in rows]
    weights = meta.get("weights", DASH)
    if _weights_differ(rows):
        weights = "weights differ between the joined runs (Weights column): " + ", ".join(
            f'"{text}"' for text in dict.fromkeys(r["weights"] for r in rows if r.get("weights")))
    card = "no GPU, CPU only" if device.get("gpu") == "none" else device.get("gpu", DASH)
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
        "includes the weights; KV held = bytes the KV cache holds at the end (rows reserved for decoding "
        "included), KV kept = bytes of the keys and values still attended to; compression = dense KV slots / "
        "slots still attended at the end.",
        "",
    ]
    if long_generation(rows):
        parts[-1:-1] = [
            "",
            "Decode tok/s first → last ¼ = decode tok/s (all sequences) over the first and over the last quarter "
            "of the decode steps; KV peak = the most bytes the KV cache held during the generation. "
            f"{KV_TRACE_PLOT} and {RATE_TRACE_PLOT} draw KV held and kept and decode tok/s against the tokens "
            "generated.",
        ]
    if batched(rows):
        sizes = ", ".join(str(b) for b in sorted({row_batch(r) for r in rows}))
        parts[-1:-1] = [
            "",
            f"Batch B (here {sizes}): B distinct prompts of the context length, prefilled one by one, their caches "
            "joined and decoded together. Time, TTFT and KV cache are the whole batch's; tok/s, prefill tok/s and "
            "decode tok/s count the tokens of all B sequences; decode tok/s per seq = decode tok/s / B; ms/step = "
            "decode time / decode steps (one token per sequence a step); retrieval counts the sequences that "
            "found their own code.",
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
    if has_accuracy(rows):
        parts += ["", *accuracy_section(meta, rows)]
    return "\n".join(parts) + "\n"


# --- accuracy (dms-perf bench --accuracy) --------------------------------------------------------------


def has_accuracy(rows: list[dict[str, Any]]) -> bool:
    """Whether a row holds accuracy fields (``dms_perf.bench.accuracy.measure_accuracy``)."""
    return any(r.get("accuracy_status") is not None for r in rows)


def accuracy_rows(rows: list[dict[str, Any]], methods: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows scored for accuracy (one per (context, method): the smallest batch's), by context, then in
    method order."""
    order = {m: i for i, m in enumerate(method_order(rows, methods))}
    scored = [r for r in ordered_rows(rows, methods) if r.get("accuracy_status") is not None]
    return sorted(scored, key=lambda r: (r["context"], order[r["method"]], row_batch(r)))


def _kv_point(row) -> float | None:
    return row.get("kv_bytes") if _ok(row) else None


def _time_point(row) -> float | None:
    return row.get("ms_per_step") if _ok(row) else None


PARETO_AXES = {"KV": _kv_point, "time": _time_point}  # mark in the table -> the row's cost on that axis


def pareto_front(rows: list[dict[str, Any]], cost) -> set[tuple[int, str, int]]:
    """The cells of ``rows`` (one context) on the accuracy frontier of ``cost`` (a row -> number or None): no
    other row has at least their retrieval accuracy at no more cost, better in one of the two. Rows without
    an accuracy or a cost are on no frontier; every method counts alike."""
    points = [(cell_key(r), r["retrieval_accuracy"], cost(r)) for r in rows
              if r.get("retrieval_accuracy") is not None and cost(r) is not None]
    return {key for key, acc, c in points
            if not any(a >= acc and x <= c and (a > acc or x < c) for _, a, x in points)}


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else DASH


def accuracy_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """Per (context, method): retrieval (exact answers of the prompts), perplexity, and from the same cell's
    timed runs the KV held and kept, compression and decode ms/step; Pareto names the frontiers (``pareto_front``,
    per context) the cell is on: "KV" (accuracy against KV held) and "time" (against decode ms/step). A Batch
    column where the scored rows are of a batch other than 1 (their timed figures are that batch's)."""
    scored = accuracy_rows(rows, methods)
    unit, scale = _kv_unit(scored)
    batches = batched(scored)
    head = ("| Context | Method |" + (" Batch |" if batches else "") + " Retrieval (exact) | Perplexity "
            f"| KV held ({unit}) | KV kept ({unit}) | Compression | Decode ms/step | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fronts = {}
    for ctx in sorted({r["context"] for r in scored}):
        here = [r for r in scored if r["context"] == ctx]
        fronts.update({(ctx, mark): pareto_front(here, cost) for mark, cost in PARETO_AXES.items()})
    for r in scored:
        method = r["method"] if _ok(r) else f"{r['method']} ({r['status']})"
        cell = f"| {_ctx(r['context'])} | {method} |" + (f" {row_batch(r)} |" if batches else "")
        if r["accuracy_status"] == "ok":
            retrieval = f"{_percent(r['retrieval_accuracy'])} ({r['retrieval_exact']}/{r['retrieval_prompts']})"
        else:
            retrieval = r["accuracy_status"]
        if r.get("perplexity") is not None:
            perplexity = _num(r["perplexity"])
        else:
            perplexity = r.get("perplexity_status") or DASH
        compression = DASH if not _ok(r) or r.get("compression") is None else f"{r['compression']:.2f}x"
        marks = [mark for mark in PARETO_AXES if cell_key(r) in fronts[r["context"], mark]]
        lines.append(
            f"{cell} {retrieval} | {perplexity} | {_kv(_kv_point(r), scale)} "
            f"| {_kv(r.get('kept_kv_bytes') if _ok(r) else None, scale)} | {compression} "
            f"| {_num(_time_point(r))} | {', '.join(marks) or DASH} |"
        )
    return "\n".join(lines)


def accuracy_notes(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What the accuracy table was scored on and how to read it, each only where it applies."""
    setup = meta.get("accuracy") or {}
    scored = [r for r in rows if r.get("accuracy_status") is not None]
    prompts = setup.get("prompts") or max((r.get("retrieval_prompts") or 0 for r in scored), default=0)
    notes = [
        f"Retrieval: {prompts} needle prompts per context from {setup.get('prompt_source', 'the needle workload')} "
        f"(seed {setup.get('seed', DASH)}), needles at depths spread evenly from the start to the end of the haystack, "
        "each prompt with its own code; a prompt counts when the greedy answer is exactly its code (spaces and "
        "punctuation free, nothing before it, no letter or digit glued after it). Each prompt runs through the "
        "method's own cache: its press, its eviction, its decode engine.",
        f"Perplexity: exp(mean next-token loss) of the {setup.get('perplexity_tokens', DASH)} tokens of held-out text "
        f"({setup.get('perplexity_text', DASH)}) after the context's first tokens, prefilled as the method prefills "
        "a prompt and then fed one token at a time through its decode (teacher forcing over its compressed cache, "
        "eviction on where it evicts); n/a says why where it could not be measured.",
        "KV held, KV kept, Compression and Decode ms/step are the same cell's timed runs (the comparison table's row): "
        "accuracy, memory and time come from one model and one cell. Pareto: the frontiers the cell is on at its "
        "context, KV = no other method retrieves as much with less KV held, time = with fewer ms per decode step; "
        "every method counts alike.",
    ]
    calibrated = [r["method"] for r in scored if (family := _family(r["method"])) and family.calibrated]
    if calibrated:
        found = meta.get("calibration") or {}
        achieved = ", ".join(f"{m}: {found[m]['marked_fraction']:.3f} of the decisions marked" for m in
                             dict.fromkeys(calibrated) if isinstance(found.get(m), dict)
                             and found[m].get("marked_fraction") is not None)
        drawn = sorted({found[m]["decision_rows"] for m in dict.fromkeys(calibrated) if isinstance(found.get(m), dict)
                        and found[m].get("decision_rows", "the model's") != "the model's"})
        notes.append(f"{', '.join(dict.fromkeys(calibrated))}: DMS eviction with an offset calibrated on these weights "
                     "to mark R of the decisions on a random calibration prompt, not learnt: on a base checkpoint "
                     "this is untrained DMS" + (f" ({achieved})" if achieved else "") + ". Its compression on "
                     "these prompts is in the Compression column."
                     + (f" Its decision rows were {'; '.join(drawn)}." if drawn else ""))
    if any(r.get("retrieval_accuracy") is not None and not _ok(r) for r in scored):
        notes.append("A method whose timed run failed (its status beside its name) has no KV or time figure and is on "
                     "no frontier.")
    return notes


def accuracy_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The Accuracy part of results.md: its notes, the table and the two figures."""
    return [
        "## Accuracy",
        "",
        *(f"- {note}" for note in accuracy_notes(meta, rows)),
        "",
        accuracy_table(rows, meta.get("methods")),
        "",
        f"Figures: {ACCURACY_KV_PLOT} (retrieval against KV held; hollow markers: KV kept) and {ACCURACY_TIME_PLOT} "
        "(retrieval against decode ms/step), one point per method and context, the frontier dashed.",
    ]


# --- plots -------------------------------------------------------------------------------------------

# One colour and one marker per method, fixed by the method's place in the registry's default list (the
# same method looks the same in every plot and every run); methods outside it take the places after.
# 16 colours and 15 markers: 16 methods differ in both, and (colour, marker) pairs stay distinct for 240.
COLOURS = (
    "#000000", "#1f77b4", "#17becf", "#9467bd", "#d62728", "#ff7f0e", "#8c564b", "#2ca02c",
    "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#f7b6d2", "#98df8a", "#c49c94", "#ffbb78",
    "#843c39", "#9edae5", "#c5b0d5", "#dbdb8d", "#ff9896", "#aec7e8",
)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "p", "h", "8", "d", "H", "+", "x", "1", "2", "3")
SAME = 0.005  # series within this relative difference at every context: "same as" in the legend
NEAR = 0.03  # within this: "≈"; both kinds are drawn side by side (DODGE log2 units apart along x)
DODGE = 0.06


def method_styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each method: a registry default's own place, so a method looks alike in every
    run; another parameter of a family (snapkv-triton:0.875) takes its family default's place where that
    default is not in the run itself, else a place after the registry's."""
    run = list(dict.fromkeys(methods))
    places = list(DEFAULT_METHODS)
    index = {m: places.index(m) for m in run if m in DEFAULT_METHODS}
    for m in run:
        if m in index:
            continue
        family = m.split(":")[0]
        default = next((d for d in DEFAULT_METHODS if d.split(":")[0] == family), None)
        if default is not None and default not in run and places.index(default) not in index.values():
            index[m] = places.index(default)
        else:
            places.append(m)
            index[m] = len(places) - 1
    return {m: (COLOURS[index[m] % len(COLOURS)], MARKERS[index[m] % len(MARKERS)]) for m in methods}


def _coincide(a: dict[int, float], b: dict[int, float], tolerance: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[c] - b[c]) <= tolerance * max(abs(a[c]), abs(b[c])) for c in a)


def _groups(data: dict[str, dict[int, float]]) -> dict[str, str]:
    """Method -> the earlier method its series coincides with (within NEAR), itself if none."""
    leader: dict[str, str] = {}
    for m in data:
        leader[m] = next((lead for lead in dict.fromkeys(leader.values()) if _coincide(data[lead], data[m], NEAR)), m)
    return leader


def _plot_title(meta: dict[str, Any], what: str, rows: list[dict[str, Any]], notes: tuple[str, ...] = ()) -> str:
    """``what``, model, card and date; under it what the figures are (weights, interpreter, smoke), then
    ``notes``."""
    cpu_only = bool(meta.get("device")) and no_gpu(meta)
    card = card_name(meta)
    model = " ".join(str(x) for x in (meta.get("model"), meta.get("dtype")) if x) or "unknown model"
    title = f"{what}: {model} on {card}" + (f", {meta['date']}" if meta.get("date") else "")
    ok = [r for r in rows if _ok(r)]
    caveats = []
    if meta.get("weights_by_row"):
        caveats.append("weights differ between the joined runs (results.md)")
    elif meta.get("weights"):
        caveats.append(meta["weights"])
    if cpu_only and any("triton" in r["method"].partition(":")[0] for r in ok):
        caveats.append("Triton rows ran in Triton's interpreter (not speeds)")
    if cpu_only and any(r.get("repeats", meta.get("repeats")) == 1 for r in ok):
        caveats.append("one repeat: smoke figures")
    caveats += notes
    lines = [title]
    for k, caveat in enumerate(caveats):  # caveats under the title, lines broken between them only
        if k and len(lines[-1]) + len(caveat) < 100:
            lines[-1] += f"; {caveat}"
        else:
            lines.append(caveat)
    return "\n".join(lines)


_PANELS = {  # file -> (what, panels: (row key, axis label, panel title, unit))
    TIME_PLOT: ("Time vs context", (
        ("total_s", "total time", "Total time: prefill + decode", "s"),
        ("prefill_s", "TTFT / prefill", "Time to first token (prefill)", "s"),
    )),
    MEMORY_PLOT: ("Memory vs context", (
        ("peak_vram_bytes", "peak VRAM", "Peak VRAM (weights included)", "GiB"),
        ("kv_bytes", "KV held at end", "KV cache held at the end of generation (allocated: rows reserved for "
         "decoding included)", "bytes"),
        ("kept_kv_bytes", "KV kept at end", "KV cache kept at the end of generation (the keys and values still "
         "attended to)", "bytes"),
    )),
}
LOG_SPAN = 8  # a panel whose values span more than this factor gets a log y axis


def _unit(unit: str, largest: float) -> tuple[str, float]:
    """(unit shown, scale) of a panel: seconds as they are, VRAM in GiB, KV bytes in MiB (KiB below 1 MiB)."""
    if unit == "GiB":
        return "GiB", 2**-30
    if unit == "bytes":
        return ("MiB", 2**-20) if largest >= 2**20 else ("KiB", 2**-10)
    return unit, 1.0


def _failures(rows: list[dict[str, Any]]) -> str:
    """'OOM at 16K, 32K; skipped at 64' for a legend."""
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r["status"].split(":")[0], []).append(_ctx(r["context"]))
    return "; ".join(f"{status} at {', '.join(contexts)}" for status, contexts in by.items())


def _tick(value, _pos=None) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


def build_figures(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of ``write_plots`` (file name -> matplotlib Figure), not saved: one panel per measured
    figure (a figure no row measured, e.g. peak VRAM without a GPU, gets none), each with its legend
    right of its axes; coinciding methods are drawn side by side and named "same as" in the legend.
    Against context, the rows of the smallest batch; with more than one batch, also ``BATCH_PLOT``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    meta = meta or {}
    all_rows = ordered_rows(rows, meta.get("methods"))
    methods = list(dict.fromkeys(r["method"] for r in all_rows))
    styles = method_styles(methods)
    batches = sorted({row_batch(r) for r in all_rows})
    # Against context: one batch (the smallest), so that a method is one series; the batches get their figure.
    rows = [r for r in all_rows if row_batch(r) == batches[0]] if batches else all_rows
    failed = {m: [r for r in rows if r["method"] == m and not _ok(r)] for m in methods}
    figures = {}
    for filename, (what, specs) in _PANELS.items():
        if batched(all_rows):
            what += f" (batch {batches[0]})"
        series = []  # per panel: method -> {context: value}
        for key, *_ in specs:
            values = {m: {r["context"]: r[key] for r in rows if r["method"] == m and _ok(r) and r.get(key) is not None}
                      for m in methods}
            series.append({m: v for m, v in values.items() if v})
        panels = [(spec, data) for spec, data in zip(specs, series, strict=True) if data]
        fig = Figure(figsize=(11, 0.9 + 4.1 * max(len(panels), 1)), layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(_plot_title(meta, what, rows), fontsize=11)
        if not panels:
            fig.text(0.5, 0.5, "no measured cells", ha="center", va="center")
        notes = set()
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0] if panels else []
        for ax, ((_key, label, title, unit), data) in zip(axes, panels, strict=True):
            leader = _groups(data)
            values = [v for d in data.values() for v in d.values()]
            unit, scale = _unit(unit, max(values))
            log = min(values) > 0 and max(values) / min(values) > LOG_SPAN
            for m in methods:  # legend in method order; a coinciding group's markers side by side
                if m not in data:
                    if failed[m]:  # every cell failed: named in the legend, nothing to draw
                        colour, marker = styles[m]
                        ax.plot([], [], color=colour, marker=marker, linestyle="none",
                                label=f"{m} ({_failures(failed[m])})")
                    continue
                group = [n for n in data if leader[n] == leader[m]]
                shift = 2 ** ((group.index(m) - (len(group) - 1) / 2) * DODGE)
                name = m
                if leader[m] != m:
                    same = _coincide(data[leader[m]], data[m], SAME)
                    name += f" (same as {leader[m]})" if same else f" (≈ {leader[m]})"
                    notes.add("same" if same else "near")
                if failed[m]:
                    name += f" ({_failures(failed[m])})"
                xs = sorted(data[m])
                colour, marker = styles[m]
                ax.plot([x * shift for x in xs], [data[m][x] * scale for x in xs], color=colour, marker=marker,
                        markersize=6, linewidth=1.4, alpha=0.9, label=name)
            contexts = sorted({c for v in data.values() for c in v})
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [_ctx(c) for c in contexts])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(contexts[0] / 2**0.3, contexts[-1] * 2**0.3)
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(_tick))
                ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("context (prompt tokens)")
            ax.set_ylabel(f"{label} ({unit})" + (", log scale" if log else ""))
            ax.set_title(title, fontsize=10, loc="left")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
        if notes:
            kinds = [f"'same as': within {SAME:.1%}"] * ("same" in notes)
            kinds += [f"'≈': within {NEAR:.0%}"] * ("near" in notes)
            fig.supxlabel("Methods whose values coincide at every context are drawn side by side (offset along x); "
                          + ", ".join(kinds) + ".", fontsize=8, x=0.01, ha="left")
        figures[filename] = fig
    if len(batches) > 1:
        figures[BATCH_PLOT] = _batch_figure(all_rows, meta, styles)
    if any(_ok(r) and r.get("trace") for r in all_rows):
        figures.update(_trace_figures(all_rows, meta, styles))
    if has_accuracy(all_rows):
        figures.update(_accuracy_figures(all_rows, meta, styles))
    return figures


def _accuracy_figures(rows: list[dict[str, Any]], meta: dict[str, Any], styles: dict[str, tuple[str, str]]):
    """``ACCURACY_KV_PLOT`` and ``ACCURACY_TIME_PLOT``: retrieval accuracy against KV held (KV kept hollow, on
    the same line) and against decode ms/step, one panel per context, one point per method (each press ratio
    its own), the frontier (``pareto_front``) dashed. A method without the figure is named under its panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    scored = accuracy_rows(rows, meta.get("methods"))
    contexts = sorted({r["context"] for r in scored})
    figures = {}
    for filename, what, axis, cost in (
        (ACCURACY_KV_PLOT, "Retrieval accuracy vs KV cache held", "KV held at end", _kv_point),
        (ACCURACY_TIME_PLOT, "Retrieval accuracy vs decode time", "decode ms per step", _time_point),
    ):
        fig = Figure(figsize=(11, 0.9 + 4.1 * len(contexts)), layout="constrained")
        FigureCanvasAgg(fig)
        notes = ("filled: KV held; hollow: KV kept (still attended to)",) if filename == ACCURACY_KV_PLOT else ()
        fig.suptitle(_plot_title(meta, what, scored, notes), fontsize=11)
        axes = fig.subplots(len(contexts), 1, squeeze=False)[:, 0]
        for ax, ctx in zip(axes, contexts, strict=True):
            here = [r for r in scored if r["context"] == ctx]
            drawn = [r for r in here if r.get("retrieval_accuracy") is not None and cost(r) is not None]
            values = [cost(r) for r in drawn]
            if filename == ACCURACY_KV_PLOT:
                values += [r["kept_kv_bytes"] for r in drawn if r.get("kept_kv_bytes")]
            unit, scale = _unit("bytes", max(values, default=1)) if filename == ACCURACY_KV_PLOT else ("ms", 1.0)
            for r in drawn:
                colour, marker = styles[r["method"]]
                x, y = cost(r) * scale, 100 * r["retrieval_accuracy"]
                ax.plot([x], [y], color=colour, marker=marker, markersize=8, markeredgewidth=1.6, linestyle="none",
                        label=r["method"])
                if filename == ACCURACY_KV_PLOT and r.get("kept_kv_bytes") and r["kept_kv_bytes"] != cost(r):
                    kept = r["kept_kv_bytes"] * scale
                    ax.plot([kept, x], [y, y], color=colour, linewidth=0.8, alpha=0.6)
                    ax.plot([kept], [y], color=colour, marker=marker, markersize=8, markeredgewidth=1.6,
                            markerfacecolor="none", linestyle="none")
            front = sorted((cost(r) * scale, 100 * r["retrieval_accuracy"]) for r in drawn
                           if cell_key(r) in pareto_front(here, cost))
            if len(front) > 1:
                ax.plot([x for x, _ in front], [y for _, y in front], color="grey", linestyle="--", linewidth=1,
                        drawstyle="steps-post", zorder=0, label="frontier")
            missing = [r["method"] for r in here if r not in drawn]
            if missing:
                ax.text(0.0, -0.22, "not drawn (no accuracy or no figure): " + ", ".join(missing), fontsize=8,
                        transform=ax.transAxes)
            # KV is compressed by factors: a log axis; time on one only where it spans as much as elsewhere.
            spread = values and min(values) > 0 and max(values) > min(values)
            if spread and (filename == ACCURACY_KV_PLOT or max(values) / min(values) > LOG_SPAN):
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(_tick))
                ax.xaxis.set_minor_locator(NullLocator())
            if not drawn:
                ax.text(0.5, 0.5, "no scored cells", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylim(-5, 105)
            ax.set_xlabel(f"{axis} ({unit})")
            ax.set_ylabel("retrieval accuracy (% exact)")
            ax.set_title(f"{_ctx(ctx)} tokens of context", fontsize=10, loc="left")
            ax.grid(True, alpha=0.3)
            if ax.get_lines():
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
        figures[filename] = fig
    return figures


def _trace_rates(row: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(tokens generated, decode tok/s of all sequences over the stretch ending there) from a row's trace.
    Stretches shorter than half the longest (the extra points at quarter boundaries) join the next one."""
    trace = row["trace"]
    tokens, seconds = trace["tokens"], trace["decode_s"]
    longest = max((b - a for a, b in zip(tokens[:-1], tokens[1:], strict=True)), default=0)
    xs, ys, anchor = [], [], 0
    for i in range(1, len(tokens)):
        if 2 * (tokens[i] - tokens[anchor]) < longest and i < len(tokens) - 1:
            continue
        if seconds[i] > seconds[anchor]:
            xs.append(tokens[i])
            ys.append(row_batch(row) * (tokens[i] - tokens[anchor]) / (seconds[i] - seconds[anchor]))
        anchor = i
    return xs, ys


def _trace_figures(rows: list[dict[str, Any]], meta: dict[str, Any], styles: dict[str, tuple[str, str]]):
    """``KV_TRACE_PLOT`` (KV held solid, kept dashed) and ``RATE_TRACE_PLOT`` (decode tok/s) against the tokens
    generated per sequence, from the rows' traces: one panel per (context, batch) cell, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    traced = [r for r in rows if _ok(r) and r.get("trace")]
    cells = sorted({(r["context"], row_batch(r)) for r in traced})
    figures = {}
    for filename, what in ((KV_TRACE_PLOT, "KV cache vs tokens generated"),
                           (RATE_TRACE_PLOT, "Decode throughput vs tokens generated")):
        fig = Figure(figsize=(11, 0.9 + 4.1 * len(cells)), layout="constrained")
        FigureCanvasAgg(fig)
        notes = ("solid: KV held (rows reserved for decoding included); dashed: KV kept (still attended to)",) \
            if filename == KV_TRACE_PLOT else ("decode tok/s of all sequences between trace points",)
        fig.suptitle(_plot_title(meta, what, traced, notes), fontsize=11)
        axes = fig.subplots(len(cells), 1, squeeze=False)[:, 0]
        for ax, (ctx, batch) in zip(axes, cells, strict=True):
            here = [r for r in traced if (r["context"], row_batch(r)) == (ctx, batch)]
            if filename == KV_TRACE_PLOT:
                largest = max(v for r in here for k in ("kv_bytes", "kept_kv_bytes") for v in r["trace"][k])
                unit, scale = _unit("bytes", largest)
                for r in here:
                    colour, marker = styles[r["method"]]
                    tokens = r["trace"]["tokens"]
                    ax.plot(tokens, [v * scale for v in r["trace"]["kv_bytes"]], color=colour, linewidth=1.4,
                            label=f"{r['method']} held")
                    ax.plot(tokens, [v * scale for v in r["trace"]["kept_kv_bytes"]], color=colour,
                            linewidth=1.4, linestyle="--", label=f"{r['method']} kept")
                ax.set_ylabel(f"KV cache ({unit})")
                ax.set_ylim(bottom=0)
            else:
                for r in here:
                    colour, marker = styles[r["method"]]
                    xs, ys = _trace_rates(r)
                    ax.plot(xs, ys, color=colour, marker=marker, markersize=3, linewidth=1.4, label=r["method"])
                ax.set_ylabel("decode tok/s, all sequences")
                ax.set_ylim(bottom=0)
            ax.set_xlabel("tokens generated per sequence")
            ax.set_title(f"{_ctx(ctx)} tokens of context" + (f", batch {batch}" if batch != 1 else ""),
                         fontsize=10, loc="left")
            ax.grid(True, alpha=0.3)
            if ax.get_lines():
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
        figures[filename] = fig
    return figures


def _batch_figure(rows: list[dict[str, Any]], meta: dict[str, Any], styles: dict[str, tuple[str, str]], *,
                  what: str = "Decode throughput vs batch", largest: dict[tuple[int, str], int] | None = None):
    """Aggregate decode tok/s (all sequences) against batch, log-2 batch axis: one panel per context, one
    line per method; a method's failed batches named in its legend entry. ``largest`` ((context, method) ->
    batch, ``dms-perf capacity``): each method's largest batch that fit, circled and named in the legend.
    ``meta["batch_fill"]``, where a batch is not distinct prompts, is said under the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    contexts = sorted({r["context"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(11, 0.9 + 4.1 * len(contexts)), layout="constrained")
    FigureCanvasAgg(fig)
    fill = meta.get("batch_fill")
    fig.suptitle(_plot_title(meta, what, rows, (fill,) if fill else ()), fontsize=11)
    axes = fig.subplots(len(contexts), 1, squeeze=False)[:, 0]
    for ax, ctx in zip(axes, contexts, strict=True):
        here = [r for r in rows if r["context"] == ctx]
        values = []
        maxima = []  # (tok/s, batch, colour) of each method's largest batch
        for m in methods:
            mine = [r for r in here if r["method"] == m]
            data = {row_batch(r): r["decode_tok_s"] for r in mine if _ok(r) and r.get("decode_tok_s") is not None}
            by_status: dict[str, list[str]] = {}
            for r in mine:
                if not _ok(r):
                    by_status.setdefault(r["status"].split(":")[0], []).append(str(row_batch(r)))
            failures = "; ".join(f"{status} at batch {', '.join(b)}" for status, b in by_status.items())
            if not (data or failures):  # the method has no cell at this context
                continue
            colour, marker = styles[m]
            best = (largest or {}).get((ctx, m))
            label = m + (f": largest batch {best}" if best is not None else "") + (f" ({failures})" if failures else "")
            xs = sorted(data)
            ax.plot(xs, [data[x] for x in xs], color=colour, marker=marker, markersize=6, linewidth=1.4, alpha=0.9,
                    label=label, linestyle="-" if xs else "none")
            values += data.values()
            if best in data:
                ax.plot([best], [data[best]], marker="o", markersize=13, markerfacecolor="none", color=colour,
                        markeredgewidth=1.6, linestyle="none")
                maxima.append((data[best], best, colour))
        # The highest maximum is labelled above its point, the others below theirs: two methods with
        # neighbouring maxima (a press and DMS) keep their labels apart.
        for k, (tok_s, best, colour) in enumerate(sorted(maxima, reverse=True)):
            ax.annotate(f"max {best}\n{_num(tok_s)} tok/s", (best, tok_s), textcoords="offset points",
                        xytext=(0, 12 if k == 0 else -14), ha="center", va="bottom" if k == 0 else "top",
                        fontsize=8, color=colour)
        present = sorted({row_batch(r) for r in here})
        # log-2 ticks: every power of two from the one at or below the smallest batch to the one at or above
        # the largest, so that the axis holds every point (a search that started at its guess gives 23, 24 and
        # 142 with one method's batches below the first power of two between them)
        powers = {2**k for k in range(present[0].bit_length() - 1, (present[-1] - 1).bit_length() + 1)}
        # A search's bisected batches (14, 15) would crowd the axis: powers of two only, each point still drawn.
        ticks = sorted(powers if largest else set(present) | powers)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(ticks[0] / 2**0.3, ticks[-1] * 2**0.3)
        log = bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(_tick))
            ax.yaxis.set_minor_locator(NullLocator())
        elif values and largest:  # room above the maxima for their labels
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.18)
        if not values:
            ax.text(0.5, 0.5, "no measured cells", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("batch (sequences decoded together)" if fill else "batch (distinct prompts decoded together)")
        ax.set_ylabel("decode tok/s, all sequences" + (", log scale" if log else ""))
        ax.set_title(f"Decode throughput at {_ctx(ctx)} tokens of context", fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


def write_plots(rows: list[dict[str, Any]], out_dir: str | os.PathLike,
                meta: dict[str, Any] | None = None) -> list[Path]:
    """time_vs_context.png (total and TTFT) and vram_vs_context.png (peak VRAM, KV cache) per method; with more
    than one batch size, those at the smallest batch and throughput_vs_batch.png; where rows hold traces,
    kv_vs_generated.png and tok_s_vs_generated.png."""
    out_dir = Path(out_dir)
    written = []
    for filename, fig in build_figures(rows, meta).items():
        path = out_dir / filename
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written
