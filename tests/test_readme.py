"""The README's Python example runs, the README stays short, and the docs stand on their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.interpreter import skip_if_cpu_path_cannot_run_here

REPO = Path(__file__).resolve().parents[1]
# The team-internal spec path, assembled so that a grep for it finds no test file either.
PRIVATE_SPEC = "/".join(("shared", "DMS.md"))
README = REPO / "README.md"
MAX_README_LINES = 160
# Sections of docs/DMS.md that docstrings cite by name.
DMS_SECTIONS = (
    "Decisions",
    "Who is visible",
    "Cache and decode",
    "Config fields",
    "The hub algorithm",
    "Random weights",
)


def first_python_block(markdown: str) -> str:
    """The body of the first fenced block opened with ```python."""
    match = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, flags=re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_first_python_block_is_found():
    text = "intro\n```bash\nls\n```\n```python\nx = 1\nprint(x)\n```\n```python\ny = 2\n```\n"
    assert first_python_block(text) == "x = 1\nprint(x)\n"


def _cpu_env() -> dict[str, str]:
    """This process's environment with every GPU hidden, as on a CPU-only machine."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    # Importing dms_perf must switch Triton to its interpreter by itself, as the README says.
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def test_readme_example_runs():
    code = first_python_block(README.read_text(encoding="utf-8"))
    skip_if_cpu_path_cannot_run_here()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README example failed:\n{result.stdout}\n{result.stderr}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, more than {MAX_README_LINES}"


def test_readme_and_docs_stand_on_their_own():
    files = [README, *sorted((REPO / "docs").glob("*.md"))]
    assert len(files) > 1, "docs/*.md is missing"
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert PRIVATE_SPEC not in text, f"{path.relative_to(REPO)} points at {PRIVATE_SPEC}, which users lack"
    readme = README.read_text(encoding="utf-8")
    assert not re.search(r"issue \d", readme, flags=re.I), "README.md refers to an issue number"


def test_dms_spec_keeps_the_cited_sections():
    headings = re.findall(r"^## (.+?)\s*$", (REPO / "docs" / "DMS.md").read_text(encoding="utf-8"), flags=re.M)
    missing = [name for name in DMS_SECTIONS if name not in headings]
    assert not missing, f"docs/DMS.md lacks the sections {missing}"


def test_readme_installs_the_cpu_build_of_torch_first():
    """On a CPU Linux machine a torch requirement from the public index is the CUDA build: the README's first
    install command takes torch from PyTorch's CPU index, before the package (which requires torch)."""
    readme = README.read_text(encoding="utf-8")
    block = re.search(r"^## Install\n.*?^```bash\n(.*?)^```", readme, flags=re.S | re.M)
    assert block, "README.md has no bash block under '## Install'"
    commands = [line.split("#")[0].split() for line in block.group(1).splitlines() if line.strip()]
    assert commands[0][:3] == ["pip", "install", "torch==2.13.0"], commands[0]
    assert "--index-url" in commands[0]
    assert commands[0][commands[0].index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert any(c[:3] == ["pip", "install", "-e"] for c in commands[1:]), "the package is installed after torch"


def test_no_issue_numbers_in_the_tree():
    """Code, tests, benchmarks and docs say what and why, not which ticket asked for it."""
    pattern = re.compile(r"[Ii]ssue" + r" [0-9]")
    files = [README, *(p for d in ("dms_perf", "tests", "benchmarks", "docs") for p in (REPO / d).rglob("*")
                       if p.suffix in (".py", ".md") and p.is_file())]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, f"issue numbers cited at {hits}"


def _selection_examples() -> list[tuple[str, list[str]]]:
    """Every ``pytest`` command in the README and docs/ that selects with --methods or --impls."""
    examples = []
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            command = line.split("#")[0].strip().strip("`")
            if command.startswith("pytest ") and ("--methods" in command or "--impls" in command):
                examples.append((f"{path.name}: {command}", command.split()[1:]))
    return examples


def test_docs_selection_examples_select_cases():
    """Each documented --methods / --impls example collects at least one case (an option that selected
    nothing once passed silently)."""
    examples = _selection_examples()
    assert examples, "no documented pytest command selects with --methods or --impls"
    for where, args in examples:
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 *args], cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=300)
        collected = re.search(r"(\d+) tests? collected", result.stdout)
        assert result.returncode == 0 and collected and int(collected.group(1)) > 0, (
            f"{where} selects nothing:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def test_readme_results_are_the_committed_json_rendered():
    """The README's figures are never typed by hand: its results block is exactly what
    ``benchmarks.readme_results`` renders from the committed baseline and results JSON."""
    from benchmarks.readme_results import readme_block, render

    assert readme_block(README.read_text(encoding="utf-8")) == render(), (
        "README.md's results differ from the committed JSON: run python -m benchmarks.readme_results --write"
    )
