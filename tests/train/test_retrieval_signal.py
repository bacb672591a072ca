"""Retrieval as a CI signal: the committed models (models/, docs/models.md) through ``dms-perf bench --accuracy``
on the suite's needle prompts at the base's trained context, on the CPU.

The signal can fail both ways: the dense base must retrieve, DMS retrofitted to 4x must keep most of what the
base retrieves, and two methods that evict the needle must not: StreamingLLM at DMS 4x's compression, and a
planted fault, the 4x checkpoint with its decisions inverted (it evicts what it was trained to keep).

The thresholds are set from 100-prompt CPU runs (docs/models.md, "Accuracy"), below the figures by the
sampling error of ``PROMPTS`` prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dms_perf.bench.cli import main
from dms_perf.bench.report import load_results

# One worker runs the module (its fixtures are module-scoped): conftest schedules -n by group.
pytestmark = pytest.mark.xdist_group("retrieval-signal")

MODELS = Path(__file__).resolve().parents[2] / "models"
BASE = MODELS / "qwen3-synth-mid"
DMS_4X = MODELS / "qwen3-synth-mid-dms-4x"
CONTEXT = 1024
PROMPTS = 20  # a DMS prompt takes ~2 s here (its prefill compaction runs in Triton's interpreter)
# 100 prompts on this CPU (docs/models.md, "Accuracy"): dense 1.00, DMS 4x 1.00 at 2.30x, StreamingLLM at
# R = 0.6 (2.49x, near DMS 4x's compression on these prompts) 0.36; 40 prompts of the inverted 4x checkpoint: 0.025.
DENSE_FLOOR = 0.95
STREAMING = "streamingllm:0.6"
DMS_4X_MAX_DROP = 0.05
# StreamingLLM keeps the sinks and the last 40 % of the prompt, so it answers about the 40 % of needles planted
# that late: far under DMS 4x at the same bytes, not near zero.
STREAMING_CEILING = 0.6
EVICTED_CEILING = 0.25


def _accuracy(out: Path, model: Path, methods: str) -> dict[str, dict]:
    code = main(["bench", "--model", str(model), "--contexts", str(CONTEXT), "--methods", methods,
                 "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--accuracy", str(PROMPTS),
                 "--perplexity-tokens", "2", "--out", str(out)])
    assert code == 0
    _, rows = load_results(out)
    for row in rows:
        assert row["accuracy_status"] == "ok" and row["retrieval_prompts"] == PROMPTS, row
    return {row["method"]: row for row in rows}


@pytest.fixture(scope="module")
def base_rows(tmp_path_factory):
    return _accuracy(tmp_path_factory.mktemp("base"), BASE, f"vanilla,{STREAMING}")


@pytest.fixture(scope="module")
def dms_row(tmp_path_factory):
    return _accuracy(tmp_path_factory.mktemp("dms4x"), DMS_4X, "dms-hub")["dms-hub"]


def test_the_dense_base_retrieves(base_rows):
    assert base_rows["vanilla"]["retrieval_accuracy"] >= DENSE_FLOOR


def test_dms_4x_keeps_what_the_base_retrieves(base_rows, dms_row):
    assert dms_row["compression"] > 2.0  # it did evict
    assert dms_row["retrieval_accuracy"] >= base_rows["vanilla"]["retrieval_accuracy"] - DMS_4X_MAX_DROP


def test_streamingllm_at_the_same_compression_loses_the_needle(base_rows, dms_row):
    streaming = base_rows[STREAMING]
    assert streaming["compression"] == pytest.approx(dms_row["compression"], rel=0.3)
    assert streaming["retrieval_accuracy"] <= STREAMING_CEILING
    assert streaming["retrieval_accuracy"] <= dms_row["retrieval_accuracy"] - 0.3


def test_inverted_decisions_fail_the_signal(tmp_path, base_rows):
    """The planted fault: logit = -(a * scale - offset) marks exactly the tokens the trained rule keeps."""
    inverted = tmp_path / "inverted-4x"
    shutil.copytree(DMS_4X, inverted)
    config = json.loads((inverted / "config.json").read_text())
    config["dms_alpha_scale"] = -config["dms_alpha_scale"]
    config["dms_initial_alpha_offset"] = -config["dms_initial_alpha_offset"]
    (inverted / "config.json").write_text(json.dumps(config))
    row = _accuracy(tmp_path / "out", inverted, "dms-hub")["dms-hub"]
    assert row["compression"] > 1.0  # it evicted, the wrong tokens
    assert row["retrieval_accuracy"] <= EVICTED_CEILING
