"""The GPU CI runner: GPU tests, then benchmarks gated on this card's baseline; shards; base vs head.

The GPU workflow and a person on any GPU host run the same entry point::

    python -m dms_perf.ci run                    # GPU tests, then benchmarks gated on this card's baseline
    python -m dms_perf.ci run --save-baseline    # refresh this card's committed baseline
    python -m dms_perf.ci base-vs-head --base origin/main   # both commits on this runner, gate on ratio
    python -m dms_perf.ci merge out.json shard1.json shard2.json   # join ``--shard i/n`` runs
    python -m dms_perf.ci gate baseline.json head.json --threshold 10

Baselines are pytest-benchmark's own storage, one folder per GPU model:
``benchmarks/baselines/<gpu-slug>/<machine-id>/NNNN_baseline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dms_perf.ci.baselines import (
    REPO,
    GateError,
    gate,
    gpu_slug_of,
    load,
    merge,
    next_baseline_path,
    publish,
    run_summary,
)


def _pytest_env(cwd: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")])))
    env.pop("PYTEST_XDIST_WORKER", None)  # a child pytest that sees it disables pytest-benchmark
    env.update(extra)
    return env


def _pytest(args: list[str], cwd: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", *args]
    print("+", " ".join(cmd), f"(in {cwd})", flush=True)
    return subprocess.call(cmd, cwd=cwd, env=_pytest_env(cwd))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def _shard_devices(count: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each of ``count`` shards: one visible GPU each, in order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        ids = [str(i) for i in range(_gpu_count())]
    if ids and len(ids) < count:
        raise GateError(f"--shards {count} needs {count} GPUs, {len(ids)} visible ({','.join(ids)})")
    return [ids[i] if ids else None for i in range(count)]


def _run_shards(args: list[str], count: int, out: Path, cwd: Path) -> tuple[int, list[Path]]:
    """Run ``pytest args --shard i/count`` in parallel, one GPU each; returns (worst exit code, JSON paths)."""
    procs, paths = [], []
    for index, device in enumerate(_shard_devices(count), start=1):
        path = out / f"shard{index}.json"
        path.unlink(missing_ok=True)
        env = _pytest_env(cwd) if device is None else _pytest_env(cwd, CUDA_VISIBLE_DEVICES=device)
        cmd = [sys.executable, "-m", "pytest", *args, f"--shard={index}/{count}", f"--benchmark-json={path}"]
        print("+", " ".join(cmd), f"(GPU {device if device is not None else '-'}, in {cwd})", flush=True)
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env))
        paths.append(path)
    codes = [p.wait() for p in procs]
    for index, code in enumerate(codes, start=1):
        print(f"shard {index}/{count}: exit {code}")
    return max(codes, key=abs), [p for p in paths if p.exists() and p.stat().st_size]


# Long-context tests hold tens of GB each (fp64 references at 32K): 14 workers sharing one 80 GB card
# ran out of memory (benchmarks/NOTES.md), so those run one worker per GPU.
SHORT_CONTEXTS, LONG_CONTEXTS = (4096, 8192), (16384, 32768)


def run_tests(workers: int, pytest_args: list[str], repo: Path) -> int:
    """The GPU tests in two passes: everything at the short contexts with ``workers`` xdist workers, then
    only the long-context cases (``-k ctxN``) with one worker per GPU. ``--context-lengths`` in
    ``pytest_args`` means one pass with exactly those."""
    if any(a.startswith("--context-lengths") for a in pytest_args):
        return _pytest(["tests", "-q", "-n", str(workers), *pytest_args], repo)
    short = ",".join(map(str, SHORT_CONTEXTS))
    rc = _pytest(["tests", "-q", "-n", str(workers), f"--context-lengths={short}", *pytest_args], repo)
    if rc != 0:
        return rc
    long = ",".join(map(str, LONG_CONTEXTS))
    selected = " or ".join(f"ctx{n}" for n in LONG_CONTEXTS)
    args = ["tests", "-q", "-n", str(max(1, _gpu_count())), f"--context-lengths={long}", "-k", selected]
    return _pytest([*args, *pytest_args], repo)


def cmd_run(ns) -> int:
    """GPU tests, then the benchmarks compared with (or saved as) this GPU model's baseline."""
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(ns.repo).resolve()
    if ns.shards < 1:
        raise GateError(f"--shards must be >= 1, got {ns.shards}")
    if not ns.skip_tests:
        rc = run_tests(ns.workers, ns.pytest_args, repo)
        if rc != 0:
            print(f"GPU tests failed (exit {rc}); benchmarks not run")
            return rc
    if ns.skip_benchmarks:
        return 0
    bench_args = ["benchmarks", "-q"]
    if not ns.save_baseline:
        # Host-bound cases vary with the host more than with the code (benchmarks/NOTES.md: 16 false
        # alarms between two H100 hosts): the absolute gate leaves them to base-vs-head.
        if not ns.include_host_bound:
            bench_args += ["-m", "not host_bound"]
        bench_args += ["--benchmark-compare", f"--benchmark-compare-fail=median:{ns.threshold:g}%"]
    bench_args += ns.pytest_args
    result = out / "benchmarks.json"
    if ns.shards == 1:
        save = ["--benchmark-save=baseline"] if ns.save_baseline else []
        rc = _pytest([*bench_args, *save, f"--benchmark-json={result}"], repo)
    else:
        # Each shard compares its own cases with the baseline; a baseline is saved once, merged.
        rc, paths = _run_shards(bench_args, ns.shards, out, repo)
        if paths:
            result.write_text(json.dumps(merge([load(p) for p in paths]), indent=2))
        if ns.save_baseline and rc == 0:
            target = next_baseline_path(repo / "benchmarks" / "baselines" / gpu_slug_of(load(result)))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(result.read_text())
            print(f"saved the merged run of {ns.shards} shards as {target}")
    if result.exists() and result.stat().st_size:
        publish(run_summary(load(result)), out)
    return rc


def cmd_base_vs_head(ns) -> int:
    """Benchmark the base commit and the working tree on this runner, one after the other; gate on ratio."""
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(subprocess.check_output(["git", "-C", ns.repo, "rev-parse", "--show-toplevel"], text=True).strip())
    args = ["benchmarks", "-q", "-p", "no:cacheprovider", *ns.pytest_args]
    with tempfile.TemporaryDirectory(prefix="dms-perf-base-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.check_call(["git", "-C", str(repo), "worktree", "add", "--detach", str(base_tree), ns.base])
        try:
            rc_base = _pytest([*args, f"--benchmark-json={out / 'base.json'}"], base_tree)
        finally:
            subprocess.call(["git", "-C", str(repo), "worktree", "remove", "--force", str(base_tree)])
    rc_head = _pytest([*args, f"--benchmark-json={out / 'head.json'}"], repo)
    if rc_base or rc_head:
        print(f"benchmark runs failed (base exit {rc_base}, head exit {rc_head})")
        return rc_base or rc_head
    return gate(load(out / "base.json"), load(out / "head.json"), ns.threshold, out, f"head vs base {ns.base}",
                ns.host_bound_threshold)


def cmd_gate(ns) -> int:
    return gate(load(ns.base), load(ns.head), ns.threshold, ns.out and Path(ns.out), "head vs base",
                ns.host_bound_threshold)


def cmd_merge(ns) -> int:
    merged = merge([load(path) for path in ns.inputs])
    Path(ns.output).write_text(json.dumps(merged, indent=2))
    print(f"merged {len(merged['benchmarks'])} benchmarks from {len(ns.inputs)} runs into {ns.output}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m dms_perf.ci") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="GPU tests + benchmarks gated on this GPU model's committed baseline")
    p.add_argument("--save-baseline", action="store_true", help="store this run as the baseline instead")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--skip-benchmarks", action="store_true", help="GPU tests only")
    p.add_argument(
        "--workers", type=int, default=4,
        help="pytest-xdist workers for the tests at 4K/8K (they share the GPUs round-robin); the 16K/32K cases "
        "then run with one worker per GPU",
    )
    p.add_argument("--threshold", type=float, default=10.0, help="fail above this %% median slowdown (10)")
    p.add_argument(
        "--include-host-bound", action="store_true",
        help="also gate the cases marked host_bound against the absolute baseline (left out by default: "
        "they move with the host, see README)",
    )
    p.add_argument(
        "--shards", type=int, default=1,
        help="split the benchmarks over this many GPUs of this host, one pytest per GPU in parallel "
        "(--shard i/N), and merge their JSON; with --save-baseline the merged run is the baseline",
    )
    p.add_argument("--repo", default=str(REPO), help="the checkout to test (default: this one)")
    p.add_argument("--out", default="ci-results", help="folder for benchmarks.json and summary.md")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("base-vs-head", help="benchmark a base commit and the working tree here; gate on ratio")
    p.add_argument("--base", required=True, help="git revision of the base (e.g. origin/main)")
    p.add_argument("--repo", default=".", help="the git checkout holding the head (default: here)")
    p.add_argument("--threshold", type=float, default=10.0, help="fail above this %% median slowdown (10)")
    p.add_argument(
        "--host-bound-threshold", type=float, default=None,
        help="threshold (%%) for cases marked host_bound (default: --threshold)",
    )
    p.add_argument("--out", default="ci-results", help="folder for base.json, head.json, summary.md")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=cmd_base_vs_head)

    p = sub.add_parser("merge", help="join the JSON of --shard runs into one")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("gate", help="compare two benchmark JSON files; exit 1 on a regression")
    p.add_argument("base")
    p.add_argument("head")
    p.add_argument("--threshold", type=float, default=10.0)
    p.add_argument(
        "--host-bound-threshold", type=float, default=None,
        help="threshold (%%) for cases marked host_bound (default: --threshold)",
    )
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_gate)

    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
