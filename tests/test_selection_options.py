"""The root conftest's selection options, each with one vocabulary: ``--impls`` keeps cases of an ``impl``
parameter by implementation name, ``--methods`` cases of a ``method`` parameter by registry method name;
an unknown name stops the run with the valid ones listed. Real pytest sessions (``--collect-only``) on a
small project that uses the repository's conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = """
import pytest

@pytest.mark.parametrize("impl", ["loop", "torch", "triton", "hub", "math"])
def test_kernel(impl):
    pass

@pytest.mark.parametrize("method", ["vanilla", "dms-hub", "dms-triton", "snapkv:0.5"])
def test_model(method):
    pass

def test_plain():
    pass
"""


@pytest.fixture
def project(pytester):
    pytester._monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest((REPO / "conftest.py").read_text())
    pytester.makepyfile(test_cases=CASES)
    return pytester


def collected(project, *args: str) -> list[str]:
    result = project.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    return sorted(line.split("::", 1)[1] for line in result.stdout.lines if "::" in line)


def test_each_option_keeps_its_own_parameter_only(project):
    assert collected(project, "--impls", "triton,hub", "--methods", "dms-triton,vanilla") == [
        "test_kernel[hub]", "test_kernel[triton]", "test_model[dms-triton]", "test_model[vanilla]", "test_plain",
    ]
    # One option leaves the other parameter's cases alone.
    assert collected(project, "--impls", "loop") == [
        "test_kernel[loop]", "test_model[dms-hub]", "test_model[dms-triton]", "test_model[snapkv:0.5]",
        "test_model[vanilla]", "test_plain",
    ]


def test_methods_are_registry_names(project):
    """``snapkv`` is the registry's ``snapkv:0.5``, as ``dms-perf bench --methods snapkv`` takes it."""
    assert collected(project, "--methods", "snapkv") == [
        "test_kernel[hub]", "test_kernel[loop]", "test_kernel[math]", "test_kernel[torch]", "test_kernel[triton]",
        "test_model[snapkv:0.5]", "test_plain",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--impls", "triton,fast"), "unknown implementation(s) fast; valid here: hub, loop, math, torch, triton"),
        (("--impls", "dms-triton"), "--impls: unknown implementation(s) dms-triton; valid here:"),
        (("--methods", "triton,hub"), "--methods: unknown method 'triton'; valid methods:"),
    ],
)
def test_an_unknown_name_is_a_usage_error(project, args, message):
    result = project.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str() + result.stdout.str()
