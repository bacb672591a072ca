"""results.json written per row, results.md with both tables, PNG plots; cells of different batches kept apart,
old rows without a batch read as batch 1, the throughput-vs-batch plot."""

from __future__ import annotations

import json

import pytest

from dms_perf.bench.methods import DEFAULT_METHODS, resolve_methods
from dms_perf.bench.report import (
    BATCH_PLOT,
    KV_TRACE_PLOT,
    MEMORY_PLOT,
    RATE_TRACE_PLOT,
    TIME_PLOT,
    ResultsWriter,
    build_figures,
    comparison_table,
    load_results,
    merge_results,
    method_styles,
    ordered_rows,
    reading_notes,
    render_markdown,
    results_from_benchmarks,
    speedup_rows,
    speedup_table,
)

GIB = 2**30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(context, method, prefill, decode=1.0, vram=None, kv=2**20, compression=1.0, new_tokens=9, kept=None):
    """A measured row; its cache keeps what it holds unless ``kept`` says otherwise."""
    return {
        "context": context, "method": method, "new_tokens": new_tokens, "status": "ok",
        "prefill_s": prefill, "prefill_tok_s": context / prefill, "decode_tok_s": (new_tokens - 1) / decode,
        "total_s": prefill + decode, "generated_tokens": new_tokens, "peak_vram_bytes": vram, "kv_bytes": kv,
        "kept_kv_bytes": kv if kept is None else kept, "compression": compression,
        "retrieval": "n/a (random weights)", "repeats": 3,
        "runs_total_s": [prefill + decode] * 3,
    }


def _rows():
    return [
        _row(4096, "dms-hub", 2.0, vram=20 * GIB),
        _row(4096, "dms-triton", 0.5, vram=17 * GIB, compression=7.9),
        _row(8192, "dms-triton", 1.0, vram=18 * GIB),
        {"context": 8192, "method": "dms-hub", "new_tokens": 9, "status": "OOM"},
        _row(4096, "vanilla", 0.4, vram=18 * GIB),
    ]


def test_json_is_rewritten_after_every_row(tmp_path):
    writer = ResultsWriter(tmp_path, {"model": "tiny"})
    assert load_results(tmp_path / "results.json") == ({"model": "tiny"}, [])
    rows = _rows()
    for k, row in enumerate(rows, start=1):
        writer.add(row)
        meta, saved = load_results(tmp_path / "results.json")
        assert saved == rows[:k]  # an interruption after any cell keeps every earlier one
    assert not list(tmp_path.glob("*.tmp"))


def test_finish_writes_markdown_and_plots(tmp_path):
    writer = ResultsWriter(tmp_path, {"model": "qwen3-8b", "weights": "random weights, eviction calibrated to 8x",
                                      "device": {"gpu": "NVIDIA H100 80GB HBM3"}, "date": "2026-11-27 22:00 UTC"})
    for row in _rows():
        writer.add(row)
    files = writer.finish()
    assert {f.name for f in files} == {"results.json", "results.md", TIME_PLOT, MEMORY_PLOT}
    for name in (TIME_PLOT, MEMORY_PLOT):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    md = (tmp_path / "results.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "random weights, eviction calibrated to 8x" in md
    assert "## Full comparison" in md and "## DMS prefill speedup (hub vs hub-triton vs triton)" in md
    assert "| 4K | dms-triton | 1.5 | 6 | 17.00 | 0.5 | 8,192 | 8 | 1.0 | 1.0 | 7.90x | n/a (random weights) |" in md
    assert "| 8K | dms-hub | OOM |" in md
    # speedup 2.0 / 0.5, 3 GiB saved; no dms-hub-triton in this run: dashes
    assert "| 4K | 2 | — | 0.5 | — | 4.00x | — | 20.00 | 17.00 | 3.00 |" in md
    assert "| 8K | OOM | — | 1 | — | — | — | — | 18.00 | — |" in md


def test_speedup_rows_need_both_methods():
    rows = _rows()
    assert [s["context"] for s in speedup_rows(rows)] == [4096, 8192]
    assert speedup_rows([r for r in rows if r["method"] != "dms-hub"]) == []
    md = render_markdown({}, [r for r in rows if r["method"] != "dms-hub"])
    assert "Needs both dms-hub and dms-triton" in md


def test_plots_without_vram_are_still_written(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    writer.add(_row(64, "vanilla", 0.01))
    writer.add(_row(128, "vanilla", 0.02))
    writer.finish()
    assert (tmp_path / MEMORY_PLOT).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["context"] == 128


def _saved(path, meta, rows):
    writer = ResultsWriter(path, meta)
    for row in rows:
        writer.add(row)
    return path


def test_merge_joins_runs_made_in_parts(tmp_path):
    meta = {"device": {"gpu": "H100"}, "model": "qwen3-8b", "dtype": "bfloat16", "weights": "random weights",
            "contexts": [4096], "methods": ["dms-hub"], "command": "dms-perf bench --methods dms-hub",
            "calibration": {"hub": {"marked_fraction": 0.875}}}
    rows = _rows()
    a = _saved(tmp_path / "a", meta, rows[:2])
    b = _saved(tmp_path / "b", {**meta, "contexts": [8192, 4096], "methods": ["dms-triton", "vanilla"],
                                 "command": "dms-perf bench --methods dms-triton,vanilla", "calibration": {}},
               [{**rows[1], "prefill_s": 0.25}, *rows[2:]])
    merged_meta, merged = merge_results([a, b / "results.json"])
    assert merged_meta["contexts"] == [4096, 8192]
    assert merged_meta["methods"] == ["dms-hub", "dms-triton", "vanilla"]
    assert merged_meta["command"] == "dms-perf bench --methods dms-hub ; dms-perf bench --methods dms-triton,vanilla"
    assert merged_meta["calibration"] == {"hub": {"marked_fraction": 0.875}}
    assert len(merged) == len(rows)
    triton_4k = [r for r in merged if (r["context"], r["method"]) == (4096, "dms-triton")]
    assert [r["prefill_s"] for r in triton_4k] == [0.25]  # the later run wins


def test_merge_refuses_other_cards(tmp_path):
    a = _saved(tmp_path / "a", {"device": {"gpu": "H100"}}, _rows()[:1])
    b = _saved(tmp_path / "b", {"device": {"gpu": "H200"}}, _rows()[1:2])
    with pytest.raises(ValueError, match="device"):
        merge_results([a, b])


def test_merge_per_model_joins_a_base_and_its_retrofits(tmp_path):
    """Runs of different checkpoints refuse to join unless per_model; then each row's method names its
    checkpoint, so the same method on two checkpoints is two rows."""
    meta = {"device": {"gpu": None}, "dtype": "float32", "contexts": [4096], "methods": ["dms-hub"]}
    row = _rows()[0]
    assert row["method"] == "dms-hub"
    a = _saved(tmp_path / "a", {**meta, "model": "models/base", "calibration": {"dms-hub": {"marked_fraction": 0.5}}},
               [row])
    b = _saved(tmp_path / "b", {**meta, "model": "models/base-dms-4x"}, [{**row, "prefill_s": 0.5}])
    with pytest.raises(ValueError, match="model"):
        merge_results([a, b])
    merged_meta, merged = merge_results([a, b], per_model=True)
    assert [(r["method"], r["model"], r["prefill_s"]) for r in merged] == [
        ("dms-hub (base)", "models/base", row["prefill_s"]), ("dms-hub (base-dms-4x)", "models/base-dms-4x", 0.5)]
    assert merged_meta["methods"] == ["dms-hub (base)", "dms-hub (base-dms-4x)"]
    assert merged_meta["model"] == "per row"
    assert merged_meta["calibration"] == {"dms-hub (base)": {"marked_fraction": 0.5}}  # named as its rows are


def test_benchmark_json_rows_come_in_bench_order():
    """A sharded pytest-benchmark run lists cases shard by shard; the report orders them by context, then
    as the registry's default methods are ordered (a method outside them last)."""
    cases = []
    for context, method in [(8192, "vanilla"), (4096, "snapkv:0.5"), (4096, "my-press"), (4096, "dms-triton"),
                            (8192, "dms-hub"), (4096, "vanilla")]:
        info = {k: v for k, v in _row(context, method, 1.0).items() if k not in ("context", "status", "new_tokens")}
        cases.append({"params": {"context_length": context}, "extra_info": info})
    cases.append({"params": {"context_length": 4096}, "extra_info": {"median_ms": 1.0}})  # not end to end
    meta, rows = results_from_benchmarks({"benchmarks": cases, "datetime": "2026-11-28T01:27:42"})
    assert [(r["context"], r["method"]) for r in rows] == [
        (4096, "vanilla"), (4096, "dms-triton"), (4096, "snapkv:0.5"), (4096, "my-press"),
        (8192, "vanilla"), (8192, "dms-hub"),
    ]
    assert meta["contexts"] == [4096, 8192] and meta["methods"][:2] == ["vanilla", "dms-triton"]


_DEFAULT_RUN = {"device": {"gpu": "H100", "torch": "2.11"}, "model": "qwen3-8b", "dtype": "bfloat16", "seed": 0,
                "weights": "random weights, eviction calibrated to 8x", "contexts": [4096],
                "methods": ["vanilla", "dms-hub", "dms-triton"], "command": "dms-perf bench"}


def test_merge_joins_a_vanilla_run_with_a_calibrated_one(tmp_path):
    """``--methods vanilla`` has no DMS method to calibrate, so its weights text differs from a default
    run's: the runs still join (same card, model, dtype, seed) and each row keeps its run's text."""
    rows = _rows()
    vanilla = _saved(tmp_path / "vanilla", {**_DEFAULT_RUN, "weights": "random weights", "methods": ["vanilla"],
                                             "device": {"gpu": "H100", "torch": "2.12"},
                                             "command": "dms-perf bench --methods vanilla"},
                     [{**rows[4], "context": 8192}])
    dms = _saved(tmp_path / "dms", _DEFAULT_RUN, rows[:4])
    meta, merged = merge_results([vanilla, dms])
    weights = {(r["context"], r["method"]): r["weights"] for r in merged}
    assert weights == {(8192, "vanilla"): "random weights",
                       (4096, "dms-hub"): "random weights, eviction calibrated to 8x",
                       (4096, "dms-triton"): "random weights, eviction calibrated to 8x",
                       (8192, "dms-triton"): "random weights, eviction calibrated to 8x",
                       (8192, "dms-hub"): "random weights, eviction calibrated to 8x"}
    assert meta["weights_by_row"] and meta["seed"] == 0
    md = render_markdown(meta, merged)
    assert "| Retrieval | Weights |" in md
    assert "| 8K | vanilla | 1.4 | 6.43 | 18.00 | 0.4 |" in md and "| random weights |" in md
    assert "| 4K | dms-triton | 1.5 |" in md and "| random weights, eviction calibrated to 8x |" in md
    assert "| 8K | dms-hub | OOM |" + " — |" * 9 + " random weights, eviction calibrated to 8x |" in md
    assert 'weights differ between the joined runs' in md
    # Joined again (re-rendering a joined directory), every row keeps its own text.
    joined = _saved(tmp_path / "joined", meta, merged)
    again_meta, again = merge_results([joined])
    assert {(r["context"], r["method"]): r["weights"] for r in again} == weights
    assert again_meta["weights"] == meta["weights"]


def test_one_run_renders_without_a_weights_column(tmp_path):
    md = render_markdown(_DEFAULT_RUN, _rows())
    assert "Weights |" not in md and "random weights, eviction calibrated to 8x" in md
    meta, merged = merge_results([_saved(tmp_path / "a", _DEFAULT_RUN, _rows())])
    assert "weights_by_row" not in meta and "Weights |" not in render_markdown(meta, merged)
    assert {r["weights"] for r in merged} == {"random weights, eviction calibrated to 8x"}


@pytest.mark.parametrize(("key", "value"), [("model", "tiny"), ("dtype", "float32"), ("seed", 1)])
def test_merge_refuses_another_model_dtype_or_seed(tmp_path, key, value):
    a = _saved(tmp_path / "a", _DEFAULT_RUN, _rows()[:1])
    b = _saved(tmp_path / "b", {**_DEFAULT_RUN, key: value}, _rows()[1:2])
    with pytest.raises(ValueError, match=key):
        merge_results([a, b])


def test_benchmark_json_rows_carry_the_runs_weights_text():
    info = {k: v for k, v in _row(4096, "dms-hub", 1.0).items() if k not in ("context", "status", "new_tokens")}
    info.update(method="dms-hub", weights="random weights", target_cr=8, calibrated_marked_fraction=0.875)
    meta, rows = results_from_benchmarks({"benchmarks": [{"params": {"context_length": 4096}, "extra_info": info}]})
    assert meta["weights"] == rows[0]["weights"] == "random weights, eviction calibrated to 8x"


def _table_cells(md):
    """(context, method) of each row of the full comparison table, in order."""
    table = md.split("## Full comparison")[1].split("##")[0]
    return [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| Context")]


def test_rows_come_in_methods_order_then_by_context():
    rows = [_row(8192, "vanilla", 1.0), *_rows()]
    meta = {"methods": ["dms-triton", "vanilla", "dms-hub"]}
    assert _table_cells(render_markdown(meta, rows)) == [
        ("4K", "dms-triton"), ("8K", "dms-triton"), ("4K", "vanilla"), ("8K", "vanilla"),
        ("4K", "dms-hub"), ("8K", "dms-hub"),
    ]
    # Without a method list (the table dms-perf bench prints): the registry's default order.
    assert [m for _, m in _table_cells("## Full comparison\n" + comparison_table(rows))] == [
        "vanilla", "vanilla", "dms-hub", "dms-hub", "dms-triton", "dms-triton"]


def test_repeated_methods_and_cells_give_one_row_per_context(tmp_path):
    """``--methods vanilla,vanilla`` resolves to one method; rows of one cell listed twice (e.g.
    ``--contexts 4k,4096``, or a hand-joined file) render once, the later row winning, in the table,
    the speedup table and the merged rows."""
    assert [m.name for m in resolve_methods("vanilla,vanilla")] == ["vanilla"]
    rows = [_row(4096, "vanilla", 0.5), _row(8192, "vanilla", 1.0), _row(4096, "vanilla", 0.25),
            _row(4096, "dms-hub", 2.0), _row(4096, "dms-triton", 0.5), _row(4096, "dms-hub", 1.0)]
    meta = {"methods": ["vanilla", "vanilla", "dms-hub", "dms-triton"]}
    md = render_markdown(meta, rows)
    assert _table_cells(md) == [("4K", "vanilla"), ("8K", "vanilla"), ("4K", "dms-hub"), ("4K", "dms-triton")]
    assert "| 4K | vanilla | 1.25 |" in md and "| 4K | dms-hub | 2 |" in md
    assert [s["speedup"] for s in speedup_rows(rows)] == [2.0]
    merged_meta, merged = merge_results([_saved(tmp_path / "a", meta, rows)])
    assert [(r["context"], r["method"], r["prefill_s"]) for r in merged] == [
        (4096, "vanilla", 0.25), (8192, "vanilla", 1.0), (4096, "dms-hub", 1.0), (4096, "dms-triton", 0.5)]
    assert merged_meta["methods"] == ["vanilla", "dms-hub", "dms-triton"]


def test_speedup_table_compares_hub_hub_triton_and_triton():
    rows = [*_rows(), _row(4096, "dms-hub-triton", 1.0, vram=19 * GIB), _row(8192, "dms-hub-triton", 2.0)]
    s4k, s8k = speedup_rows(rows)
    assert (s4k["mid_prefill_s"], s4k["mid_speedup"], s4k["speedup"], s4k["fast_over_mid"]) == (1.0, 2.0, 4.0, 2.0)
    assert (s8k["base_status"], s8k["mid_speedup"], s8k["fast_over_mid"]) == ("OOM", None, 2.0)
    md = render_markdown({}, rows)
    assert ("| Context | Hub prefill (s) | Hub-triton prefill (s) | Triton prefill (s) | Hub-triton speedup over hub "
            "| Triton speedup over hub | Triton over hub-triton | Hub peak VRAM (GiB) | Triton peak VRAM (GiB) "
            "| VRAM saved (GiB) |") in md
    assert "| 4K | 2 | 1 | 0.5 | 2.00x | 4.00x | 2.00x | 20.00 | 17.00 | 3.00 |" in md
    assert "| 8K | OOM | 2 | 1 | — | — | 2.00x | — | 18.00 | — |" in md
    # hub and hub-triton only: still a row per context, triton's cells dashed
    only = [r for r in rows if r["method"] != "dms-triton"]
    assert "| 4K | 2 | 1 | — | 2.00x | — | — | 20.00 | — | — |" in render_markdown({}, only)
    assert speedup_rows([r for r in rows if r["method"] != "dms-hub"]) == []


_CPU_RUN = {"device": {"gpu": "none", "gpu_slug": "cpu"}, "model": "tiny", "dtype": "float32", "repeats": 1,
            "weights": "random weights, eviction calibrated to 8x", "methods": ["vanilla", "dms-hub", "dms-triton"]}


def _cpu_rows():
    return [{**_row(128, "vanilla", 0.2), "repeats": 1},
            {**_row(128, "dms-hub", 0.3, compression=5.09), "repeats": 1},
            {**_row(256, "dms-hub", 1.1, compression=5.45), "repeats": 1},
            {**_row(128, "dms-triton", 1.2, compression=5.09), "repeats": 1}]


def _notes(md):
    if "**Reading this table**" not in md:
        return None
    return md.split("**Reading this table**")[1].split("## Full comparison")[0]


def test_reading_notes_on_a_cpu_smoke_run():
    notes = _notes(render_markdown(_CPU_RUN, _cpu_rows()))
    assert "16-token window dominates" in notes and "calibrated to 8x shows less compression" in notes
    assert "dms-hub: 5.09x at 128, 5.45x at 256" in notes
    assert "the Triton rows (dms-triton) ran in Triton's interpreter" in notes
    assert "e.g. the 0.25x below" in notes  # dms-hub 0.3 s / dms-triton 1.2 s
    assert "— under Peak VRAM means not measured: there is no GPU here" in notes
    assert "one timed run per cell (--repeats 1, tiny random model) are smoke figures" in notes
    assert "- card: no GPU, CPU only (torch" in render_markdown(_CPU_RUN, _cpu_rows())


def test_reading_notes_only_where_they_apply():
    h100 = {**_DEFAULT_RUN, "device": {"gpu": "NVIDIA H100 80GB HBM3"}, "repeats": 3}
    rows = [_row(4096, "vanilla", 0.4, vram=18 * GIB), _row(4096, "dms-triton", 0.5, vram=17 * GIB, compression=7.9),
            _row(4096, "dense-triton", 0.5, vram=17 * GIB), _row(4096, "snapkv:0.5", 0.5, vram=17 * GIB, compression=2)]
    assert _notes(render_markdown(h100, rows)) is None  # 7.9x of 8x, a GPU, VRAM measured, three repeats
    short = [*rows, _row(8192, "dms-hub", 1.0, vram=17 * GIB, compression=4.27)]
    notes = _notes(render_markdown(h100, short))
    assert "512-token window dominates" in notes and "(dms-hub: 4.27x at 8K)" in notes
    assert "interpreter" not in notes and "Peak VRAM" not in notes and "smoke" not in notes
    # Uncalibrated weights (a --methods vanilla run, or DMS with --target-cr 0): nothing to explain.
    assert _notes(render_markdown({**h100, "weights": "random weights"}, short)) is None
    # A GPU run missing one row's VRAM: the dash is explained without blaming the machine.
    notes = _notes(render_markdown(h100, [*rows, _row(8192, "vanilla", 1.0)]))
    assert notes.strip() == "- — under Peak VRAM means not measured."
    # CPU, three repeats, no Triton rows: only VRAM.
    cpu = [{**r, "repeats": 3} for r in _cpu_rows() if r["method"] == "vanilla"]
    assert _notes(render_markdown({**_CPU_RUN, "repeats": 3}, cpu)).strip() == (
        "- — under Peak VRAM means not measured: there is no GPU here (peak VRAM is CUDA's allocator peak).")


TWELVE_METHODS = (
    "vanilla", "dms-hub", "dms-hub-triton", "dms-flex", "dms-triton", "dms-triton-eager", "dense-triton",
    "snapkv:0.5", "streamingllm:0.5", "knorm:0.5", "expected-attention:0.5", "dmspress-knorm:0.5",
)


def _twelve_methods(vram=True):
    """12 methods at 4K, 8K and 32K: KV bytes alike within the kvpress presses and within the evicting DMS
    methods, as measured; times all different."""
    kv = {"vanilla": 8, "dense-triton": 8.3, "dmspress-knorm:0.5": 8, "snapkv:0.5": 4, "streamingllm:0.5": 4,
          "knorm:0.5": 4, "expected-attention:0.5": 4}
    rows = []
    for i, method in enumerate(TWELVE_METHODS):
        for context in (4096, 8192, 32768):
            vram_bytes = (16 + i / 10) * GIB if vram else None
            rows.append(_row(context, method, 0.1 * (i + 1) * context / 4096, vram=vram_bytes,
                             kv=int(kv.get(method, 1) * context * 2**10)))
    return rows


_H100_META = {"device": {"gpu": "NVIDIA H100 80GB HBM3"}, "model": "qwen3-8b", "dtype": "bfloat16",
              "date": "2026-11-28 01:27 UTC", "weights": "random weights, eviction calibrated to 8x",
              "methods": list(TWELVE_METHODS), "repeats": 3}


def _lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_plots_name_model_card_and_date_and_read_4k_8k_32k():
    figures = build_figures(_twelve_methods(), _H100_META)
    assert set(figures) == {TIME_PLOT, MEMORY_PLOT}
    for fig in figures.values():
        title = fig.get_suptitle()
        assert "qwen3-8b" in title and "NVIDIA H100 80GB HBM3" in title and "2026-11-28 01:27 UTC" in title
        assert len(fig.axes) == (3 if fig is figures[MEMORY_PLOT] else 2)  # VRAM, KV held, KV kept
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == ["4K", "8K", "32K"]
            assert list(ax.xaxis.get_minorticklocs()) == []  # no 2^13-style ticks in between


def test_plots_give_each_method_its_own_colour_and_marker_and_keep_legends_outside():
    extra = [_row(c, m, 0.05, vram=GIB) for m in ("snapkv:0.25", "my-press") for c in (4096, 8192, 32768)]
    for rows, count in ((_twelve_methods(), 12), (_twelve_methods() + extra, 14)):
        for fig in build_figures(rows, _H100_META).values():
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                lines = _lines(ax)
                assert lines, f"empty panel {ax.get_title()}"
                assert len({line.get_color() for line in lines}) == count
                assert len({line.get_marker() for line in lines}) == count
                assert len({(line.get_color(), line.get_marker()) for line in lines}) == count
                legend = ax.get_legend()
                assert legend is not None and len(legend.get_texts()) == count
                assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    # Every registered default method has a colour and a marker of its own.
    styles = method_styles(list(DEFAULT_METHODS))
    assert len({c for c, _ in styles.values()}) == len({m for _, m in styles.values()}) == len(DEFAULT_METHODS)
    # The same method looks the same in every figure and every run.
    assert method_styles(["knorm:0.5"]) == {"knorm:0.5": method_styles(list(DEFAULT_METHODS))["knorm:0.5"]}


def test_plots_show_methods_that_coincide():
    memory = build_figures(_twelve_methods(), _H100_META)[MEMORY_PLOT]
    kv = next(ax for ax in memory.axes if "KV held" in ax.get_ylabel())
    labels = [t.get_text() for t in kv.get_legend().get_texts()]
    assert "streamingllm:0.5 (same as snapkv:0.5)" in labels and "expected-attention:0.5 (same as snapkv:0.5)" in labels
    assert "dms-triton (same as dms-hub)" in labels and "dmspress-knorm:0.5 (same as vanilla)" in labels
    assert "snapkv:0.5" in labels and "vanilla" in labels
    assert "dense-triton" in labels  # 4% more: drawn where it is, not called the same
    by_label = {line.get_label(): line for line in _lines(kv)}
    presses = [by_label[n] for n in labels if n.startswith(("snapkv", "streamingllm", "knorm", "expected"))]
    assert all(list(p.get_ydata()) == list(presses[0].get_ydata()) for p in presses)
    firsts = [p.get_xdata()[0] for p in presses]
    assert len(set(firsts)) == 4 and min(firsts) < 4096 < max(firsts)  # side by side around the context
    assert "drawn side by side" in memory.get_supxlabel()
    time = build_figures(_twelve_methods(), _H100_META)[TIME_PLOT]
    assert not any("same as" in t.get_text() for ax in time.axes for t in ax.get_legend().get_texts())
    assert all(line.get_xdata()[0] == 4096 for ax in time.axes for line in _lines(ax))


def test_plots_without_a_gpu_have_no_empty_panel():
    rows = [{**r, "repeats": 1} for r in _twelve_methods(vram=False)]
    figures = build_figures(rows, {**_H100_META, "device": {"gpu": "none", "gpu_slug": "cpu"}, "model": "tiny",
                                   "dtype": "float32", "repeats": 1})
    memory = figures[MEMORY_PLOT]
    assert [ax.get_ylabel() for ax in memory.axes] == ["KV held at end (MiB), log scale",
                                                       "KV kept at end (MiB), log scale"]
    title = memory.get_suptitle()
    assert "CPU (no GPU)" in title and "interpreter" in title and "smoke" in title
    assert all(_lines(ax) for fig in figures.values() for ax in fig.axes)


def test_plots_draw_one_point_per_cell_and_name_failures():
    rows = [*_rows(), _row(4096, "vanilla", 0.1, vram=18 * GIB), _row(8192, "vanilla", 0.8, vram=18 * GIB),
            {"context": 4096, "method": "snapkv:0.5", "new_tokens": 9, "status": "OOM"},
            {"context": 8192, "method": "snapkv:0.5", "new_tokens": 9, "status": "OOM"},
            {"context": 2048, "method": "snapkv:0.5", "new_tokens": 9, "status": "skipped: too short"}]
    fig = build_figures(rows, {})[TIME_PLOT]
    total = fig.axes[0]
    by_label = {line.get_label(): line for line in total.get_lines()}
    assert list(by_label["vanilla"].get_ydata()) == [1.1, 1.8]  # the later 4K row, once
    assert list(by_label["dms-hub (OOM at 8K)"].get_xdata()) == [4096]
    assert "snapkv:0.5 (skipped at 2K; OOM at 4K, 8K)" in by_label  # named in the legend, nothing to draw
    assert [t.get_text() for t in total.get_xticklabels()] == ["4K", "8K"]


def test_bench_runs_record_their_seed_and_join_only_on_the_same_one(tmp_path):
    from dms_perf.bench.cli import main

    common = ["bench", "--model", "tiny", "--contexts", "32", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
    for name, seed, methods in (("a", "0", "vanilla"), ("b", "0", "knorm:0.5"), ("c", "1", "knorm:0.5")):
        assert main([*common, "--methods", methods, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    assert load_results(tmp_path / "c")[0]["seed"] == 1
    meta, rows = merge_results([tmp_path / "a", tmp_path / "b"])
    assert meta["seed"] == 0 and [r["method"] for r in rows] == ["vanilla", "knorm:0.5"]
    with pytest.raises(ValueError, match="seed"):
        merge_results([tmp_path / "a", tmp_path / "c"])


# --- batches: (context, method, batch) is the cell --------------------------------------------------------


def _batch_row(context, method, batch, decode_tok_s, prefill=1.0):
    """A ``_row`` (total time prefill + 1 s, 9 tokens per sequence) of ``batch`` sequences."""
    return {**_row(context, method, prefill), "batch": batch, "decode_tok_s": decode_tok_s,
            "decode_tok_s_per_seq": decode_tok_s / batch, "ms_per_step": 1e3 * batch / decode_tok_s,
            "prefill_tok_s": batch * context / prefill}


def test_rows_of_different_batches_are_different_cells(tmp_path):
    rows = [_row(4096, "vanilla", 0.5), _batch_row(4096, "vanilla", 8, 400.0), _batch_row(4096, "vanilla", 8, 500.0),
            _batch_row(4096, "dms-hub", 8, 300.0, prefill=4.0), _batch_row(4096, "dms-triton", 8, 900.0),
            _row(4096, "dms-hub", 2.0), _row(4096, "dms-triton", 0.5)]
    ordered = ordered_rows(rows)
    assert [(r["method"], r.get("batch", 1), r["decode_tok_s"]) for r in ordered] == [
        ("vanilla", 1, 8.0), ("vanilla", 8, 500.0), ("dms-hub", 1, 8.0), ("dms-hub", 8, 300.0),
        ("dms-triton", 1, 8.0), ("dms-triton", 8, 900.0)]  # the later batch-8 vanilla row wins
    meta, merged = merge_results([_saved(tmp_path / "a", {"methods": ["vanilla"]}, rows)])
    assert [(r["method"], r.get("batch", 1)) for r in merged] == [(r["method"], r.get("batch", 1)) for r in ordered]
    assert meta["batches"] == [1]  # the run's meta did not list batches: an old run, batch 1
    speedups = speedup_rows(rows)
    assert [(s["batch"], s["speedup"]) for s in speedups] == [(1, 4.0), (8, 4.0)]
    table = comparison_table(rows)
    assert "| Context | Method | Batch | Time (s) |" in table and "| Decode tok/s per seq | ms/step |" in table
    assert "| 4K | vanilla | 8 | 2 | 36 |" in table  # 2 s; tok/s: 8 sequences x 9 tokens / 2 s
    assert "| 500 | 62.5 | 16 |" in table
    assert "| 4K | 8 | 4 | — | 1 | — | 4.00x |" in render_markdown({}, rows)


def test_old_rows_without_batch_load_and_merge_as_batch_1(tmp_path):
    """A results.json from before batches (no ``batch`` in rows or meta) joins a new run: its rows are the
    batch-1 cells, replaced by a new batch-1 row of the same cell, kept apart from batch-8 rows."""
    old_rows = [_row(4096, "vanilla", 0.5), _row(8192, "vanilla", 1.0)]
    assert all("batch" not in r for r in old_rows)
    old = _saved(tmp_path / "old", {"methods": ["vanilla"], "contexts": [4096, 8192]}, old_rows)
    new = _saved(tmp_path / "new", {"methods": ["vanilla"], "contexts": [4096], "batches": [1, 8]},
                 [{**_row(4096, "vanilla", 0.25), "batch": 1}, _batch_row(4096, "vanilla", 8, 400.0)])
    meta, merged = merge_results([old, new])
    assert meta["batches"] == [1, 8]
    assert [(r["context"], r.get("batch", 1), r["prefill_s"]) for r in merged] == [
        (4096, 1, 0.25), (4096, 8, 1.0), (8192, 1, 1.0)]
    md = render_markdown(meta, merged)
    assert "| 8K | vanilla | 1 |" in md and "Batch B (here 1, 8): B distinct prompts" in md
    # old results alone render as before: no batch column, no batch plot
    alone_meta, alone = merge_results([old])
    assert "Batch |" not in render_markdown(alone_meta, alone)
    assert set(build_figures(alone, alone_meta)) == {TIME_PLOT, MEMORY_PLOT}


def _batch_rows():
    rows = []
    for i, method in enumerate(("vanilla", "dms-triton", "dense-triton")):
        for context in (4096, 32768):
            for batch in (1, 8, 32):
                rows.append(_batch_row(context, method, batch, (i + 1) * 10.0 * batch ** 0.8 * 4096 / context))
    rows.append({"context": 32768, "method": "vanilla", "batch": 64, "new_tokens": 9, "status": "OOM"})
    return rows


def test_throughput_vs_batch_plot():
    figures = build_figures(_batch_rows(), _H100_META)
    assert set(figures) == {TIME_PLOT, MEMORY_PLOT, BATCH_PLOT}
    fig = figures[BATCH_PLOT]
    title = fig.get_suptitle()
    assert title.startswith("Decode throughput vs batch: qwen3-8b bfloat16 on NVIDIA H100 80GB HBM3, 2026-11-28")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["Decode throughput at 4K tokens of context",
                                                   "Decode throughput at 32K tokens of context"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_xaxis().get_transform().base == 2
        assert ax.get_ylabel().startswith("decode tok/s, all sequences")
    small, large = fig.axes
    assert [t.get_text() for t in small.get_xticklabels()] == ["1", "2", "4", "8", "16", "32"]
    assert [t.get_text() for t in large.get_xticklabels()][-1] == "64"
    lines = {line.get_label(): line for line in _lines(large)}
    assert set(lines) == {"vanilla (OOM at batch 64)", "dms-triton", "dense-triton"}
    assert list(lines["dms-triton"].get_xdata()) == [1, 8, 32]
    expected = [r["decode_tok_s"] for r in _batch_rows() if (r["method"], r["context"]) == ("dms-triton", 32768)]
    assert list(lines["dms-triton"].get_ydata()) == expected
    assert lines["dms-triton"].get_color() == method_styles(["dms-triton"])["dms-triton"][0]
    # against context: the smallest batch only, one series per method, and said so
    time = figures[TIME_PLOT]
    assert "Time vs context (batch 1)" in time.get_suptitle()
    total = time.axes[0]
    assert len(_lines(total)) == 3 and all(len(line.get_xdata()) == 2 for line in _lines(total))
    # one batch size: no throughput figure
    assert BATCH_PLOT not in build_figures([r for r in _batch_rows() if r.get("batch") == 8], _H100_META)


def test_throughput_vs_batch_plot_is_written(tmp_path):
    writer = ResultsWriter(tmp_path, _H100_META)
    for row in _batch_rows():
        writer.add(row)
    assert {f.name for f in writer.finish()} == {"results.json", "results.md", TIME_PLOT, MEMORY_PLOT, BATCH_PLOT}
    assert (tmp_path / BATCH_PLOT).read_bytes().startswith(PNG_MAGIC)


# --- KV held and KV kept ---------------------------------------------------------------------------------


def _kv_rows():
    """A CPU smoke run's figures: DMS holds more than vanilla (reserved decode rows) and keeps a fifth."""
    return [_row(128, "vanilla", 0.1, kv=138_240), _row(128, "dms-hub", 0.5, kv=158_164, compression=5.09, kept=27_648),
            _row(256, "dms-hub", 0.9, kv=170_000, compression=5.45, kept=51_000)]


def test_tables_show_kv_held_and_kept():
    table = comparison_table(_kv_rows())
    assert "| KV held (KiB) | KV kept (KiB) | Compression |" in table  # all below 1 MiB: KiB, not 0.1 MiB
    assert "| 135.0 | 135.0 | 1.00x |" in table and "| 154.5 | 27.0 | 5.09x |" in table
    notes = reading_notes({}, _kv_rows())
    (note,) = [n for n in notes if n.startswith("KV held counts")]
    assert "rows per KV head" in note and "can hold more than vanilla's while keeping far less" in note
    assert "(dms-hub at 128: 154.5 KiB held, 27.0 KiB kept, vanilla 135.0 KiB)" in note
    md = render_markdown({}, _kv_rows())
    assert note in md and "KV kept = bytes of the keys and values still attended to" in md
    big = comparison_table([_row(4096, "vanilla", 1.0, kv=3 * 2**20)])
    assert "| KV held (MiB) | KV kept (MiB) |" in big and "| 3.0 | 3.0 | 1.00x |" in big
    failed = comparison_table([*_kv_rows(), {"context": 256, "method": "vanilla", "new_tokens": 9, "status": "OOM"}])
    assert "| 256 | vanilla | OOM |" + " — |" * 9 in failed  # as many cells as the header


def test_rows_held_as_kept_get_no_kv_note():
    rows = [_row(4096, "vanilla", 1.0), _row(4096, "knorm:0.5", 1.0, kv=2**19, compression=2.0)]
    assert not [n for n in reading_notes({}, rows) if "KV" in n]


def test_old_rows_without_kept_bytes_render_with_a_dash(tmp_path):
    before = [{k: v for k, v in r.items() if k != "kept_kv_bytes"} for r in _rows()]  # results before the split
    old = _saved(tmp_path / "old", {"methods": ["vanilla", "dms-hub"]}, before)
    new = _saved(tmp_path / "new", {"methods": ["vanilla"]}, [_row(8192, "vanilla", 0.8)])
    meta, rows = merge_results([old, new])
    md = render_markdown(meta, rows)
    assert "| 4K | vanilla | 1.4 | 6.43 | 18.00 | 0.4 | 10,240 | 8 | 1.0 | — | 1.00x |" in md
    assert "| 8K | vanilla |" in md and "| 1.0 | 1.0 | 1.00x |" in md
    assert "— under KV kept means not recorded: rows written before results held it." in md
    memory = build_figures(rows, meta)[MEMORY_PLOT]
    kept = next(ax for ax in memory.axes if "KV kept" in ax.get_ylabel())
    assert [line.get_label() for line in _lines(kept)] == ["vanilla"]  # the one row that recorded it


def test_memory_plot_shows_held_and_kept_with_why_they_differ():
    memory = build_figures(_kv_rows(), {})[MEMORY_PLOT]
    labels = [ax.get_ylabel() for ax in memory.axes]
    assert labels == ["KV held at end (KiB)", "KV kept at end (KiB)"]
    held, kept = memory.axes
    assert "rows reserved for decoding included" in held.get_title(loc="left")
    assert "still attended to" in kept.get_title(loc="left")


def test_a_single_repeat_gets_a_caveat_first():
    cpu = _notes(render_markdown(_CPU_RUN, _cpu_rows())).strip().splitlines()
    assert cpu[0].startswith("- CPU figures from one timed run per cell (--repeats 1, tiny random model) are smoke")
    assert "on a shared CPU its speeds are noise (two identical runs differed ~70x" in cpu[0]
    h100 = {**_DEFAULT_RUN, "device": {"gpu": "NVIDIA H100 80GB HBM3"}, "repeats": 1}
    rows = [{**_row(4096, "vanilla", 0.4, vram=18 * GIB), "repeats": 1}]
    assert _notes(render_markdown(h100, rows)).strip() == (
        "- One timed run per cell (--repeats 1): a figure is one sample, not a median, so one slow run (another "
        "process, clocks ramping up) is the figure; use --repeats 3 or more to compare speeds.")


def test_a_partial_row_shows_its_figures_marked():
    partial = {**_row(4096, "dms-triton", 0.5), "status": "interrupted after 1 of 3 repeats", "partial": True,
               "repeats": 1}
    rows = [_row(4096, "dms-hub", 2.0), partial]
    table = comparison_table(rows)
    assert "| 4K | dms-triton (interrupted after 1 of 3 repeats) | 1.5 |" in table
    assert "| 4K | 2 | — | 0.5 (interrupted after 1 of 3 repeats) | — | 4.00x |" in speedup_table(rows)
    (line,) = [line for fig in build_figures(rows, {}).values() for ax in fig.axes[:1] for line in _lines(ax)
               if line.get_label() == "dms-triton"]  # drawn like any measured row
    assert list(line.get_ydata()) == [1.5]


# --- long generations: traces, peak KV held, quarter decode rates ------------------------------------------


def _traced(row, held, kept, seconds_per_token=0.01):
    """``row`` with a trace over its tokens: KV ``held(tokens)`` and ``kept(tokens)``, a steady decode."""
    tokens = list(range(1, row["generated_tokens"] + 1))
    trace = {"tokens": tokens, "kv_bytes": [held(t) for t in tokens], "kept_kv_bytes": [kept(t) for t in tokens],
             "decode_s": [(t - 1) * seconds_per_token for t in tokens]}
    return {**row, "trace": trace, "peak_kv_bytes": trace["kv_bytes"][-1],
            "decode_tok_s_first_quarter": 1 / seconds_per_token, "decode_tok_s_last_quarter": 0.5 / seconds_per_token}


def _long_rows(new_tokens=256):
    """A long generation at 64 tokens of context on the tiny model: DMS reserves new_tokens rows per head."""
    dense = _row(64, "dense-triton", 0.1, kv=0, new_tokens=new_tokens)
    dms = _row(64, "dms-triton", 0.1, kv=0, new_tokens=new_tokens, compression=7.5)
    return [_traced(dense, lambda t: 400_000, lambda t: 1024 * (64 + t)),
            _traced(dms, lambda t: 350_000, lambda t: 1024 * (8 + t // 8))]


def _without_trace(rows):
    keys = ("trace", "peak_kv_bytes", "decode_tok_s_first_quarter", "decode_tok_s_last_quarter")
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def test_long_generation_rows_get_quarter_and_peak_columns_and_trace_figures(tmp_path):
    rows = [{**r, "kv_bytes": r["trace"]["kv_bytes"][-1], "kept_kv_bytes": r["trace"]["kept_kv_bytes"][-1]}
            for r in _long_rows()]
    table = comparison_table(rows)
    assert "| Decode tok/s | Decode tok/s first → last ¼ | KV peak (KiB) | KV held (KiB) | KV kept (KiB) |" in table
    assert "| 100 → 50 | 341.8 | 341.8 | 40.0 | 7.50x |" in table  # dms-triton: 8 + 256 // 8 tokens kept
    failed = comparison_table([*rows, {"context": 128, "method": "vanilla", "new_tokens": 9, "status": "OOM"}])
    assert "| 128 | vanilla | OOM |" + " — |" * 11 in failed  # as many cells as the header
    writer = ResultsWriter(tmp_path / "new", {})
    for row in rows:
        writer.add(row)
    names = {f.name for f in writer.finish()}
    assert {KV_TRACE_PLOT, RATE_TRACE_PLOT} <= names
    md = (tmp_path / "new" / "results.md").read_text()
    assert "Decode tok/s first → last ¼ = decode tok/s (all sequences) over the first and over the last" in md
    figures = build_figures(rows, {})
    (kv,) = figures[KV_TRACE_PLOT].axes
    assert [(line.get_label(), line.get_linestyle()) for line in _lines(kv)] == [  # in the registry's order
        ("dms-triton held", "-"), ("dms-triton kept", "--"), ("dense-triton held", "-"), ("dense-triton kept", "--")]
    (rate,) = figures[RATE_TRACE_PLOT].axes
    assert {round(y) for line in _lines(rate) for y in line.get_ydata()} == {100}  # 0.01 s per token
    # an old results.json (no traces, no quarters, no peak): loads, renders as before, no trace figures
    writer = ResultsWriter(tmp_path / "old", {})
    for row in _without_trace(rows):
        writer.add(row)
    names = {f.name for f in writer.finish()}
    assert names == {"results.json", "results.md", TIME_PLOT, MEMORY_PLOT}
    meta, loaded = load_results(tmp_path / "old")
    assert "first → last" not in comparison_table(loaded)


def test_a_bad_trace_is_one_line_naming_the_row(tmp_path):
    row = {**_long_rows()[0], "trace": {"tokens": [1, 2], "kv_bytes": [1], "kept_kv_bytes": [1], "decode_s": [0]}}
    path = _saved(tmp_path, {}, [row])
    with pytest.raises(ValueError, match=r"row 0: 'trace' lists tokens, kv_bytes, kept_kv_bytes, decode_s are not"):
        load_results(path)


def test_reserved_rows_note_where_a_long_dms_generation_holds_more_than_it_keeps():
    rows = [{**r, "kv_bytes": r["trace"]["kv_bytes"][-1], "kept_kv_bytes": r["trace"]["kept_kv_bytes"][-1]}
            for r in _long_rows()]
    (note,) = [n for n in reading_notes({}, rows) if n.startswith("A DMS generation off the engine reserves")]
    assert "max(capacity step 128, new tokens) decode rows per KV head" in note
    assert "(dms-triton at 64, 256 new tokens: 341.8 KiB held, 40.0 KiB kept; dense-triton 390.6 KiB held)" in note
    # DMS holding what it keeps, or a short generation (the capacity step reserves its rows): no such note
    held_as_kept = [{**r, "kv_bytes": r["kept_kv_bytes"]} for r in rows]
    short = [{**r, "generated_tokens": 9} for r in rows]
    on_the_engine = [{**r, "kv_pool_bytes": 1 << 20} for r in rows]  # a paged pool: pages follow each head
    for other in (held_as_kept, short, on_the_engine):
        assert not [n for n in reading_notes({}, other) if n.startswith("A DMS generation off the engine reserves")]


def test_a_family_parameter_takes_its_default_style_unless_the_default_runs_too():
    """snapkv-triton:0.875 looks like snapkv-triton:0.5 does in other runs (not like a neighbour's colour),
    and where both run they differ."""
    from dms_perf.bench.report import method_styles

    default = method_styles(["snapkv-triton:0.5"])["snapkv-triton:0.5"]
    alone = method_styles(["dms-triton", "dense-triton", "snapkv-triton:0.875"])
    assert alone["snapkv-triton:0.875"] == default
    assert len(set(alone.values())) == 3
    both = method_styles(["snapkv-triton:0.5", "snapkv-triton:0.875"])
    assert both["snapkv-triton:0.875"] != both["snapkv-triton:0.5"]
