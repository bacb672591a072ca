"""``dms-perf bench``: --help explains every option; a tiny CPU run writes every result file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dms_perf.cli import build_parser, main

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
    assert "snapkv:<ratio in [0, 1), default 0.5>" in out and "dms-triton" in out


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_entry_point_module_runs():
    result = subprocess.run([sys.executable, "-m", "dms_perf.cli", "bench", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--new-tokens" in result.stdout


def test_tiny_cpu_run_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    methods = "vanilla,knorm:0.5,dms-hub,dms-triton"
    code = main(["bench", "--contexts", "40,0.0625k", "--methods", methods, "--model", "tiny", "--new-tokens", "3",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)])
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
