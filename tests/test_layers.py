"""The package's layers import downward only: ops know nothing of the model, the model nothing of the
benchmark harness, and no production module imports a test reference (``naive.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dms_perf"
# What each layer must not import (module prefixes).
FORBIDDEN = {
    "ops": ("dms_perf.model", "dms_perf.bench", "dms_perf.ci"),
    "model": ("dms_perf.bench", "dms_perf.ci"),
    "bench": ("dms_perf.ci",),
}
# The command line is the one entry point above every layer (``dms-perf ci`` runs the CI runner).
ENTRY_POINTS = {"bench/cli.py"}
# The only modules that may use a readable reference: the prefill dispatcher offers it as impl="math",
# and the model's "math" backend is the reference model of the tests.
REFERENCE_USERS = {
    "ops/prefill/__init__.py": ("dms_perf.ops.prefill.naive",),
    "model/qwen3_dms.py": ("dms_perf.ops.prefill.naive",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layers_import_downward_only(layer):
    offending = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in modules_of(layer)
        if str(path.relative_to(PACKAGE)) not in ENTRY_POINTS
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    }
    assert not offending, sorted(offending)


def test_production_code_calls_no_reference():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if path.name == "naive.py" or rel == "testing.py":
            continue
        allowed = REFERENCE_USERS.get(rel, ())
        for name in imported_modules(path):
            is_reference = ".naive" in name or name.endswith("_reference")
            if is_reference and not name.startswith(allowed):
                offending.append(f"{rel} imports {name}")
    assert not offending, offending


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a planted ops module importing the model is caught."""
    planted = tmp_path / "planted.py"
    planted.write_text("from dms_perf.model.cache import DMSCache\nimport dms_perf.bench.cli\n")
    names = imported_modules(planted)
    assert "dms_perf.model.cache" in names and "dms_perf.bench.cli" in names
    assert any(n.startswith(FORBIDDEN["ops"]) for n in names)


def test_public_names_import_from_the_package_and_where_they_live():
    import importlib

    import dms_perf
    import dms_perf.ops as ops

    for name in dms_perf.__all__:
        assert getattr(dms_perf, name) is getattr(importlib.import_module(dms_perf._LAZY[name]), name)
    for name in ops.__all__:
        assert callable(getattr(ops, name))
    assert dms_perf.compact_by_bool is ops.compact_by_bool
    with pytest.raises(AttributeError, match="no attribute"):
        dms_perf.not_a_name  # noqa: B018
