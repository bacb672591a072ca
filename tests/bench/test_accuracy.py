"""``dms-perf bench --accuracy``: the exact-answer rule, the prompt set's depths and codes, the scorer on
models that plant the right or a wrong answer, perplexity through each method's cache, the accuracy table and
Pareto figures from a fixed results.json, the CLI end to end on a saved tiny checkpoint, and its refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dms_perf.bench.accuracy import (
    build_prompts,
    heldout_tokens,
    load_prompt_source,
    measure_accuracy,
    teacher_forced_loss,
)
from dms_perf.bench.cli import main
from dms_perf.bench.methods import load_model_for, resolve_method
from dms_perf.bench.report import (
    ACCURACY_KV_PLOT,
    ACCURACY_TIME_PLOT,
    accuracy_table,
    load_results,
    pareto_front,
    render_markdown,
)
from dms_perf.bench.workloads import exact_answer, needle_depths, needle_prompts
from tests.bench.word_tokenizer import word_tokenizer

CONTEXT = 80  # the word tokenizer's template, question and needle take about 40 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(codes=True)


@pytest.mark.parametrize(
    ("text", "exact"),
    [
        ("0421-TULIP", True),
        (" 0 4 2 1 - TULIP .", True),  # a word-level tokenizer's decode: spacing is free
        ("0421-TULIP\nAnswer: more", True),  # what follows the answer is free
        ("The code is 0421-TULIP", False),  # nothing before it
        ("0421-TULIPS", False),  # nothing glued after it
        ("0422-TULIP", False),
        ("0421", False),
        ("", False),
    ],
)
def test_exact_answer(text, exact):
    assert exact_answer(text, "0421-TULIP") is exact


def test_needle_prompts_spread_their_needles_and_codes(tokenizer):
    assert needle_depths(1) == [0.5] and needle_depths(5) == [0, 0.25, 0.5, 0.75, 1]
    with pytest.raises(ValueError, match="positive int"):
        needle_depths(0)
    # A needle starts on a sentence boundary at or before its depth: long enough that depths are sentences apart.
    length = 400
    prompts = needle_prompts(length, 5, tokenizer=tokenizer, seed=3)
    assert [p.needle_depth for p in prompts] == needle_depths(5)
    assert all(p.input_ids.shape == (1, length) for p in prompts)
    assert not any((p.input_ids == tokenizer.unk_token_id).any() for p in prompts)  # every code encodes
    positions = [p.needle_position for p in prompts]
    assert positions == sorted(positions) and len(set(positions)) == 5  # from start to end, no two alike
    haystack = length - 40  # the template, question and needle take about 40 tokens
    assert positions[-1] - positions[0] > 0.9 * haystack  # spread over the haystack, not bunched at one depth
    codes = [p.expected_answer for p in prompts]
    assert len(set(codes)) == 5
    for p in prompts:  # each prompt holds its own code at its needle
        needle = tokenizer.decode(p.input_ids[0, p.needle_position:p.needle_position + len(p.needle_ids)])
        assert p.expected_answer.split("-")[1] in needle and exact_answer(needle.split(" is ")[1], p.expected_answer)
    again = needle_prompts(length, 5, tokenizer=tokenizer, seed=3)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(prompts, again, strict=True))
    other = needle_prompts(length, 5, tokenizer=tokenizer, seed=4)
    assert [p.expected_answer for p in other] != codes and [p.needle_depth for p in other] == needle_depths(5)


class PlantedAnswers:
    """The tiny model, its logits replaced so that greedy decoding writes a planted answer: prompt i's own
    code (``offset`` 0) or the code of prompt i + ``offset``, then full stops."""

    def __init__(self, model, tokenizer, prompts, offset: int):
        self.inner = model
        n = len(prompts)
        self.answers = {tuple(p.input_ids[0].tolist()): tokenizer.encode(" " + prompts[(i + offset) % n].answer,
                                                                          add_special_tokens=False)
                        for i, p in enumerate(prompts)}
        self.stop = tokenizer.convert_tokens_to_ids(".")
        self.queue: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:  # a prefill: this prompt's planted answer (none for other text)
            self.queue = list(self.answers.get(tuple(input_ids[0].tolist()), []))
        token = self.queue.pop(0) if self.queue else self.stop
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[..., token] = 0.0
        out.logits = logits
        return out


@pytest.mark.parametrize(("offset", "accuracy"), [(0, 1.0), (1, 0.0)])
def test_scorer_counts_planted_answers(tiny_models, tokenizer, offset, accuracy):
    """A model that always answers its own code scores 100 %, one that answers another prompt's code 0 %."""
    vanilla = resolve_method("vanilla")
    model = tiny_models(vanilla)
    prompts = build_prompts(load_prompt_source(None), CONTEXT, 4, tokenizer=tokenizer, seed=0)
    planted = PlantedAnswers(model, tokenizer, prompts, offset)
    fields = measure_accuracy(planted, vanilla, prompts=prompts, new_tokens=8, heldout=heldout_tokens(tokenizer, 90),
                              context=CONTEXT, perplexity_tokens=2, tokenizer=tokenizer, device="cpu")
    assert fields["accuracy_status"] == "ok"
    assert fields["retrieval_accuracy"] == accuracy and fields["retrieval_prompts"] == 4
    assert fields["retrieval_passed"] == [int(accuracy)] * 4 and fields["retrieval_depths"] == needle_depths(4)


def test_prompt_source_is_checked(tokenizer):
    with pytest.raises(ValueError, match="expected module:function"):
        load_prompt_source("needle_prompts")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_prompt_source("dms_perf.bench.workloads:nope")

    def short(*, context_length, n, tokenizer, seed):
        return needle_prompts(context_length, n, tokenizer=tokenizer, seed=seed)[:-1]

    with pytest.raises(ValueError, match="gave 1 prompts, not 2"):
        build_prompts(short, CONTEXT, 2, tokenizer=tokenizer, seed=0)


def test_perplexity_goes_through_the_methods_cache(tiny_models, tokenizer):
    """Teacher forcing through vanilla's cache is the full forward's loss; a press's loss is that of its
    compressed cache, the same whether transformers or the engine decodes it."""
    kvpress = pytest.importorskip("kvpress")  # noqa: F841
    held = heldout_tokens(tokenizer, CONTEXT + 6)
    prefix, continuation = held[:, :CONTEXT], held[:, CONTEXT:]
    vanilla = resolve_method("vanilla")
    model = tiny_models(vanilla)
    with torch.inference_mode():
        logits = model(held).logits[0, CONTEXT - 1:-1].float()
    full = float(torch.nn.functional.cross_entropy(logits, held[0, CONTEXT:], reduction="sum"))
    assert teacher_forced_loss(model, vanilla, prefix, continuation) == pytest.approx(full, rel=1e-5)
    assert teacher_forced_loss(model, resolve_method("knorm:0"), prefix, continuation) == pytest.approx(full, rel=1e-5)
    pressed = teacher_forced_loss(model, resolve_method("knorm:0.5"), prefix, continuation)
    assert pressed != pytest.approx(full, rel=1e-4)
    engine = resolve_method("knorm-triton:0.5")
    assert teacher_forced_loss(tiny_models(engine), engine, prefix, continuation) == pytest.approx(pressed, rel=1e-4)


# --- the table and figures from a fixed results.json ---------------------------------------------------


def _row(method, kv, kept, ms, accuracy, perplexity, status="ok"):
    row = {"context": 4096, "method": method, "batch": 1, "new_tokens": 128, "status": status,
           "accuracy_status": "ok", "retrieval_prompts": 100, "retrieval_exact": round(100 * accuracy),
           "retrieval_accuracy": accuracy,
           "retrieval_passed": [1] * round(100 * accuracy) + [0] * round(100 - 100 * accuracy),
           "retrieval_depths": needle_depths(100), "answer_tokens": 8, "perplexity": perplexity,
           "perplexity_status": "ok", "perplexity_tokens": 128}
    if status == "ok":
        row.update(total_s=2.0, prefill_s=1.0, prefill_tok_s=4096.0, generated_tokens=128, kv_bytes=kv,
                   kept_kv_bytes=kept, ms_per_step=ms, decode_tok_s=1e3 / ms, compression=512 * MIB / kept,
                   retrieval="pass", repeats=3)
    return row


MIB = 2**20
FIXED_ROWS = [
    _row("vanilla", 512 * MIB, 512 * MIB, 30.0, 0.97, 4.1),
    _row("dms-triton", 96 * MIB, 64 * MIB, 20.0, 0.88, 4.4),
    _row("knorm:0.5", 256 * MIB, 256 * MIB, 28.0, 0.95, 4.2),
    _row("knorm:0.875", 64 * MIB, 64 * MIB, 27.0, 0.90, 5.0),  # a press beating DMS at less KV: shown as such
    _row("dms-calibrated:0.875", 96 * MIB, 64 * MIB, 21.0, 0.31, 9.0),
    {**_row("snapkv:0.5", 0, 0, 1.0, 0.0, 0.0, status="OOM"), "accuracy_status": "OOM", "perplexity": None,
     "perplexity_status": "n/a: OOM", "retrieval_accuracy": None, "retrieval_exact": None, "retrieval_passed": None},
]


@pytest.fixture
def fixed_results(tmp_path):
    meta = {"date": "2026-01-01 00:00 UTC", "device": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x"},
            "model": "/ckpt/qwen3-small-dms", "dtype": "bfloat16", "weights": "real weights from /ckpt/qwen3-small-dms",
            "contexts": [4096], "methods": [r["method"] for r in FIXED_ROWS], "batches": [1], "new_tokens": 128,
            "repeats": 3, "warmup": 1, "needle_depth": 0.5, "seed": 0,
            "calibration": {"dms-calibrated:0.875": {"alpha_offset": 1.0, "marked_fraction": 0.874, "target_cr": 8.0,
                                                     "compression_ratio": 7.9}},
            "accuracy": {"prompts": 100, "prompt_source": "dms_perf.bench.workloads:needle_prompts", "seed": 0,
                         "perplexity_text": "held.txt", "perplexity_tokens": 128},
            "command": "dms-perf bench --accuracy"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": meta, "rows": FIXED_ROWS}))
    return path


def test_pareto_front_counts_every_method_alike():
    front = pareto_front(FIXED_ROWS, lambda r: r.get("kv_bytes") if r["status"] == "ok" else None)
    assert {method for _, method, _ in front} == {"vanilla", "knorm:0.5", "knorm:0.875"}  # dms-triton is dominated
    ties = [{**_row("a", 10, 10, 1.0, 0.5, 1.0)}, {**_row("b", 10, 10, 1.0, 0.5, 1.0)}]
    assert {method for _, method, _ in pareto_front(ties, lambda r: r["kv_bytes"])} == {"a", "b"}


def test_report_writes_the_accuracy_table_and_figures(fixed_results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(fixed_results), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "## Accuracy" in md
    table = md[md.index("| Context | Method | Retrieval (exact) |"):].split("\n\n")[0]
    assert table.splitlines()[0] == ("| Context | Method | Retrieval (exact) | Perplexity | KV held (MiB) "
                                     "| KV kept (MiB) | Compression | Decode ms/step | Pareto |")
    lines = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert list(lines) == ["vanilla", "dms-triton", "knorm:0.5", "knorm:0.875", "dms-calibrated:0.875",
                           "snapkv:0.5 (OOM)"]
    assert lines["vanilla"] == "| 4K | vanilla | 97.0% (97/100) | 4.1 | 512.0 | 512.0 | 1.00x | 30 | KV, time |"
    assert lines["dms-triton"] == "| 4K | dms-triton | 88.0% (88/100) | 4.4 | 96.0 | 64.0 | 8.00x | 20 | time |"
    assert lines["knorm:0.875"].endswith("| 90.0% (90/100) | 5 | 64.0 | 64.0 | 8.00x | 27 | KV, time |")
    assert lines["dms-calibrated:0.875"].endswith("| 31.0% (31/100) | 9 | 96.0 | 64.0 | 8.00x | 21 | — |")
    assert lines["snapkv:0.5 (OOM)"] == "| 4K | snapkv:0.5 (OOM) | OOM | n/a: OOM | — | — | — | — | — |"
    assert "dms-calibrated:0.875: DMS eviction with an offset calibrated on these weights" in md
    assert "(dms-calibrated:0.875: 0.874 of the decisions marked)" in md
    assert "100 needle prompts per context from dms_perf.bench.workloads:needle_prompts" in md
    for name in (ACCURACY_KV_PLOT, ACCURACY_TIME_PLOT):
        assert (out / name).stat().st_size > 10_000
    meta, rows = load_results(fixed_results)
    assert render_markdown(meta, rows).split("## Accuracy")[1] == md.split("## Accuracy")[1]


def test_rows_without_accuracy_have_no_accuracy_section(fixed_results):
    meta, rows = load_results(fixed_results)
    plain = [{k: v for k, v in r.items() if not k.startswith(("accuracy", "retrieval_", "perplexity", "answer"))}
             for r in rows]
    assert "## Accuracy" not in render_markdown(meta, plain)
    assert accuracy_table(rows).count("\n") == 1 + len(rows)


def test_a_bad_accuracy_field_is_a_bad_results_file(fixed_results, tmp_path, capsys):
    data = json.loads(fixed_results.read_text())
    data["rows"][0]["retrieval_passed"] = "all"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "row 0: 'retrieval_passed' is not a list of numbers" in capsys.readouterr().err


# --- the CLI end to end on a saved tiny checkpoint -----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny Qwen3(-DMS) checkpoint with a tokenizer that knows every code."""
    from dms_perf.model.qwen3_dms import build_model, tiny_config

    path = tmp_path_factory.mktemp("checkpoint")
    build_model(tiny_config(), backend=None, dtype=torch.float32, device="cpu").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bench_accuracy_on_a_checkpoint(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--model", str(checkpoint), "--contexts", str(CONTEXT), "--methods",
                 "vanilla,dms-calibrated:0.5", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
                 "--accuracy", "2", "--perplexity-tokens", "2", "--out", str(out)])
    assert code == 0
    meta, rows = load_results(out)
    assert meta["accuracy"]["prompts"] == 2 and meta["accuracy"]["perplexity_tokens"] == 2
    assert meta["accuracy"]["prompt_source"] == "dms_perf.bench.workloads:needle_prompts"
    assert meta["calibration"]["dms-calibrated:0.5"]["marked_fraction"] == pytest.approx(0.5, abs=0.02)
    assert "dms-calibrated:0.5: eviction calibrated on these weights" in meta["weights"]
    for row in rows:  # the accuracy beside the cell's own KV bytes and time
        assert row["status"] == "ok" and row["accuracy_status"] == "ok", row
        assert row["retrieval_prompts"] == 2 and row["retrieval_depths"] == [0.0, 1.0]
        assert row["retrieval_accuracy"] in (0.0, 0.5, 1.0) and math.isfinite(row["perplexity"])
        assert row["kv_bytes"] > 0 and row["ms_per_step"] > 0
    md = (out / "results.md").read_text()
    assert "## Accuracy" in md and f"| {CONTEXT} | dms-calibrated:0.5 |" in md.split("## Accuracy")[1]
    assert "| Retrieval (exact) | Perplexity |" in capsys.readouterr().out  # printed too
    for name in (ACCURACY_KV_PLOT, ACCURACY_TIME_PLOT):
        assert (out / name).stat().st_size > 0
    again = tmp_path / "again"
    assert main(["report", str(out), "--out", str(again)]) == 0  # reproduced from results.json
    assert (again / "results.md").read_text().split("## Accuracy")[1] == md.split("## Accuracy")[1]


def test_a_plain_qwen3_checkpoint_runs_as_untrained_dms(tmp_path):
    """A base checkpoint without the DMS config fields loads for dms-calibrated with docs/DMS.md's defaults,
    its eviction calibrated on its own weights, and says so."""
    from transformers import Qwen3ForCausalLM

    from dms_perf.bench.methods import dms_fields_missing, weights_note
    from dms_perf.model.qwen3_dms import DMS_FIELDS, tiny_config

    config = tiny_config()
    for name in (*DMS_FIELDS, "dms_cr"):
        delattr(config, name)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    assert dms_fields_missing(str(tmp_path)) == list(DMS_FIELDS)
    method = resolve_method("dms-calibrated:0.75")
    model, _ = load_model_for(str(tmp_path), method, dtype=torch.float32, device="cpu")
    assert method.calibration(model).marked_fraction == pytest.approx(0.75, abs=0.02)
    assert model.config.dms_initial_alpha_offset == method.calibration(model).alpha_offset
    assert "the DMS methods use docs/DMS.md's defaults" in weights_note(str(tmp_path), [method], 8)
    with pytest.raises(ValueError, match="0 evicts nothing"):
        resolve_method("dms-calibrated:0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--accuracy", "0"], "--accuracy must be >= 1 prompts per cell, got 0"),
        (["--model", "tiny", "--accuracy", "4"], "--model tiny has random weights"),
        (["--accuracy", "2", "--perplexity-tokens", "0"], "--perplexity-tokens must be >= 1"),
        (["--accuracy", "2", "--accuracy-prompts", "no_such_module:prompts"], "cannot import no_such_module"),
        (["--accuracy", "2", "--perplexity-text", "SHORT"], "tokens, fewer than the 88"),
        (["--accuracy", "2", "--requests", "2"], "a request stream (--requests) has none"),
    ],
)
def test_bad_accuracy_input_is_one_line_and_exit_2(tmp_path, checkpoint, capsys, args, message):
    short = tmp_path / "short.txt"
    short.write_text("The harbour town woke slowly.")
    args = [str(short) if a == "SHORT" else a for a in args]
    model = [] if "--model" in args else ["--model", str(checkpoint)]
    out = tmp_path / "out"
    code = main(["bench", *model, "--contexts", str(CONTEXT), "--methods", "vanilla", *args, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dms-perf bench: error: ") and message in err, err
    assert not out.exists()
