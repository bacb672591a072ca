"""Per-GPU-model baselines (pytest-benchmark's own storage) and the regression gate.

Baselines live in ``benchmarks/baselines/<gpu-slug>/<machine-id>/NNNN_baseline.json``; a comparison
across GPU models is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINES = REPO / "benchmarks" / "baselines"


class GateError(ValueError):
    """A comparison that cannot be made (other GPU, no baseline, bad shard)."""




def gpu_of(machine_info: dict) -> str | None:
    return (machine_info.get("dms_perf_device") or {}).get("gpu")


def gpu_slug_of(run: dict) -> str:
    """The baseline folder name of a benchmark JSON's GPU model (``none`` without a GPU)."""
    return (run["machine_info"].get("dms_perf_device") or {}).get("gpu_slug") or "none"


def check_same_gpu(current: dict, baseline: dict, where: str = "") -> None:
    """Raise GateError naming both cards when a baseline was measured on another GPU model."""
    here, there = gpu_of(current), gpu_of(baseline)
    if here != there:
        raise GateError(
            f"refusing to compare benchmarks across GPU models: this run is on {here!r}, the baseline"
            f"{' in ' + where if where else ''} was measured on {there!r}. Compare against the baseline "
            f"folder of this GPU model (benchmarks/baselines/<gpu-slug>/) or create one."
        )


def storage_folder(storage_uri: str) -> Path:
    return Path(storage_uri.removeprefix("file://"))


def require_baseline(storage_uri: str, compare, *, on_gpu: bool | None = None) -> None:
    """``--benchmark-compare`` with no saved run is an error that says how to create one.

    ``on_gpu`` (default: whether this process sees a CUDA device): without a GPU the error says that
    baselines are kept only for GPU models and which CPU run to make instead.
    """
    folder = storage_folder(storage_uri)
    if compare is True and not any(folder.rglob("*.json")):
        if on_gpu is None:
            from dms_perf._runtime import HAS_CUDA

            on_gpu = HAS_CUDA
        if not on_gpu:
            raise GateError(
                f"no benchmark baseline in {folder}: baselines are kept only for GPU models "
                f"(benchmarks/baselines/<gpu-slug>/, each made on its card with `python -m dms_perf.ci run "
                f"--save-baseline`), and this machine has no CUDA GPU; CPU timings (Triton's interpreter) "
                f"are not compared. On a CPU run the benchmarks as a smoke test instead: "
                f"`pytest benchmarks --benchmark-disable`."
            )
        raise GateError(
            f"no benchmark baseline for this GPU model in {folder}. Create one on this card with "
            f"`python -m dms_perf.ci run --save-baseline` (or `pytest benchmarks --benchmark-save=baseline`) "
            f"and commit that folder."
        )


# --- benchmark JSON: load, merge, compare -----------------------------------------------------------


def load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"benchmark JSON not found: {path}") from None


def merge(runs: list[dict]) -> dict:
    """Join the JSON of ``--shard i/n`` runs (same GPU model) into one run."""
    if not runs:
        raise GateError("merge needs at least one benchmark JSON")
    merged = dict(runs[0], benchmarks=[])
    seen: set[str] = set()
    for run in runs:
        check_same_gpu(runs[0]["machine_info"], run["machine_info"], where="another shard")
        for bench in run["benchmarks"]:
            if bench["fullname"] in seen:
                raise GateError(f"benchmark {bench['fullname']!r} appears in more than one shard")
            seen.add(bench["fullname"])
            merged["benchmarks"].append(bench)
    return merged


@dataclass
class Row:
    name: str
    base_s: float | None
    head_s: float | None
    threshold_pct: float

    @property
    def ratio(self) -> float | None:
        if self.base_s is None or self.head_s is None:
            return None
        return self.head_s / self.base_s

    @property
    def regressed(self) -> bool:
        return self.ratio is not None and self.ratio > 1 + self.threshold_pct / 100


def compare(
    base: dict, head: dict, threshold_pct: float, stat: str = "median", host_bound_threshold_pct: float | None = None
) -> list[Row]:
    """Per benchmark, head/base of ``stat``; benchmarks on one side only are listed with None.

    ``host_bound_threshold_pct``: the threshold of cases marked ``host_bound`` (their ``extra_info``
    says so, see the root conftest.py); default: ``threshold_pct`` for every case.
    """
    check_same_gpu(head["machine_info"], base["machine_info"], where="the base run")
    base_by = {b["fullname"]: b["stats"][stat] for b in base["benchmarks"]}
    head_by = {b["fullname"]: b["stats"][stat] for b in head["benchmarks"]}
    host_bound = {
        b["fullname"]
        for run in (base, head)
        for b in run["benchmarks"]
        if (b.get("extra_info") or {}).get("host_bound")
    }
    loose = threshold_pct if host_bound_threshold_pct is None else host_bound_threshold_pct
    return [
        Row(name, base_by.get(name), head_by.get(name), loose if name in host_bound else threshold_pct)
        for name in sorted(base_by | head_by)
    ]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def markdown_table(rows: list[Row], title: str) -> str:
    lines = [f"### {title}", "", "| benchmark | base ms | head ms | head/base | verdict |", "|---|---:|---:|---:|---|"]
    for r in rows:
        verdict = "REGRESSED" if r.regressed else ("new" if r.base_s is None else "gone" if r.head_s is None else "ok")
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append(f"| `{r.name}` | {_ms(r.base_s)} | {_ms(r.head_s)} | {ratio} | {verdict} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_summary(run: dict) -> str:
    """Markdown table of one run: median and the derived figures in extra_info."""
    gpu = gpu_of(run["machine_info"]) or "cpu"
    lines = [f"### Benchmarks on {gpu} ({run.get('datetime', '')})", ""]
    lines += ["| benchmark | median ms | extra |", "|---|---:|---|"]
    for b in sorted(run["benchmarks"], key=lambda b: b["fullname"]):
        extra = ", ".join(f"{k}={_fmt(v)}" for k, v in b.get("extra_info", {}).items())
        lines.append(f"| `{b['fullname']}` | {b['stats']['median'] * 1e3:.4g} | {extra} |")
    return "\n".join(lines) + "\n"


def publish(markdown: str, out_dir: Path | None) -> None:
    print(markdown)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "summary.md", "a") as f:
            f.write(markdown + "\n")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(markdown + "\n")


def gate(
    base: dict, head: dict, threshold_pct: float, out_dir: Path | None, title: str,
    host_bound_threshold_pct: float | None = None,
) -> int:
    rows = compare(base, head, threshold_pct, host_bound_threshold_pct=host_bound_threshold_pct)
    limits = f"+{threshold_pct:g}% median"
    if host_bound_threshold_pct is not None:
        limits += f", +{host_bound_threshold_pct:g}% for host-bound cases"
    publish(markdown_table(rows, f"{title} (fail above {limits})"), out_dir)
    regressed = [r.name for r in rows if r.regressed]
    if regressed:
        print(f"REGRESSION: {len(regressed)} benchmark(s) slower than +{threshold_pct:g}%: {', '.join(regressed)}")
        return 1
    return 0


def next_baseline_path(storage: Path) -> Path:
    """Where pytest-benchmark's ``--benchmark-save=baseline`` would write next in ``storage``."""
    from pytest_benchmark.utils import get_machine_id

    folder = storage / get_machine_id()
    numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")]
    return folder / f"{max(numbers, default=0) + 1:04d}_baseline.json"
