"""``dms-perf bench``: --help explains every option; a tiny CPU run writes every result file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dms_perf.bench.cli import build_parser, main
from dms_perf.bench.methods import FAMILIES
from dms_perf.bench.report import load_results
from tests.bench.word_tokenizer import word_tokenizer
from tests.interpreter import skip_if_cpu_path_cannot_run_here

REPO = Path(__file__).resolve().parents[2]

BENCH_OPTIONS = ("--contexts", "--batch", "--methods", "--model", "--tokenizer", "--new-tokens", "--repeats",
                 "--warmup", "--needle-depth", "--dtype", "--target-cr", "--seed", "--out")


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_bench_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in BENCH_OPTIONS:
        assert option in out
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices.values())
    for action in bench._actions:
        assert action.help, f"{action.option_strings} has no help text"
    for family in FAMILIES.values():  # every method listed with what it is
        assert f"{family.name}{':R' if family.takes_parameter else ''} {family.summary}" in out


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_entry_point_module_runs():
    result = subprocess.run([sys.executable, "-m", "dms_perf.bench.cli", "bench", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--new-tokens" in result.stdout


def test_tiny_cpu_run_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    methods = "vanilla,knorm:0.5,dms-hub,dms-triton"
    code = main(["bench", "--contexts", "40,0.0625k", "--methods", methods, "--model", "tiny", "--new-tokens", "3",
                 "--repeats", "1", "--warmup", "0", "--dtype", "float32", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["context"]) for r in rows] == [
        (m, c) for m in methods.split(",") for c in (40, 64)
    ]
    assert all(r["status"] == "ok" and r["generated_tokens"] == 3 for r in rows), rows
    meta = data["meta"]
    assert meta["weights"] == "random weights, eviction calibrated to 8x"
    assert set(meta["calibration"]) == {"hub", "triton"}
    assert meta["calibration"]["triton"]["marked_fraction"] == pytest.approx(0.875, abs=0.02)
    for name in ("results.md", "time_vs_context.png", "vram_vs_context.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| 64 | dms-triton |" in md and "## DMS prefill speedup" in md
    out = capsys.readouterr().out
    assert "| 40 | knorm:0.5 |" in out  # the table is printed too
    # KV held (rows reserved for decoding included) and KV kept, in the rows, both tables and the plot
    for r in rows:
        assert r["kept_kv_bytes"] <= r["kv_bytes"], r
        assert (r["kept_kv_bytes"] < r["kv_bytes"]) == r["method"].startswith("dms"), r
    for text in (md, out):
        assert "| KV held (KiB) | KV kept (KiB) | Compression |" in text
    assert "KV held counts every row a cache holds, those reserved for decoding included" in md
    assert "KV held counts every row" in out  # the console says why too
    assert "- CPU figures from one timed run per cell (--repeats 1, tiny random model) are smoke figures" in out
    assert out.index("Reading these tables:") < out.index("| Context | Method |") < out.index("| Hub prefill (s) |")


def test_a_row_does_not_depend_on_the_methods_run_before_it(tmp_path, monkeypatch):
    """dense-triton (eviction off) and dms-triton share one model: whichever runs first, dms-triton's row is
    the same, its calibration included (each run as in a process of its own: no calibration cached)."""
    from dms_perf.bench import methods as registry

    seen = {}
    for order in ("dense-triton,dms-triton", "dms-triton,dense-triton"):
        monkeypatch.setattr(registry, "_CALIBRATIONS", {})
        out = tmp_path / order.replace(",", "-")
        assert main(["bench", "--contexts", "48", "--methods", order, "--model", "tiny", "--new-tokens", "3",
                     "--repeats", "1", "--warmup", "0", "--dtype", "float32", "--out", str(out)]) == 0
        meta, rows = load_results(out)
        (row,) = [r for r in rows if r["method"] == "dms-triton"]
        figures = {key: row[key] for key in ("status", "generated_tokens", "kv_bytes", "kept_kv_bytes", "compression")}
        seen[order] = meta["calibration"]["triton"], figures
    assert seen["dense-triton,dms-triton"] == seen["dms-triton,dense-triton"]
    calibration, figures = seen["dms-triton,dense-triton"]
    assert calibration["marked_fraction"] == pytest.approx(0.875, abs=0.02)  # calibrated with eviction on
    assert figures["status"] == "ok" and figures["compression"] > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "vanilla,nope"], "unknown method 'nope'; valid methods:"),
        (["--contexts", "4q"], "not a token count"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["--needle-depth", "2"], "--needle-depth must be in [0, 1]"),
        (["--target-cr", "0.5"], "--target-cr must be 0 (off) or > 1, got 0.5"),
        (["--target-cr", "1"], "--target-cr must be 0 (off) or > 1, got 1"),  # no eviction to calibrate to
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--out", str(tmp_path), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_target_cr_1_is_one_line_before_any_cell(tmp_path):
    result = cli("bench", "--model", "tiny", *TINY_RUN, "--methods", "dms-hub", "--target-cr", "1",
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("usage: dms-perf bench ")  # an option error: argparse's usage, then the line
    assert result.stderr.strip().splitlines()[-1] == "dms-perf bench: error: --target-cr must be 0 (off) or > 1, got 1"
    assert not (tmp_path / "out").exists()


def test_a_context_written_twice_is_one_cell(tmp_path, capsys):
    # 32 and 0.03125k are one length: one cell, one row, kept where it first appears
    code = main(["bench", "--model", "tiny", "--contexts", "48,32,48,0.03125k", "--methods", "vanilla",
                 "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    meta, rows = load_results(tmp_path)
    assert meta["contexts"] == [48, 32]
    assert [(r["method"], r["context"]) for r in rows] == [("vanilla", 48), ("vanilla", 32)]


@pytest.mark.parametrize(("model", "contexts", "limit"), [
    ("tiny", "999999999", 4096),
    ("tiny", "64,4093,8k", 4096),  # 4093 + 4 new tokens is one position too many
    ("checkpoint", "5k", 4096),
])
def test_contexts_beyond_the_models_positions_are_refused_before_any_cell(tmp_path, checkpoint, model, contexts,
                                                                         limit):
    model = str(checkpoint) if model == "checkpoint" else model
    result = cli("bench", "--model", model, "--contexts", contexts, "--methods", "vanilla", "--new-tokens", "4",
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    too_long = [c for c in contexts.split(",") if c not in ("64",)]
    values = ", ".join(str(int(c[:-1]) * 1024) if c.endswith("k") else c for c in too_long)
    assert error_line(result) == (
        f"dms-perf bench: error: --contexts {values}: a prompt and its --new-tokens 4 must fit the model's "
        f"positions, but --model {model} has {limit} (max_position_embeddings): contexts up to {limit - 4} tokens")
    assert not (tmp_path / "out").exists()


def test_batch_cells_are_rows_of_their_own(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "--contexts", "40", "--methods", "vanilla,dms-hub", "--batch", "1,2,2", "--model", "tiny",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    meta, rows = load_results(out)
    assert meta["batches"] == [1, 2]  # repeats dropped
    assert [(r["method"], r["context"], r["batch"]) for r in rows] == [
        ("vanilla", 40, 1), ("vanilla", 40, 2), ("dms-hub", 40, 1), ("dms-hub", 40, 2)]
    for r in rows:
        assert r["status"] == "ok" and r["generated_tokens"] == 3, r
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * r["decode_tok_s_per_seq"])
        assert r["ms_per_step"] > 0 and r["prefill_tok_s"] == pytest.approx(r["batch"] * 40 / r["prefill_s"])
    by = {(r["method"], r["batch"]): r for r in rows}
    assert by["vanilla", 2]["kv_bytes"] == 2 * by["vanilla", 1]["kv_bytes"]  # two sequences' dense caches
    md = (out / "results.md").read_text()
    assert "| Context | Method | Batch |" in md and "| 40 | dms-hub | 2 |" in md
    assert (out / "throughput_vs_batch.png").stat().st_size > 0
    assert "| 40 | vanilla | 2 |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny Qwen3(-DMS) checkpoint with its tokenizer, as a real one would be laid out on disk."""
    from dms_perf.model.qwen3_dms import build_model, tiny_config

    path = tmp_path_factory.mktemp("checkpoint")
    build_model(tiny_config(), backend=None, dtype=torch.float32, device="cpu").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_checkpoint_run_uses_its_tokenizer_and_scores_retrieval(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--model", str(checkpoint), "--contexts", "20,80", "--methods", "vanilla,dms-triton",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 1  # the 20-token cells below ended in an error
    (summary,) = [line for line in capsys.readouterr().err.splitlines() if "ended in an error" in line]
    assert summary.startswith("dms-perf bench: error: 2 of 4 cells ended in an error: workload: ValueError: "
                              "context_length 20 is too short")
    assert "(vanilla @ 20, dms-triton @ 20)" in summary
    meta, rows = load_results(out / "results.json")
    assert meta["weights"] == f"real weights from {checkpoint}" and meta["calibration"] == {}
    assert meta["tokenizer"] == str(checkpoint)
    by = {(r["method"], r["context"]): r for r in rows}
    # 20 tokens cannot hold template, question and needle: a row says so, the rest runs.
    assert by["vanilla", 20]["status"].startswith("error: workload: ValueError: context_length 20 is too short")
    for method in ("vanilla", "dms-triton"):
        assert by[method, 80]["status"] == "ok"
        assert by[method, 80]["retrieval"] in ("pass", "fail")  # scored: these weights count as real


def _ctrl_c_at_call(monkeypatch, name: str, n: int) -> None:
    """Ctrl-C (KeyboardInterrupt) at the ``n``-th call of ``dms_perf.bench.generation.<name>``."""
    import dms_perf.bench.generation

    real = getattr(dms_perf.bench.generation, name)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dms_perf.bench.generation, name, interrupted)


def test_interrupted_run_keeps_what_was_measured(tmp_path, monkeypatch, capsys):
    _ctrl_c_at_call(monkeypatch, "measure_generation", 2)
    code = main(["bench", "--model", "tiny", "--contexts", "32,48", "--methods", "vanilla", "--new-tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 130
    assert f"interrupted: 1 row kept in {tmp_path / 'results.json'}, results.md and plots written" in (
        capsys.readouterr().err)
    _, rows = load_results(tmp_path / "results.json")
    assert [(r["context"], r["status"]) for r in rows] == [(32, "ok")]
    assert "| 32 | vanilla |" in (tmp_path / "results.md").read_text()


def test_ctrl_c_inside_a_cell_keeps_its_finished_repeats_as_a_partial_row(tmp_path, monkeypatch, capsys):
    _ctrl_c_at_call(monkeypatch, "generate_batch", 2)  # during the second of three timed runs of the first cell
    code = main(["bench", "--model", "tiny", "--contexts", "32,48", "--methods", "vanilla", "--new-tokens", "3",
                 "--repeats", "3", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 130
    err = capsys.readouterr().err
    assert (f"interrupted: 1 row kept in {tmp_path / 'results.json'}, results.md and plots written; vanilla @ 32 "
            "partial: interrupted after 1 of 3 repeats") in err
    _, rows = load_results(tmp_path / "results.json")
    (row,) = rows
    assert (row["context"], row["status"], row["partial"]) == (32, "interrupted after 1 of 3 repeats", True)
    assert row["repeats"] == 1 and row["total_s"] == row["runs_total_s"][0] > 0  # the finished repeat's figures
    assert row["generated_tokens"] == 3 and row["kv_bytes"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| 32 | vanilla (interrupted after 1 of 3 repeats) | " in md
    assert '"interrupted after i of n repeats" was stopped (Ctrl-C)' in md


def test_report_merges_bench_runs(tmp_path):
    common = ["--model", "tiny", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
    assert main(["bench", "--contexts", "32", "--methods", "vanilla", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["bench", "--contexts", "32,48", "--methods", "knorm:0.5", "--out", str(tmp_path / "b"), *common]) == 0
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "all")]) == 0
    meta, rows = load_results(tmp_path / "all")
    assert sorted((r["method"], r["context"]) for r in rows) == [("knorm:0.5", 32), ("knorm:0.5", 48),
                                                                 ("vanilla", 32)]
    assert meta["methods"] == ["vanilla", "knorm:0.5"]
    assert "| 48 | knorm:0.5 |" in (tmp_path / "all" / "results.md").read_text()


def test_report_of_a_missing_run_exits_with_a_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "all")]) == 2
    assert capsys.readouterr().err == (f"dms-perf report: error: cannot merge {tmp_path / 'nothing'}: no such file "
                                       "or directory\n")


_OK_ROW = {"context": 32, "method": "vanilla", "status": "ok", "total_s": 1.0, "prefill_s": 0.5,
           "prefill_tok_s": 64.0, "generated_tokens": 2, "kv_bytes": 1024, "retrieval": "n/a (random weights)"}
BAD_RESULTS = {  # name -> (what the file holds, what the error line says after the file's name)
    "list": (b"[1, 2, 3]", 'holds a JSON list, not a results object ({"meta": {...}, "rows": [...]}) nor a '
                           "pytest-benchmark JSON"),
    "random-bytes": (bytes(range(256)) * 4, "not a results file: not text (UTF-8 JSON expected)"),
    "truncated": (json.dumps({"meta": {}, "rows": [_OK_ROW]}).encode()[:-25], "truncated JSON: "),
    "not-json": (b"meta: rows", "not valid JSON: Expecting value at line 1 column 1"),
    "no-rows": (json.dumps({"meta": {}}).encode(), "not a results file: no 'rows' (a JSON list expected)"),
    "rows-object": (json.dumps({"meta": {}, "rows": {}}).encode(),
                    "not a results file: a JSON object as its 'rows' (a JSON list expected)"),
    "row-without-method": (json.dumps({"meta": {}, "rows": [{"context": 32, "status": "OOM"}]}).encode(),
                           "row 0: no 'method'"),
    "ok-row-without-figures": (json.dumps({"meta": {}, "rows": [_OK_ROW, {**_OK_ROW, "total_s": None}]}).encode(),
                               "row 1: 'total_s' is None, not a number"),
    "ok-row-missing-kv": (json.dumps({"meta": {}, "rows": [{k: v for k, v in _OK_ROW.items() if k != "kv_bytes"}]})
                          .encode(), "row 0: no 'kv_bytes' (a row with status 'ok' holds its figures)"),
    "row-a-number": (json.dumps({"meta": {}, "rows": [7]}).encode(), "row 0: a JSON number, not an object"),
    "device-a-string": (json.dumps({"meta": {"device": "H100"}, "rows": []}).encode(),
                        "its meta 'device' is a JSON string, not a JSON object"),
    "benchmark-json-without-params": (json.dumps({"benchmarks": [{"extra_info": {"total_s": 1, "method": "x"}}]})
                                      .encode(), "not a pytest-benchmark JSON of end-to-end cases (KeyError: "),
}


@pytest.mark.parametrize("kind", sorted(BAD_RESULTS))
def test_report_of_a_bad_results_file_is_one_line_naming_it(tmp_path, capsys, kind):
    content, message = BAD_RESULTS[kind]
    bad = tmp_path / "results.json"
    bad.write_bytes(content)
    assert main(["report", str(bad), "--out", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dms-perf report: error: cannot merge {bad}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "all").exists()


def test_report_of_a_directory_without_results_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "all")]) == 2
    assert capsys.readouterr().err == (f"dms-perf report: error: cannot merge {tmp_path}: a directory without "
                                       "results.json (expected a dms-perf bench output directory, its results.json "
                                       "or a pytest-benchmark JSON)\n")


@pytest.mark.parametrize("kind", ["list", "random-bytes", "truncated", "ok-row-without-figures"])
def test_report_of_a_bad_results_file_has_no_traceback(tmp_path, kind):
    content, message = BAD_RESULTS[kind]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"meta": {"model": "tiny"}, "rows": [_OK_ROW]}))
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    result = cli("report", str(good), str(bad), "--out", str(tmp_path / "all"))  # the second input names itself
    assert result.returncode == 2
    assert error_line(result).startswith(f"dms-perf report: error: cannot merge {bad}: {message}")


# A loop whose bound derives from a program id, as the DMS kernels' prefix counts have: Triton 3.6's
# interpreter turns such a 1-element bound into an int with int(array), which NumPy >= 2.4 refuses
# (newer Triton squeezes it first). Only a GPU host can pair a CPU interpreter run with such a Triton.
def test_report_renders_an_end_to_end_benchmark_json(tmp_path):
    """``dms-perf report`` on a pytest-benchmark JSON of benchmarks/test_end_to_end.py (a CPU smoke run
    here, with the timing kept) gives results.md and the plots of its cells; other cases are ignored."""
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_end_to_end.py", "-q", "-p", "no:cacheprovider",
           "-p", "no:xdist", "--context-lengths=96", "--methods=vanilla,dms-hub,dms-triton", f"--benchmark-json={out}"]
    # Without this worker's PYTEST_* variables (under xdist they would make the inner run a worker too),
    # and on the CPU on any host: the tiny model's smoke sizes, not the GPU's 8B model.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    skip_if_cpu_path_cannot_run_here()
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    meta, rows = load_results(out)
    assert {(r["context"], r["method"]) for r in rows} == {(96, "vanilla"), (96, "dms-hub"), (96, "dms-triton")}
    assert all(r["status"] == "ok" and r["total_s"] > 0 and r["new_tokens"] == 4 for r in rows)
    assert meta["model"] == "tiny" and "calibrated to 8x" in meta["weights"] and meta["device"]["gpu"]
    assert main(["report", str(out), "--out", str(tmp_path / "md")]) == 0
    md = (tmp_path / "md" / "results.md").read_text()
    assert "| 96 | dms-triton |" in md and "## DMS prefill speedup" in md and "hub" in md
    assert (tmp_path / "md" / "time_vs_context.png").stat().st_size > 0
    bad = tmp_path / "kernels.json"
    bad.write_text(json.dumps({"benchmarks": [{"params": {}, "extra_info": {"kernel": "x"}}]}))
    assert main(["report", str(bad), "--out", str(tmp_path / "none")]) == 2


# --- the real entry point in a child process: exit status, one-line errors, never a traceback -------------


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dms-perf ARGS`` through ``python -m dms_perf.bench.cli``; asserts no traceback was printed."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "dms_perf.bench.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=full_env, cwd=REPO)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The stderr of a run refused before any cell: one line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


TINY_RUN = ("--contexts", "32", "--methods", "vanilla", "--new-tokens", "2", "--repeats", "1", "--warmup", "0")


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """config.json and weights, no tokenizer files (transformers then builds a tokenizer that encodes nothing)."""
    from dms_perf.model.qwen3_dms import build_model, tiny_config

    path = tmp_path_factory.mktemp("bare-checkpoint")
    build_model(tiny_config(), backend=None, dtype=torch.float32, device="cpu").save_pretrained(path)
    return path


def test_checkpoint_without_tokenizer_is_one_clear_error(tmp_path, bare_checkpoint):
    try:
        result = cli("bench", "--model", str(bare_checkpoint), *TINY_RUN, "--out", str(tmp_path / "out"),
                     timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("dms-perf bench hangs on a checkpoint without tokenizer files")
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"dms-perf bench: error: tokenizer '{bare_checkpoint}'")
    assert "encodes the workload's text to no tokens" in line and "--tokenizer" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "file"])
def test_model_path_without_a_checkpoint_is_one_error_before_any_cell(tmp_path, kind):
    model = tmp_path / "model"
    if kind == "empty-dir":
        model.mkdir()
    elif kind == "file":
        model.write_text("not a checkpoint")
    result = cli("bench", "--model", str(model), *TINY_RUN, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    line = error_line(result)
    expected = {"missing": f"--model {model}: no such directory",
                "empty-dir": f"--model {model} holds no checkpoint: there is no config.json",
                "file": f"--model {model} is a file, not a checkpoint directory"}[kind]
    assert line.startswith(f"dms-perf bench: error: {expected}")
    assert "repo id" not in line.lower()
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_hub_id_without_the_hub_fails_in_seconds(tmp_path):
    """The help's example id on a machine that cannot reach the hub (HF_HUB_OFFLINE) and has no cached copy."""
    start = time.monotonic()
    result = cli("bench", "--model", "nvidia/Qwen3-8B-DMS-8x", *TINY_RUN, "--out", str(tmp_path / "out"),
                 env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}, timeout=120)
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("dms-perf bench: error: --model nvidia/Qwen3-8B-DMS-8x: no such directory, and as a "
                           "hub id it is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x", "8,0", "1,,2", "", "2k"])
def test_bad_batch_is_one_line_and_exit_2(tmp_path, capsys, value):
    assert main(["bench", "--model", "tiny", *TINY_RUN, "--batch", value, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dms-perf bench: error: --batch: not a batch size: "), err
    assert "expected positive whole numbers, e.g. 1,8,32" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_batch_from_the_command_line_has_no_traceback(tmp_path):
    result = cli("bench", "--model", "tiny", *TINY_RUN, "--batch", "1,-8", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert error_line(result) == ("dms-perf bench: error: --batch: not a batch size: '-8' (expected positive whole "
                                  "numbers, e.g. 1,8,32)")


def test_a_cell_ending_in_an_error_makes_the_exit_status_1(tmp_path, checkpoint):
    """Weights that cannot be loaded: every cell's row says so, results are written, the run exits 1 with one
    summary line."""
    from dms_perf.model.qwen3_dms import tiny_config

    broken = tmp_path / "broken"
    tiny_config().save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    result = cli("bench", "--model", str(broken), "--tokenizer", str(checkpoint), "--contexts", "80,96",
                 "--methods", "vanilla,dms-triton", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
                 "--out", str(out))
    assert result.returncode == 1
    _, rows = load_results(out)
    assert len(rows) == 4 and all(r["status"].startswith("error: model build failed") for r in rows)
    (summary,) = [line for line in result.stderr.splitlines() if "ended in an error" in line]
    assert summary.startswith("dms-perf bench: error: 4 of 4 cells ended in an error: model build failed: ")
    assert "vanilla @ 80, vanilla @ 96" in summary and "dms-triton @ 80, dms-triton @ 96" in summary
    assert (out / "results.md").exists()


@pytest.mark.parametrize("status", ["OOM", "skipped: needs a longer prompt"])
def test_oom_and_skipped_cells_are_results_not_errors(tmp_path, monkeypatch, capsys, status):
    import dms_perf.bench.generation

    def measure(model, workload, method, **kwargs):
        return {"context": workload.context_length, "method": method.name, "new_tokens": 2, "status": status}

    monkeypatch.setattr(dms_perf.bench.generation, "measure_generation", measure)
    assert main(["bench", "--model", "tiny", *TINY_RUN, "--out", str(tmp_path)]) == 0
    assert "ended in an error" not in capsys.readouterr().err


def test_error_rows_give_status_1_with_a_one_line_summary(tmp_path, monkeypatch, capsys):
    import dms_perf.bench.generation

    def measure(model, workload, method, **kwargs):
        status = "error: RuntimeError: boom" if workload.context_length == 48 else "OOM"
        return {"context": workload.context_length, "method": method.name, "batch": workload.batch, "new_tokens": 2,
                "status": status}

    monkeypatch.setattr(dms_perf.bench.generation, "measure_generation", measure)
    code = main(["bench", "--model", "tiny", "--contexts", "32,48", "--methods", "vanilla,knorm", "--new-tokens",
                 "2", "--out", str(tmp_path)])
    assert code == 1
    (summary,) = [line for line in capsys.readouterr().err.splitlines() if "ended in an error" in line]
    assert summary == ("dms-perf bench: error: 2 of 4 cells ended in an error: RuntimeError: boom "
                       "(vanilla @ 48, knorm:0.5 @ 48)")
    # a cell of another batch is named with its batch
    code = main(["bench", "--model", "tiny", "--contexts", "48", "--methods", "vanilla", "--batch", "1,4",
                 "--new-tokens", "2", "--out", str(tmp_path)])
    (summary,) = [line for line in capsys.readouterr().err.splitlines() if "ended in an error" in line]
    assert code == 1 and summary.endswith("2 of 2 cells ended in an error: RuntimeError: boom "
                                          "(vanilla @ 48, vanilla @ 48 batch 4)")


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_out_that_cannot_be_a_directory_is_one_error(tmp_path, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if kind == "file" else blocker / "results"
    result = cli("bench", "--model", "tiny", *TINY_RUN, "--out", str(out))
    assert result.returncode == 2
    line = error_line(result)
    expected = "is a file, not a directory" if kind == "file" else "cannot create the output directory: Not a directory"
    assert line == f"dms-perf bench: error: --out {out}: {expected}"
    assert blocker.read_text() == "a file"


def test_report_out_that_is_a_file_is_one_error(tmp_path):
    assert main(["bench", "--model", "tiny", *TINY_RUN, "--out", str(tmp_path / "a")]) == 0
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    result = cli("report", str(tmp_path / "a"), "--out", str(blocker))
    assert result.returncode == 2
    assert error_line(result) == f"dms-perf report: error: --out {blocker}: is a file, not a directory"


def test_ctrl_c_keeps_the_rows_and_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "dms_perf.bench.cli", "bench", "--model", "tiny", "--contexts", "32,48,64,80,96,112",
           "--methods", "vanilla,dms-hub", "--new-tokens", "16", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    # SIGINT as a terminal's Ctrl-C delivers it (the default handler: a test runner may ignore the signal).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "results.json").exists() and json.loads((out / "results.json").read_text())["rows"]:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    _, rows = load_results(out)
    assert 1 <= len(rows) < 12 and all(r["status"] == "ok" for r in rows)
    noun = "row" if len(rows) == 1 else "rows"
    assert f"interrupted: {len(rows)} {noun} kept in {out / 'results.json'}, results.md and plots written" in stderr
    assert (out / "results.md").exists() and (out / "time_vs_context.png").exists()


LIGER_IMPORT_PATH = """
import sys, warnings
warnings.simplefilter("always")  # every warning printed, none hidden by a filter
from dms_perf.bench.cli import build_parser
build_parser()
from dms_perf.model import fused
from liger_kernel.transformers import apply_liger_kernel_to_qwen3
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from liger_kernel.ops import LigerFusedAddRMSNormFunction
from liger_kernel.backends.registry import get_discovery_failures, list_registered
if sys.argv[1] == "quiet":
    fused.find_liger_backends()  # as apply_fused_kernels does before the model's first call
for op in fused.LIGER_OPS:  # what the model's first calls do
    list_registered(op)
print(len(get_discovery_failures()))
"""


@pytest.mark.parametrize("how", ["quiet", "bare"])
def test_liger_backend_discovery_prints_nothing(how):
    """Liger finds its backends on an op's first call and logs a warning for each one not installed here
    (CuTe DSL, cuTile, Ascend): the CLI's path (apply_fused_kernels) finds them first, quietly. Liger's
    kernels need a GPU, so the path is driven up to the model's first calls. "bare": without that step the
    warnings appear, so the test sees them when they are there."""
    pytest.importorskip("liger_kernel.backends.registry")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", LIGER_IMPORT_PATH, how], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = int(result.stdout.split()[-1])
    if how == "quiet":
        assert result.stderr == ""
    elif failures:  # backends missing here: each was a warning
        assert "could not be imported" in result.stderr
    else:
        pytest.skip("every Liger backend imports here: nothing to warn about")


def test_methods_lists_the_registry_as_a_table():
    result = cli("methods")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "parameter", "(default)", "backend", "summary"]
    flat = " ".join(result.stdout.split())
    for f in FAMILIES.values():
        parameter = f"R (default {f.default_ratio:g})" if f.takes_parameter else "-"
        backend = f.backend or ("vanilla+kvpress" if f.needs_kvpress else "vanilla")
        assert f"{f.name} {parameter} {backend} {f.summary}" in flat


def test_version_prints_the_package_version():
    import dms_perf

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dms-perf {dms_perf.__version__}"


def test_bench_help_states_the_defaults_as_options():
    from dms_perf.bench.cli import CPU_DEFAULTS, GPU_DEFAULTS

    out = cli("bench", "--help").stdout
    description = out.split("\n\n", 1)[1].split("options:")[0]
    assert "{" not in description and "}" not in description  # no Python dict
    cpu = [line.strip() for line in out.splitlines() if line.strip().startswith("CPU default:")]
    gpu = [line.strip() for line in out.splitlines() if line.strip().startswith("GPU default:")]
    assert cpu == [f"CPU default: --contexts {CPU_DEFAULTS['contexts']} --model tiny --new-tokens "
                   f"{CPU_DEFAULTS['new_tokens']} --repeats {CPU_DEFAULTS['repeats']} --dtype float32"]
    assert gpu == ["GPU default: --contexts 4k,8k,16k,32k --model qwen3-8b --new-tokens 128 --repeats 3 "
                   "--dtype bfloat16"]
    assert f"--methods {CPU_DEFAULTS['methods']}" in out and f"--methods {GPU_DEFAULTS['methods']}" in out


@pytest.mark.parametrize("command", ["bench", "report"])
def test_help_reads_as_prose(command):
    """No Python set, list or dict and no None in the help; defaults as option values; names never split."""
    out = cli(command, "--help").stdout
    body = out.split("\n\n", 1)[1].replace("[0, 1)", "")  # below the usage lines (argparse's [brackets]), no interval
    body = body.replace("--accuracy [N]", "")  # argparse's own brackets: N may be left out
    for python in ("{", "}", "[", "]", "None", "'float32'"):
        assert python not in body, python
    assert "(default: results)" in out and "exit status" in " ".join(out.lower().split())
    if command == "bench":
        flat = " ".join(out.split())
        assert "--dtype DTYPE model weights and activations: bfloat16, float16 or float32 (default: float32)" in flat
        assert "(default: 8)" in flat and "(default: 8.0)" not in flat
        assert "vanilla,dms-hub,dms-hub-triton,dms-triton,snapkv:0.5" in out  # not cut at a hyphen
    else:
        assert "pytest-benchmark JSON" in out and "seed agree" in out


@pytest.mark.parametrize(("args", "message"), [
    (["bench", "--contexts", "x"], "dms-perf bench: error: not a token count: 'x'"),
    (["bench", "--new-tokens", "two"], "dms-perf bench: error: argument --new-tokens: invalid int value: 'two'"),
    (["report"], "dms-perf report: error: the following arguments are required: inputs"),
])
def test_argument_errors_show_the_subcommands_usage(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: dms-perf {args[0]} ")
    assert result.stderr.strip().splitlines()[-1].startswith(message)


# --- long generations -------------------------------------------------------------------------------------


def test_rows_trace_the_generation_and_figures_draw_it(tmp_path, capsys):
    out = tmp_path / "long"
    assert main(["bench", "--model", "tiny", "--contexts", "32", "--methods", "vanilla,dms-hub", "--new-tokens", "5",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    meta, rows = load_results(out)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["peak_kv_bytes"] >= r["kv_bytes"] >= r["kept_kv_bytes"] > 0
        assert r["decode_tok_s_first_quarter"] > 0 and r["decode_tok_s_last_quarter"] > 0
        tokens = r["trace"]["tokens"]
        assert tokens == sorted(set(tokens)) and tokens[0] == 1 and tokens[-1] == 5 and len(tokens) <= 5
    for name in ("kv_vs_generated.png", "tok_s_vs_generated.png"):
        assert (out / name).stat().st_size > 0
    assert "| Decode tok/s first → last ¼ | KV peak (KiB) | KV held (KiB) |" in capsys.readouterr().out
    # results.json of a run before traces: `dms-perf report` renders it without the trace figures
    old = tmp_path / "old"
    old.mkdir()
    data = json.loads((out / "results.json").read_text())
    data["rows"] = [{k: v for k, v in r.items() if k not in ("trace", "peak_kv_bytes", "decode_tok_s_first_quarter",
                                                             "decode_tok_s_last_quarter")} for r in data["rows"]]
    (old / "results.json").write_text(json.dumps(data))
    assert main(["report", str(old), "--out", str(tmp_path / "merged")]) == 0
    written = {p.name for p in (tmp_path / "merged").iterdir()}
    assert written == {"results.json", "results.md", "time_vs_context.png", "vram_vs_context.png"}
    assert "KV peak" not in (tmp_path / "merged" / "results.md").read_text()


@pytest.mark.parametrize(("value", "message"), [
    ("1k", "--contexts 3584: a prompt and its --new-tokens 1024 must fit the model's positions"),
    ("1q", "dms-perf bench: error: argument --new-tokens: invalid int value: '1q' (a token count such as 256 or 16k)"),
])
def test_new_tokens_take_token_counts(tmp_path, capsys, value, message):
    """``1k`` is 1024 tokens: checked against the model's positions before any cell; ``1q`` is no count."""
    with pytest.raises(SystemExit) if value == "1q" else contextlib.nullcontext() as info:
        code = main(["bench", "--model", "tiny", "--contexts", "3.5k", "--methods", "vanilla", "--new-tokens", value,
                     "--out", str(tmp_path / "out")])
    assert (info.value.code if value == "1q" else code) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
