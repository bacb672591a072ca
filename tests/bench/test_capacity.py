"""``dms-perf capacity``: the batch search on its own, the batch fill, and tiny CPU runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_perf.bench import batch_search, capacity
from dms_perf.bench.batch_search import Try, search_largest_batch
from dms_perf.bench.report import _num
from tests.bench.joins import assert_report_refuses, tiny_cells

REPO = Path(__file__).resolve().parents[2]


def _fits_up_to(limit: int, failure: str = "over budget: fake"):
    def try_batch(batch: int) -> Try:
        return Try(batch, batch <= limit, "ok" if batch <= limit else failure)

    return try_batch


def _batches(search) -> list[int]:
    return [t.batch for t in search.tries]


def test_search_doubles_then_bisects_to_the_largest_fitting_batch():
    search = search_largest_batch(_fits_up_to(37), max_batch=1024)
    assert search.largest == 37 and search.best.batch == 37
    # doubling up to the first failure (64), then bisection between 32 and 64
    assert _batches(search) == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    failed = [(t.batch, t.reason) for t in search.tries if not t.fits]
    assert failed == [(64, "over budget: fake"), (48, "over budget: fake"), (40, "over budget: fake"),
                      (38, "over budget: fake")]
    assert not search.ceiling_reached and search.stopped is None


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 31, 32, 33, 100])
def test_search_answer_is_exact(limit):
    search = search_largest_batch(_fits_up_to(limit, "OOM"), max_batch=1024)
    assert search.largest == limit
    assert len(search.tries) == len(set(_batches(search)))  # no batch tried twice


def test_search_stops_at_the_ceiling():
    search = search_largest_batch(_fits_up_to(10**6), max_batch=20)
    assert _batches(search) == [1, 2, 4, 8, 16, 20]
    assert search.largest == 20 and search.ceiling_reached
    assert search_largest_batch(_fits_up_to(10**6), max_batch=1).largest == 1


def test_search_reports_zero_when_batch_one_does_not_fit():
    search = search_largest_batch(_fits_up_to(0), max_batch=64)
    assert _batches(search) == [1] and search.largest == 0 and search.best is None


def test_search_stops_at_an_error():
    def try_batch(batch):
        if batch >= 8:
            return Try(batch, False, "error: RuntimeError: boom")
        return Try(batch, True, "ok")

    search = search_largest_batch(try_batch, max_batch=64)
    assert _batches(search) == [1, 2, 4, 8]  # no bisection around a failure that is not about memory
    assert search.largest == 4 and search.stopped == "batch 8: error: RuntimeError: boom"


def test_search_records_excluded_batches_without_running_them():
    """A batch known not to fit from the largest try that fit is recorded (ran=False) and never run; the
    search still ends at the right answer."""
    ran = []

    def try_batch(batch):
        ran.append(batch)
        return Try(batch, batch <= 37, "ok" if batch <= 37 else "over budget: fake")

    def excluded(fit, batch):
        assert fit.fits and fit.ran and fit.batch < batch  # only ever asked about batches above a fit
        return "not run: known" if batch > 40 else None

    search = search_largest_batch(try_batch, max_batch=1024, excluded=excluded)
    assert search.largest == 37
    assert _batches(search) == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert ran == [1, 2, 4, 8, 16, 32, 40, 36, 38, 37]  # 64 and 48 were excluded, not run
    skipped = [(t.batch, t.fits, t.ran, t.reason) for t in search.tries if not t.ran]
    assert skipped == [(64, False, False, "not run: known"), (48, False, False, "not run: known")]


def test_search_with_a_guess_excludes_the_batch_above_it():
    """Batch 1, the guess, and the batch above the guess excluded: two runs for an exact answer."""
    ran = []

    def try_batch(batch):
        ran.append(batch)
        return Try(batch, batch <= 24, "ok" if batch <= 24 else "over budget: fake")

    search = search_largest_batch(try_batch, max_batch=1024, guess=lambda first: 24,
                                  excluded=lambda fit, batch: "not run: pages" if batch > 24 else None)
    assert search.largest == 24 and ran == [1, 24] and _batches(search) == [1, 24, 25]
    assert not search.tries[-1].ran and search.stopped is None


def test_search_stop_ends_it_with_a_lower_bound():
    """``stop`` is asked before every try but the first; its reason ends the search, and the largest batch
    that fit so far is the answer (a lower bound, ``stopped`` says which batch was not tried)."""
    asked = []

    def stop(batch):
        asked.append(batch)
        return "out of time" if batch >= 16 else None

    search = search_largest_batch(_fits_up_to(100), max_batch=1024, stop=stop)
    assert _batches(search) == [1, 2, 4, 8] and asked == [2, 4, 8, 16]
    assert search.largest == 8 and search.stopped == "batch 16 not tried: out of time"
    guessed = search_largest_batch(_fits_up_to(100), max_batch=1024, guess=lambda first: 90,
                                   stop=lambda batch: "out of time" if batch > 90 else None)
    assert _batches(guessed) == [1, 90] and guessed.largest == 90
    assert guessed.stopped == "batch 91 not tried: out of time" and not guessed.ceiling_reached
    early = search_largest_batch(_fits_up_to(100), max_batch=1024, guess=lambda first: 90,
                                 stop=lambda batch: "out of time")
    assert _batches(early) == [1] and early.largest == 1 and early.stopped == "batch 90 not tried: out of time"


def test_search_rejects_a_non_positive_ceiling():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        search_largest_batch(_fits_up_to(3), max_batch=0)


def test_over_budget_reason_shows_differing_numbers():
    assert batch_search.over_budget(3 * 2**30, 2 * 2**30) == "over budget: 3 GiB > 2 GiB"
    reason = batch_search.over_budget(2**30 + 1000, 2**30)
    left, right = reason.removeprefix("over budget: ").split(" > ")
    assert left != right


def test_consuming_repeated_matches_stacked_and_empties_the_template():
    """The batch fill without a pool (``DMSCache.repeated``, layer by layer) is ``DMSCache.stacked``."""
    from dms_perf.bench.methods import load_model_for, resolve_method
    from dms_perf.model.cache import DMSCache

    model, _ = load_model_for("tiny", resolve_method("dms-triton"), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        template, reference = (model(input_ids=ids, past_key_values=model.make_dms_cache(), use_cache=True,
                                     logits_to_keep=1).past_key_values for _ in range(2))
        expected = DMSCache.stacked([reference] * 3)
        filled = DMSCache.repeated(template, 3, consume=True)
    assert filled.kv_bytes() == expected.kv_bytes() == 3 * reference.kv_bytes()
    for got, want in zip(filled.layers, expected.layers, strict=True):
        for name in ("keys", "values", "starts", "capacity", "lengths", "ring_slot", "ring_flag",
                     "step_index"):
            # spare rows are never written (poisoned by the conftest fixture): NaN in both
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True,
                                       msg=name)
        assert (got.seen, got.longest_bound, got.spare_steps) == (want.seen, want.longest_bound, want.spare_steps)
    assert all(not layer.is_initialized for layer in template.layers)


def test_repeated_on_a_pool_decodes_as_stacked():
    """The engine's fill: the batch copied layer by layer into a pool of exactly its rows decodes token for
    token as the stacked batch with buffers of its own."""
    from dms_perf.bench.batch_search import batch_pages
    from dms_perf.bench.generation import engine_pool
    from dms_perf.bench.methods import load_model_for, resolve_method
    from dms_perf.model.cache import DMSCache

    model, _ = load_model_for("tiny", resolve_method("dms-triton"), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = [model(input_ids=ids, past_key_values=model.make_dms_cache(), use_cache=True, logits_to_keep=1)
               for _ in range(2)]
        template, reference = (o.past_key_values for o in out)
        pool = engine_pool(model, max_seqs=3, pages=batch_pages(model, template, 3))
        model.use_kv_pool(None)
        assert template.to("cpu") is template  # where a GPU run parks it while the pool is allocated
        filled = DMSCache.repeated(template, 3, consume=True, pool=pool)
        with pytest.raises(ValueError, match="cannot move"):
            filled.to("cpu")
        expected = DMSCache.stacked([reference] * 3)
        assert filled.layers[0].keys.data_ptr() == pool.keys.data_ptr()
        assert pool.pages_in_use == sum(pool.pages_held(slot) for slot in range(3)) <= pool.num_pages
        assert all(not layer.is_initialized for layer in template.layers)
        runs = []
        for cache in (filled, expected):
            token, tokens = out[0].logits[:, -1:].argmax(-1).repeat(3, 1), []
            for step in range(4):
                position = torch.full((3, 1), 40 + step)
                token = model(input_ids=token, past_key_values=cache, position_ids=position,
                              use_cache=True).logits[:, -1:].argmax(-1)
                tokens.append(token)
            runs.append(torch.cat(tokens, 1))
    assert torch.equal(runs[0], runs[1])


def test_a_press_on_the_engine_is_filled_with_its_compressed_cache(tmp_path):
    """knorm-triton:0.5 prefills with its press: one sequence keeps about half of dense-triton's KV."""
    pytest.importorskip("kvpress")
    out = tmp_path / "press"
    args = ["--contexts", "64", "--methods", "knorm-triton:0.5,dense-triton", "--model", "tiny", "--dtype",
            "float32", "--target-cr", "0", "--steps", "1", "--max-batch", "1", "--out", str(out)]
    assert capacity.main(args) == 0
    by = {r["method"]: r for r in json.loads((out / "capacity.json").read_text())["results"]}
    kept = {m: r["sequence_kept_kv_bytes"] for m, r in by.items()}
    assert kept["knorm-triton:0.5"] == pytest.approx(kept["dense-triton"] / 2, rel=0.05)


COMMON = ["--contexts", "64", "--methods", "dms-triton,dense-triton", "--model", "tiny", "--dtype", "float32",
          "--target-cr", "0", "--steps", "1"]


def test_dms_fits_more_sequences_than_dense(tmp_path, capsys):
    # First: one sequence per method under the CPU default budget, for the measured bytes of one sequence.
    probe = tmp_path / "probe"
    assert capacity.main([*COMMON, "--max-batch", "1", "--out", str(probe)]) == 0
    data = json.loads((probe / "capacity.json").read_text())
    assert "CPU default" in data["meta"]["memory_budget_source"]
    assert "CPU default" in capsys.readouterr().out  # the console says where the budget came from
    one = {r["method"]: r for r in data["results"]}
    assert all(r["largest_batch"] == 1 and r["ceiling_reached"] for r in one.values())
    weights = one["dense-triton"]["weights_bytes"]
    assert one["dms-triton"]["sequence_kv_bytes"] < one["dense-triton"]["sequence_kv_bytes"]
    # A batch on the engine's paged pool holds its pages and per-head state: B times batch 1's.
    dense, dms = (one[name]["tries"][0]["kv_bytes"] for name in ("dense-triton", "dms-triton"))
    assert dms < dense
    # Between 3 and 4 dense sequences: dense fits 3, DMS as many as its bytes allow (the CPU estimate is
    # weights + KV bytes, and B sequences hold B times one's).
    kv_budget = 3.5 * dense
    fits = {"dense-triton": 3, "dms-triton": int(kv_budget // dms)}
    assert fits["dms-triton"] > 2 * fits["dense-triton"]

    out = tmp_path / "out"
    budget = repr((weights + kv_budget) / 2**30)
    assert capacity.main([*COMMON, "--max-batch", "64", "--memory-budget", budget, "--out", str(out)]) == 0
    for name in ("capacity.json", "capacity.md", "throughput_vs_batch.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "capacity.json").read_text())
    assert data["meta"]["batch_fill"] == "one prefilled sequence copied into every slot"
    assert data["meta"]["memory_budget_source"] == "--memory-budget"
    by = {r["method"]: r for r in data["results"]}
    per_sequence = {"dense-triton": dense, "dms-triton": dms}
    for method, r in by.items():
        assert r["largest_batch"] == fits[method]
        # every tried batch is recorded, in the order tried, with its verdict
        assert [t["batch"] for t in r["tries"]][:2] == [1, 2]
        for t in r["tries"]:
            assert t["fits"] == (t["reason"] == "ok") == (t["batch"] <= fits[method])
            assert t["reason"] == "ok" or t["reason"].startswith("over budget: ")
            assert t["peak_bytes"] == weights + t["batch"] * per_sequence[method]
            if t["fits"]:
                assert t["tok_s"] > 0 and t["tok_s"] == pytest.approx(t["batch"] / (t["step_ms"] * 1e-3))
        assert r["tok_s"] == next(t["tok_s"] for t in r["tries"] if t["batch"] == r["largest_batch"])
    dense_tries = [(t["batch"], t["fits"]) for t in by["dense-triton"]["tries"]]
    assert dense_tries == [(1, True), (2, True), (4, False), (3, True)]
    md = (out / "capacity.md").read_text()
    assert f"| 64 | dms-triton | {fits['dms-triton']} |" in md and "| 64 | dense-triton | 3 |" in md
    assert "| 3 | 4 | no | over budget: " in md  # the dense-triton tries are listed
    printed = capsys.readouterr().out
    assert f"| 64 | dms-triton | {fits['dms-triton']} |" in printed and f"wrote {out / 'capacity.json'}" in printed


def test_method_whose_batch_one_does_not_fit_gets_a_row(tmp_path):
    # The tiny model's weights and 1 KiB: less than one sequence's KV cache, so nothing fits; the run succeeds.
    from dms_perf.bench.floors import config_weight_bytes
    from dms_perf.model.qwen3_dms import tiny_config

    budget = repr((config_weight_bytes(tiny_config(), torch.float32) + 1024) / 2**30)
    out = tmp_path / "out"
    code = capacity.main(["--contexts", "64", "--methods", "dense-triton", "--model", "tiny",
                          "--memory-budget", budget, "--steps", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "capacity.json").read_text())
    assert data["meta"]["weights"] == "random weights"  # dense-triton evicts nothing: no "calibrated"
    (result,) = data["results"]
    assert result["largest_batch"] == 0 and result["tok_s"] is None
    assert [t["batch"] for t in result["tries"]] == [1]
    assert result["tries"][0]["reason"].startswith("over budget: ")
    assert "| 64 | dense-triton | 0 (batch 1 does not fit: over budget: " in (out / "capacity.md").read_text()
    assert (out / "throughput_vs_batch.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "dms-triton,vanilla,snapkv:0.5"],
         "capacity measures methods whose model keeps a DMSCache; vanilla, snapkv:0.5 do not"),
        (["--methods", "nope"], "unknown method 'nope'; valid methods:"),
        (["--memory-budget", "0"], "--memory-budget must be a positive number of GiB, got 0.0"),
        (["--memory-budget", "-2"], "--memory-budget must be a positive number of GiB, got -2.0"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--time-limit", "0"], "--time-limit must be a positive number of seconds, got 0.0"),
        (["--time-limit", "nan"], "--time-limit must be a positive number of seconds, got nan"),
        (["--target-cr", "0.5"], "--target-cr must be 0 (off) or > 1, got 0.5"),
        (["--memory-budget", "0.001"], "is less than the weights of tiny in float32 alone"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "dms_perf.bench.capacity", *args, "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        capacity.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--contexts", "--methods", "--memory-budget", "--max-batch", "--steps", "--warmup-steps",
                   "--time-limit", "--model", "--dtype", "--seed", "--target-cr", "--out"):
        assert option in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory-budget", "0.001"], "the memory budget, 0.001 GiB (--memory-budget), is less than the weights of "
         "tiny in float32 alone (0.001"),
        (["--target-cr", "1"], "--target-cr must be 0 (off) or > 1, got 1"),
        (["--target-cr", "-8"], "--target-cr must be 0 (off) or > 1, got -8"),
        (["--target-cr", "nan"], "--target-cr must be 0 (off) or > 1, got nan"),
        (["--contexts", "128,5000"], "--contexts 5000: a prompt and its decode steps 3 must fit the model's "
         "positions, but --model tiny has 4096"),
        (["--guess-from", "x.json"], "--guess-from predicts long generations' batches: give --new-tokens too"),
        (["--new-tokens", "8", "--guess-from", "/no/such.json"], "--guess-from /no/such.json: not a capacity.json "
         "(FileNotFoundError:"),
    ],
)
def test_refused_at_once_through_dms_perf(tmp_path, capsys, args, message):
    """A budget below the weights, or a calibration target no model can reach, is one line and exit 2
    before any model is built or any file written."""
    from dms_perf.bench.cli import main as cli_main

    out = tmp_path / "out"
    assert cli_main(["capacity", "--model", "tiny", "--dtype", "float32", *args, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dms-perf capacity: error: {message}"), lines
    assert not out.exists()


def test_bench_refuses_a_target_it_cannot_calibrate_to(tmp_path, capsys):
    """bench checks --target-cr with the same rule (dms_perf.bench.options.check_target_cr)."""
    from dms_perf.bench.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--target-cr", "1", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("dms-perf bench: error: --target-cr must be 0 (off) "
                                                                "or > 1, got 1")
    assert not (tmp_path / "out").exists()


def test_help_reads_as_prose(capsys):
    """Defaults as option lines (no Python dict), and one sentence on the methods capacity takes."""
    from dms_perf.bench.methods import FAMILIES

    with pytest.raises(SystemExit):
        capacity.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n", 1)[1].split("options:")[0]
    assert "{" not in description and "}" not in description  # no Python dict
    cpu = [line.strip() for line in out.splitlines() if line.strip().startswith("CPU default:")]
    assert cpu == ["CPU default: --contexts 128 --model tiny --dtype float32 --max-batch 64 --steps 2 "
                   "--warmup-steps 0"]
    assert "--methods dms-triton,dense-triton" in out
    flat = " ".join(out.split())
    *others, last = [f.name for f in FAMILIES.values() if f.backend is None]
    assert f"capacity takes the methods whose model keeps a DMS cache, listed below (R = fraction of the prompt's " \
           f"KV pairs removed); it refuses {', '.join(others)} and {last}, which keep no DMS cache to fill:" in flat
    assert "(default: None)" not in flat
    for f in FAMILIES.values():  # the methods it takes are listed, the refused ones only in that sentence
        assert (f" {f.name}{':R' if f.takes_parameter else ''} {f.summary}" in flat) == (f.backend is not None)


def test_capacity_is_a_dms_perf_subcommand(capsys):
    """``dms-perf capacity`` reaches the same command (and its bad input is one line, exit 2)."""
    from dms_perf.bench.cli import main as cli_main

    assert cli_main(["capacity", "--memory-budget", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dms-perf capacity: error:") and "--memory-budget" in err and "Traceback" not in err


def _long_run(tmp_path, method: str, pool_mib: float, *extra: str, max_batch: int = 64):
    """A tiny ``--new-tokens 12`` capacity run in ``tmp_path / method`` whose pool gets about ``pool_mib`` MiB:
    (its one result, the budget in bytes, its arguments)."""
    from dms_perf.bench.floors import config_weight_bytes
    from dms_perf.model.qwen3_dms import tiny_config

    weights = config_weight_bytes(tiny_config(), torch.float32)
    budget = repr((weights + pool_mib * 2**20) / 0.95 / 2**30)  # the pool gets the budget less 5 %, less weights
    out = tmp_path / method
    args = ["--contexts", "16", "--methods", method, "--model", "tiny", "--dtype", "float32", "--new-tokens", "12",
            "--max-batch", str(max_batch), "--memory-budget", budget, "--out", str(out), *extra]
    assert capacity.main(args) == 0
    (result,) = json.loads((out / "capacity.json").read_text())["results"]
    return result, float(budget) * 2**30, args


def test_long_generations_are_measured_at_their_end(tmp_path):
    """``--new-tokens``: every tried batch generates all its tokens on a paged pool of what the budget leaves;
    batch 1 is measured, then the batch its pages predict and the one above; a batch whose pages run out is
    recorded with how far it got."""
    from dms_perf.model.qwen3_dms import tiny_config

    r, _, args = _long_run(tmp_path, "dms-triton", 0.45, max_batch=8)
    out = tmp_path / "dms-triton"
    assert json.loads((out / "capacity.json").read_text())["meta"]["new_tokens"] == 12
    tries = r["tries"]
    assert tries[0]["batch"] == 1 and tries[0]["fits"] and tries[0]["kv_pages"] > 0
    page = 2 * 64 * tiny_config().head_dim * 4  # K and V rows of a 64-row page, float32
    assert tries[0]["free_pages"] == tries[0]["free_bytes"] // page
    guess = tries[0]["free_bytes"] // (tries[0]["kv_pages"] * page)  # at most; the tables may take one fewer
    assert tries[1]["batch"] in (min(max(2, guess), 8), min(max(2, guess - 1), 8))
    fit = [t["batch"] for t in tries if t["fits"]]
    failed = [t for t in tries if not t["fits"]]
    assert r["largest_batch"] == max(fit) >= 2 and failed
    assert all(t["batch"] > r["largest_batch"] for t in failed)
    # DMS may hold fewer pages a sequence at a larger batch: every batch above its guess is run, none excluded
    assert all(t["ran"] for t in tries)
    # out of pages while decoding (how far it got), or already while the batch was filled (an OOM)
    assert all(t["reason"].startswith(("KV pages ran out after", "over budget", "OOM")) for t in failed)
    md = (out / "capacity.md").read_text()  # the report says what this mode measured, not the prompt regime's
    assert "every decode step of a 12-token generation" in md and "untimed;" not in md
    assert "the batch its pages predict" in md and "doubling from 1 until" not in md
    assert "| KV pages (most held) | KV GiB |" in md
    assert "| 1 | 1 | yes | ok |" in md and f" | {_num(tries[0]['kv_pages'])} | " in md
    assert capacity.main([*args[:3], "dms-hub", *args[4:]]) == 2  # off the engine: refused


def test_a_method_that_evicts_nothing_needs_no_run_above_its_pages(tmp_path):
    """dense-triton holds every row: batch 1's pages predict the answer exactly, and the batch above it is
    recorded as not run. Running that batch anyway (the check) does run out of pages."""
    from dms_perf.bench.batch_search import Prompt, measure_generation_batch
    from dms_perf.bench.methods import load_model_for, resolve_method

    result, budget, _ = _long_run(tmp_path, "dense-triton", 0.4)
    tries = result["tries"]
    assert [t["ran"] for t in tries] == [True, True, False], tries
    first, fit, above = tries
    assert fit["fits"] and fit["kv_pages"] == fit["batch"] * first["kv_pages"]  # copies hold the same pages
    assert above["batch"] == fit["batch"] + 1 == result["largest_batch"] + 1 and not above["fits"]
    assert above["reason"].startswith(f"not run: {above['batch']} sequences hold "
                                      f"{above['batch'] * first['kv_pages']:,} pages")
    method = resolve_method("dense-triton")
    model, _ = load_model_for("tiny", method, dtype=torch.float32, device="cpu")
    method.prepare(model)
    ids = (torch.randint(0, 2**31 - 1, (1, 16), generator=torch.Generator().manual_seed(0)) % model.config.vocab_size)
    check = measure_generation_batch(Prompt(model, ids, method=method), above["batch"], new_tokens=12,
                                     budget=round(budget))
    # out of pages while decoding, or already while the batch was filled (PagesExhausted: an OOM)
    assert not check.fits and check.reason.startswith(("KV pages ran out after", "OOM")), check

    # --guess-from that run: batch 1 is skipped, the same answer in one run
    again, _, _ = _long_run(tmp_path / "again", "dense-triton", 0.4, "--guess-from",
                         str(tmp_path / "dense-triton" / "capacity.json"))
    assert [(t["batch"], t["ran"]) for t in again["tries"]] == [(fit["batch"], True), (above["batch"], False)]
    assert again["largest_batch"] == result["largest_batch"]


def test_time_limit_leaves_a_lower_bound_and_says_so(tmp_path):
    """A limit shorter than batch 1's try: nothing after it starts, the answer is 1 and the report says which
    batch was not tried."""
    result, _, _ = _long_run(tmp_path, "dense-triton", 0.4, "--time-limit", "0.001")
    assert [t["batch"] for t in result["tries"]] == [1] and result["largest_batch"] == 1
    assert result["stopped"].startswith("batch ") and "not tried: --time-limit 0.001 s" in result["stopped"]
    assert "the largest batch may be higher" in result["stopped"]
    md = (tmp_path / "dense-triton" / "capacity.md").read_text()
    assert "1 (search stopped at batch" in md


def test_guess_from_a_run_that_does_not_match_is_refused(tmp_path):
    """Another --new-tokens, or no finished batch of the method at the context: one line naming it."""
    from dms_perf.bench.batch_search import pages_from_file

    path = tmp_path / "capacity.json"
    tries = [{"batch": 1, "fits": True, "kv_pages": 10}, {"batch": 3, "fits": True, "kv_pages": 31},
             {"batch": 4, "fits": False, "kv_pages": 44}]
    path.write_text(json.dumps({"meta": {"new_tokens": 12, "model": "tiny"},
                                "results": [{"context": 16, "method": "dms-triton", "tries": tries}]}))
    assert pages_from_file(path, 16, "dms-triton", 12, "tiny") == 11  # 31 / 3 rounded up; the failed try is not one
    with pytest.raises(ValueError, match="its run had new_tokens 12, this one 16"):
        pages_from_file(path, 16, "dms-triton", 16, "tiny")
    with pytest.raises(ValueError, match="its run had model 'tiny', this one 'qwen3-8b'"):
        pages_from_file(path, 16, "dms-triton", 12, "qwen3-8b")
    with pytest.raises(ValueError, match="no batch of dense-triton at 16 tokens ran to its end there"):
        pages_from_file(path, 16, "dense-triton", 12, "tiny")


def test_report_joins_capacity_runs_made_one_method_at_a_time(tmp_path, capsys):
    """Capacity runs made in parts (one method per device call) join through ``dms-perf report`` into one
    capacity.json, capacity.md and plot when their card, model, dtype, budget and generation agree; any
    difference, or a capacity run beside bench cells, is one line and exit 2."""
    from dms_perf.bench import cli

    one = ["--contexts", "64", "--model", "tiny", "--dtype", "float32", "--target-cr", "4", "--steps", "1",
           "--max-batch", "1"]
    for method in ("dms-triton", "dense-triton"):
        assert capacity.main([*one, "--methods", method, "--out", str(tmp_path / method)]) == 0
    parts = {m: json.loads((tmp_path / m / "capacity.json").read_text()) for m in ("dms-triton", "dense-triton")}
    joined = tmp_path / "joined"
    assert cli.main(["report", str(tmp_path / "dense-triton" / "capacity.json"), str(tmp_path / "dms-triton"),
                     "--out", str(joined)]) == 0
    data = json.loads((joined / "capacity.json").read_text())
    assert [r["method"] for r in data["results"]] == ["dense-triton", "dms-triton"]
    for row in data["results"]:  # each method's result as its own run measured it
        assert row == parts[row["method"]]["results"][0]
    meta = data["meta"]
    assert meta["methods"] == ["dense-triton", "dms-triton"] and meta["command"].count("dms-perf capacity") == 2
    # the dense run alone evicted nothing; joined with DMS its weights' note says eviction was calibrated
    assert "calibrated" not in parts["dense-triton"]["meta"]["weights"]
    assert meta["weights"] == parts["dms-triton"]["meta"]["weights"] and "calibrated to 4x" in meta["weights"]
    md = (joined / "capacity.md").read_text()
    assert "| 64 | dense-triton | 1 (--max-batch) |" in md and "| 64 | dms-triton | 1 (--max-batch) |" in md
    assert (joined / "throughput_vs_batch.png").stat().st_size > 0
    capsys.readouterr()
    # runs of a checkpoint not on this machine: each run's weights' note is kept, none made up
    from dms_perf.bench.capacity_report import merge_capacity

    for method, note in (("dms-triton", "real weights from /gone/ckpt; dms-triton: x"),
                         ("dense-triton", "real weights from /gone/ckpt")):
        parts[method]["meta"].update(model="/gone/ckpt", weights=note)
        (tmp_path / f"{method}.json").write_text(json.dumps(parts[method]))
    meta, _ = merge_capacity([tmp_path / "dms-triton.json", tmp_path / "dense-triton.json"])
    assert meta["weights"] == "real weights from /gone/ckpt; dms-triton: x; real weights from /gone/ckpt"

    other = tmp_path / "other-steps"
    assert capacity.main([*one, "--steps", "2", "--methods", "dense-triton", "--out", str(other)]) == 0
    tiny_cells(cells := tmp_path / "cells")
    broken = tmp_path / "broken" / "capacity.json"
    broken.parent.mkdir()
    broken.write_text("{}")
    assert_report_refuses(capsys, tmp_path / "dms-triton", (
        ((other,), "its steps 2 differs from 1"), ((cells,), "capacity runs join only with capacity runs"),
        ((broken,), "not a capacity run's capacity.json")), tmp_path / "x")


@pytest.mark.parametrize("batches", [(23, 24, 142), (1, 3), (13, 14, 15), (1, 2, 4), (96, 97, 108)])
def test_the_batch_figure_holds_every_tried_batch(batches):
    """The figure's batch axis (log 2, ticks at powers of two) spans every tried batch of every method: two
    methods' searches that started at their guesses (dense 23 and 24, DMS 142) drew dense off the axis."""
    from dms_perf.bench.capacity_report import build_figure

    results = []
    for k, method in enumerate(("dense-triton", "dms-triton")):
        mine = batches[k::2] or batches[:1]
        tries = [{"batch": b, "fits": True, "reason": "ok", "tok_s": 10.0 * b} for b in mine]
        results.append({"context": 1024, "method": method, "largest_batch": max(mine), "stopped": None,
                        "tries": tries})
    meta = {"model": "qwen3-8b", "dtype": "bfloat16", "methods": ["dense-triton", "dms-triton"], "date": "d",
            "memory_budget_bytes": 2**30, "batch_fill": "one prefilled sequence copied into every slot",
            "weights": "random weights"}
    (ax,) = build_figure(meta, results).axes
    low, high = ax.get_xlim()
    drawn = [x for line in ax.get_lines() for x in line.get_xdata()]
    assert sorted(set(drawn)) == sorted(set(batches))
    assert all(low < x < high for x in drawn), (low, high, drawn)
    ticks = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert all(t & (t - 1) == 0 for t in ticks) and ticks[0] <= min(batches) and ticks[-1] >= max(batches)
