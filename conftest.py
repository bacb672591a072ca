"""Shared pytest set-up for tests/ and benchmarks/.

* Without CUDA, Triton kernels run in the interpreter on CPU tensors (``import dms_perf`` sets
  ``TRITON_INTERPRET=1`` before triton is imported).
* ``--context-lengths`` selects the parametrization of any test that takes the ``context_length`` fixture.
* Two vocabularies, two options: ``--methods`` keeps the cases of a ``method`` parameter by method name
  (the registry's, as ``dms-perf bench --methods`` takes them: ``vanilla,dms-triton,snapkv:0.5``);
  ``--impls`` keeps the cases of an ``impl`` parameter by implementation name (a kernel's or the
  prefill's: ``triton,hub,torch,loop,math``). An unknown name is a usage error that lists the valid ones.
* ``@pytest.mark.gpu`` tests are skipped, with the reason printed, where there is no CUDA device.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import dms_perf  # noqa: F401  (must precede any triton import)
from dms_perf._runtime import HAS_CUDA, INTERPRET
from dms_perf.bench.device import device_info
from dms_perf.bench.options import parse_context_lengths, parse_names, test_dtypes
from dms_perf.ci.baselines import GateError, check_same_gpu, require_baseline
from dms_perf.ci.sharding import gpu_for_worker, parse_shard, shard_node_ids

pytest_plugins = ["pytester"]  # tests/test_ci.py runs real pytest sessions to prove the gate trips

BASELINES_DIR = Path(__file__).parent / "benchmarks" / "baselines"
DEFAULT_BENCHMARK_STORAGE = "file://./.benchmarks"
DEFAULT_BENCHMARK_TIMER = "time.perf_counter"


def pytest_addoption(parser):
    group = parser.getgroup("dms-perf")
    group.addoption(
        "--context-lengths",
        default=None,
        help="comma-separated context lengths, e.g. 4k,8k (default: 64,256,1024 on CPU; "
        "4096,8192,16384,32768 on a GPU)",
    )
    group.addoption(
        "--shard",
        default=None,
        help="run only shard I of N of the collected items, e.g. 2/4 (to spread benchmarks over GPUs or "
        "hosts; join the JSON with `python -m dms_perf.ci merge`)",
    )
    group.addoption(
        "--methods",
        default=None,
        help="comma-separated method names of the registry (`dms-perf methods`), e.g. vanilla,dms-triton: keep "
        "only those cases of tests parametrized over `method` (default: all)",
    )
    group.addoption(
        "--impls",
        default=None,
        help="comma-separated implementation names, e.g. triton,hub,torch,loop,math: keep only those cases of "
        "tests parametrized over `impl`; a name no collected test takes is an error (default: all)",
    )


HOST_BOUND_MARKER = (
    "host_bound: timing set by host-side Python and launches rather than device work (a benchmark module "
    "marks its cases with a module-level host_bound(params) rule); `dms-perf ci run` leaves them out of "
    "the gate against an absolute baseline, base-vs-head gates them"
)


def pytest_configure(config):
    config.addinivalue_line("markers", HOST_BOUND_MARKER)
    config.dms_context_lengths = parse_context_lengths(config.getoption("--context-lengths"))
    config.dms_methods = _registry_names(config.getoption("--methods"))
    config.dms_impls = parse_names(config.getoption("--impls"))
    # xdist's plain "load" spreads a group's tests over workers; "loadgroup" keeps each xdist_group on one
    # worker, one test after another (tests/markers.py: WHOLE_CARD). -n implies "load" unless --dist says.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
    try:
        config.dms_shard = parse_shard(config.getoption("--shard"))
        _configure_benchmark_storage_and_timer(config)
    except GateError as e:
        raise pytest.UsageError(str(e)) from None
    _one_gpu_per_xdist_worker()


def _registry_names(text: str | None) -> set[str] | None:
    """``--methods``: the canonical names (``snapkv`` -> ``snapkv:0.5``) of the listed registry methods."""
    names = parse_names(text)
    if names is None:
        return None
    from dms_perf.bench.methods import resolve_methods

    try:
        return {method.name for method in resolve_methods(names)}
    except ValueError as e:
        raise pytest.UsageError(f"--methods: {e}") from None


def _canonical_method(name) -> str:
    from dms_perf.bench.methods import resolve_method

    try:
        return resolve_method(str(name)).name
    except ValueError:
        return str(name)


def _check_impls(wanted: tuple[str, ...] | None, items) -> None:
    """``--impls``: every name must be an implementation some collected test is parametrized over."""
    if wanted is None:
        return
    taken = {str(params["impl"]) for item in items if "impl" in (params := _params(item))}
    unknown = [name for name in wanted if name not in taken]
    if unknown:
        valid = ", ".join(sorted(taken)) or "none (no collected test has an `impl` parameter)"
        raise pytest.UsageError(f"--impls: unknown implementation(s) {', '.join(unknown)}; valid here: {valid}")


def _kept(params: dict, impls, methods) -> bool:
    """Whether ``--impls`` and ``--methods`` keep a case with these parameters."""
    if impls is not None and "impl" in params and str(params["impl"]) not in impls:
        return False
    return methods is None or "method" not in params or _canonical_method(params["method"]) in methods


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {})


def _one_gpu_per_xdist_worker():
    """``pytest tests -n <number of GPUs>``: worker gwK runs on GPU K (mod the GPU count)."""
    if HAS_CUDA:
        index = gpu_for_worker(os.environ.get("PYTEST_XDIST_WORKER", ""), torch.cuda.device_count())
        if index is not None:
            torch.cuda.set_device(index)


def _configure_benchmark_storage_and_timer(config):
    """Baselines live per GPU model in benchmarks/baselines/<gpu-slug>/ so that a bare
    ``pytest benchmarks --benchmark-compare`` compares against this card's committed baseline;
    on CUDA the timer synchronizes the device (runs before pytest-benchmark's trylast configure)."""
    if not hasattr(config.option, "benchmark_storage"):
        return
    if config.option.benchmark_storage == DEFAULT_BENCHMARK_STORAGE:
        folder = BASELINES_DIR / device_info()["gpu_slug"]
        config.option.benchmark_storage = f"file://{folder}"
    if HAS_CUDA and config.option.benchmark_timer == DEFAULT_BENCHMARK_TIMER:
        config.option.benchmark_timer = "dms_perf.bench.timing.cuda_sync_timer"
    if config.option.benchmark_compare and not config.option.benchmark_disable:
        require_baseline(config.option.benchmark_storage, config.option.benchmark_compare)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dms_perf_device"] = device_info()


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """Refuse to compare timings across GPU models: the numbers would mean nothing."""
    try:
        check_same_gpu(machine_info, compared_benchmark["machine_info"], where=str(benchmarksession.storage))
    except GateError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if HAS_CUDA else "none"
    return (
        f"dms-perf: torch {torch.__version__}, GPU {gpu}, triton interpreter {INTERPRET}, "
        f"context lengths {list(config.dms_context_lengths)}"
    )


def pytest_generate_tests(metafunc):
    if "context_length" in metafunc.fixturenames:
        metafunc.parametrize("context_length", metafunc.config.dms_context_lengths, ids=lambda n: f"ctx{n}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", test_dtypes(), ids=lambda d: str(d).removeprefix("torch."))


@pytest.hookimpl(tryfirst=True)  # before `-m` selection, which must see the host_bound marks
def pytest_collection_modifyitems(config, items):
    keep_methods, keep_impls = config.dms_methods, config.dms_impls
    _check_impls(keep_impls, items)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: none on this machine (ran CPU/interpreter tests only)")
    selected, deselected = [], []
    for item in items:
        if not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        params = _params(item)
        host_bound = getattr(getattr(item, "module", None), "host_bound", None)
        if callable(host_bound) and host_bound(params):
            item.add_marker("host_bound")
        (selected if _kept(params, keep_impls, keep_methods) else deselected).append(item)
    if config.dms_shard is not None:
        index, count = config.dms_shard
        mine = set(shard_node_ids([item.nodeid for item in selected], index, count))
        deselected += [item for item in selected if item.nodeid not in mine]
        selected = [item for item in selected if item.nodeid in mine]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(autouse=True)
def _record_host_bound(request):
    """Benchmarks marked host_bound say so in their JSON (``extra_info["host_bound"]``), so that
    ``dms-perf ci gate --host-bound-threshold`` can treat them apart."""
    if "benchmark" in request.fixturenames and request.node.get_closest_marker("host_bound"):
        request.getfixturevalue("benchmark").extra_info["host_bound"] = True


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed_and_free(request):
    """Seed from the test id (different tests draw different inputs, reruns the same); free GPU memory after."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little")
    torch.manual_seed(seed)
    yield
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
