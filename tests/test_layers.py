"""The package's layers import downward only (ops know nothing of the model, the model nothing of the
benchmark harness), and the readable references are the tests' alone: no module in dms_perf/ or
benchmarks/ imports a ``naive`` module (an op's ``naive.py``), nor a ``*_reference`` function.
Production baselines (``ops/prefill/math_impl.py``, ``ops/movers/baseline.py``,
``ops/cache_update/torch_ops.py``, the ``hub.py`` modules) are production code and live outside them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dms_perf"
# Everything that runs outside the tests: the package and the benchmark cases.
PRODUCTION = (PACKAGE, ROOT / "benchmarks")
# What each layer must not import (module prefixes).
FORBIDDEN = {
    "ops": ("dms_perf.model", "dms_perf.bench", "dms_perf.ci"),
    "model": ("dms_perf.bench", "dms_perf.ci"),
    "bench": ("dms_perf.ci",),
}
# The command line is the one entry point above every layer (``dms-perf ci`` runs the CI runner).
ENTRY_POINTS = {"bench/cli.py"}


def imported_names(source: str) -> set[str]:
    """Every module an import statement names, and every ``module.name`` a from-import binds (relative
    imports keep their dots: ``from . import naive`` gives ``.naive``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.module:
                names.add(module)
            prefix = f"{module}." if node.module else module
            names.update(prefix + alias.name for alias in node.names)
    return names


def imported_modules(path: Path) -> set[str]:
    return imported_names(path.read_text())


def reference_imports(source: str) -> list[str]:
    """The imports of ``source`` that reach a test reference: a module named ``naive`` at any depth, or a
    name ending in ``_reference``."""
    return sorted(
        name for name in imported_names(source)
        if "naive" in name.split(".") or name.rsplit(".", 1)[-1].endswith("_reference")
    )


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


def test_production_code_imports_no_reference():
    """No module in dms_perf/ or benchmarks/ imports a ``naive`` module or a ``*_reference`` function:
    no exceptions, the op's own ``naive.py`` included."""
    offending = [
        f"{path.relative_to(ROOT)} imports {name}"
        for top in PRODUCTION
        for path in sorted(top.rglob("*.py"))
        for name in reference_imports(path.read_text())
    ]
    assert not offending, offending


@pytest.mark.parametrize(
    "source",
    [
        "from dms_perf.ops.prefill.naive import prep_reference\n",
        "import dms_perf.ops.movers.naive\n",
        "from dms_perf.ops.movers import naive\n",
        "from dms_perf.ops.movers.naive import left_pad_2d_reference as expected\n",
        "from .naive import prep_reference\n",
        "from . import naive\n",
        "def f():\n    from dms_perf.ops.decode.naive import dms_decode_attention_reference\n",
        "from tests.somewhere import silu_mul_reference\n",
    ],
)
def test_the_checker_sees_a_reference_import(source):
    """The rule can fail: a planted import of a reference, in any spelling, is caught."""
    assert reference_imports(source)


def test_the_checker_passes_production_baselines():
    source = (
        "from dms_perf.ops.prefill.math_impl import math_attention\n"
        "from dms_perf.ops.movers.baseline import left_pad_2d_loop, left_pad_2d_torch\n"
        "from dms_perf.ops.cache_update.torch_ops import decode_update_torch\n"
        "import naivety\n"
    )
    assert reference_imports(source) == []


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
