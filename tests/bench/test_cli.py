"""``dms-perf bench``: --help explains every option; a tiny CPU run writes every result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_perf.bench.cli import build_parser, main
from dms_perf.bench.methods import FAMILIES
from dms_perf.bench.report import load_results
from tests.bench.word_tokenizer import word_tokenizer

BENCH_OPTIONS = ("--contexts", "--methods", "--model", "--tokenizer", "--new-tokens", "--repeats", "--warmup",
                 "--needle-depth", "--dtype", "--target-cr", "--seed", "--out")


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
    assert "| 40 | knorm:0.5 |" in capsys.readouterr().out  # the table is printed too


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "vanilla,nope"], "unknown method 'nope'; valid methods:"),
        (["--contexts", "4q"], "not a token count"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["--needle-depth", "2"], "--needle-depth must be in [0, 1]"),
        (["--target-cr", "0.5"], "--target-cr must be 0 (off) or >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--out", str(tmp_path), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny Qwen3(-DMS) checkpoint with its tokenizer, as a real one would be laid out on disk."""
    from dms_perf.model.qwen3_dms import build_model, tiny_config

    path = tmp_path_factory.mktemp("checkpoint")
    build_model(tiny_config(), backend=None, dtype=torch.float32, device="cpu").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_checkpoint_run_uses_its_tokenizer_and_scores_retrieval(tmp_path, checkpoint):
    out = tmp_path / "out"
    code = main(["bench", "--model", str(checkpoint), "--contexts", "20,80", "--methods", "vanilla,dms-triton",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    meta, rows = load_results(out / "results.json")
    assert meta["weights"] == f"real weights from {checkpoint}" and meta["calibration"] == {}
    assert meta["tokenizer"] == str(checkpoint)
    by = {(r["method"], r["context"]): r for r in rows}
    # 20 tokens cannot hold template, question and needle: a row says so, the rest runs.
    assert by["vanilla", 20]["status"].startswith("error: workload: ValueError: context_length 20 is too short")
    for method in ("vanilla", "dms-triton"):
        assert by[method, 80]["status"] == "ok"
        assert by[method, 80]["retrieval"] in ("pass", "fail")  # scored: these weights count as real


def test_interrupted_run_keeps_what_was_measured(tmp_path, monkeypatch):
    import dms_perf.bench.generation

    real = dms_perf.bench.generation.measure_generation
    calls = {"n": 0}

    def measure(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dms_perf.bench.generation, "measure_generation", measure)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--model", "tiny", "--contexts", "32,48", "--methods", "vanilla", "--new-tokens", "2",
              "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    _, rows = load_results(tmp_path / "results.json")
    assert [(r["context"], r["status"]) for r in rows] == [(32, "ok")]
    assert "| 32 | vanilla |" in (tmp_path / "results.md").read_text()


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
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "all")])
    assert info.value.code == 2 and "cannot merge" in capsys.readouterr().err


# A loop whose bound derives from a program id, as the DMS kernels' prefix counts have: Triton 3.6's
# interpreter turns such a 1-element bound into an int with int(array), which NumPy >= 2.4 refuses
# (newer Triton squeezes it first). Only a GPU host can pair a CPU interpreter run with such a Triton.
_INTERPRETER_PROBE = """
import triton, triton.language as tl, torch
@triton.jit
def k(out):
    total = 0
    for i in range(0, tl.program_id(0) + 1):
        total += 1
    tl.store(out + tl.program_id(0), total)
out = torch.zeros(2, dtype=torch.int32)
k[(2,)](out)
assert out.tolist() == [1, 2], out
"""


def _interpreter_problem() -> str | None:
    """Why this host's Triton interpreter cannot run the kernels on the CPU, or None if it can."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    probe = subprocess.run([sys.executable, "-c", _INTERPRETER_PROBE], capture_output=True, text=True, env=env,
                           timeout=300)
    if probe.returncode == 0:
        return None
    return probe.stderr.strip().splitlines()[-1]


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
    if torch.cuda.is_available() and (problem := _interpreter_problem()):
        pytest.skip(f"this host's Triton interpreter cannot run the kernels on the CPU ({problem}); "
                    "the CPU test run covers this test")
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
    with pytest.raises(SystemExit):
        main(["report", str(bad), "--out", str(tmp_path / "none")])
