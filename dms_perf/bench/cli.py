"""``dms-perf``: the command line. Subcommands: ``bench`` (methods x context lengths, end to end),
``report`` (merge bench runs made in parts), ``methods`` (the method registry), ``capacity``, ``train`` (retrofit a
Qwen3 checkpoint with DMS, ``dms_perf.train.cli``) and ``ci``.

    dms-perf bench                                   # CPU: tiny random model, small contexts, 5 methods
    dms-perf bench --contexts 4k,8k,16k,32k --methods vanilla,dms-hub,dms-triton,snapkv:0.5 \\
                   --model qwen3-8b --new-tokens 128 --repeats 3 --out results/
    dms-perf bench --batch 1,8,32     # every (context, method) cell also at batch 8 and 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import textwrap
from collections.abc import Sequence

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.options import CPU_MODEL, DTYPES, GPU_MODEL, HelpFormatter, defaults_text

# The CPU run is a smoke run (Triton's interpreter, a tiny model): the dense baseline, the two DMS
# prefills of the speedup table and two kvpress presses, so that it takes well under a minute.
CPU_METHODS = ("vanilla", "dms-hub", "dms-hub-triton", "dms-triton", "snapkv:0.5")
CPU_DEFAULTS = {"contexts": "128,256", "methods": ",".join(CPU_METHODS), "model": CPU_MODEL["model"], "new_tokens": 8,
                "repeats": 1, "dtype": CPU_MODEL["dtype"]}
GPU_DEFAULTS = {"contexts": "4k,8k,16k,32k", "methods": "all of them (the list below)", "model": GPU_MODEL["model"],
                "new_tokens": 128, "repeats": 3, "dtype": GPU_MODEL["dtype"]}
# --accuracy alone: prompts per cell; --perplexity-tokens: tokens scored after each context (GPU, CPU).
ACCURACY_PROMPTS = (100, 8)
PERPLEXITY_TOKENS = (128, 8)




def _defaults() -> dict:
    from dms_perf.bench.methods import DEFAULT_METHODS

    d = dict(GPU_DEFAULTS if HAS_CUDA else CPU_DEFAULTS)
    if HAS_CUDA:
        d["methods"] = ",".join(DEFAULT_METHODS)
    return d


def _version() -> str:
    from dms_perf import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from dms_perf.bench.methods import DEFAULT_METHODS, describe_methods
    from dms_perf.bench.options import add_model_options, add_workload_options

    d = _defaults()
    parser = argparse.ArgumentParser(prog="dms-perf", description="Benchmarks for DMS KV-cache compression.")
    parser.add_argument("--version", action="version", version=f"dms-perf {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="time methods x context lengths end to end (prefill, decode, memory, KV bytes, retrieval)",
        description=textwrap.fill(
            "Greedy generation on needle-in-a-haystack prompts for every (context, method, batch) cell. Writes "
            "results.json after every cell, then results.md (full comparison and DMS prefill speedup tables) and "
            "PNG plots. A failing cell (e.g. out of memory) becomes a row saying so. Exit status: 0, or 1 when a "
            "cell ended in an error (OOM and skipped cells are results, not errors), 2 for a bad option, "
            "--model or --out, 130 when interrupted (the rows measured so far are kept).", 100)
        + "\n\n" + defaults_text(CPU_DEFAULTS, GPU_DEFAULTS),
        epilog="methods (R = fraction of the prompt's KV pairs removed, in [0, 1)); `dms-perf methods` "
        "prints them as a table:\n" + describe_methods(),
        formatter_class=HelpFormatter,
    )
    add_workload_options(bench, d, methods_help="comma-separated method names, e.g. vanilla,dms-triton,snapkv:0.5 "
                         f"(list below; all {len(DEFAULT_METHODS)} are the GPU default)")
    bench.add_argument("--batch", default="1", metavar="SIZES",
                       help="comma-separated batch sizes, e.g. 1,8,32: a batch-B cell prefills B distinct prompts of "
                       "the context length one by one, joins their caches and decodes them together (Decode tok/s "
                       "counts all B sequences; batch 1 is the single prompt of earlier runs)")
    add_model_options(bench, d)
    bench.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="local tokenizer directory for the text workload (default: the checkpoint's own when "
                       "--model is a path; none for random models: exact-length token ids)")
    bench.add_argument("--new-tokens", default=d["new_tokens"], metavar="N",
                       help="tokens generated per run, e.g. 128, 1k or 16k (a long generation: rows then show the "
                       "peak KV held, the first and last quarter's decode tok/s, and KV and tok/s against tokens "
                       "generated in kv_vs_generated.png and tok_s_vs_generated.png)")
    bench.add_argument("--repeats", type=int, default=d["repeats"], metavar="N",
                       help="timed runs per cell (median reported); Ctrl-C keeps the finished ones as a partial row")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per cell before the timed ones")
    bench.add_argument("--needle-depth", type=float, default=0.5, metavar="DEPTH",
                       help="where the needle sits in the haystack: 0 = start, 1 = end")
    accuracy_n, perplexity_n = (ACCURACY_PROMPTS[0], PERPLEXITY_TOKENS[0]) if HAS_CUDA else (ACCURACY_PROMPTS[1],
                                                                                        PERPLEXITY_TOKENS[1])
    bench.add_argument("--accuracy", type=int, nargs="?", const=accuracy_n, default=None, metavar="N",
                       help="also score every (context, method) cell on the model it was timed on: retrieval "
                       "accuracy over N needle prompts of the context length (needles at depths spread evenly, each "
                       "its own code; exact answers of a greedy decode) and perplexity on held-out text, both "
                       "through the method's own cache, beside the cell's KV bytes and decode ms/step (the Accuracy "
                       f"table, accuracy_vs_kv.png, accuracy_vs_time.png). N alone: {ACCURACY_PROMPTS[0]} on a GPU, "
                       f"{ACCURACY_PROMPTS[1]} without (here {accuracy_n}). Needs a checkpoint with a tokenizer "
                       "(--model DIR)")
    bench.add_argument("--accuracy-prompts", default=None, metavar="MODULE:FUNCTION",
                       help="the prompt source of --accuracy, called with context_length, n, tokenizer and seed "
                       "(keywords), returning n prompts, each with input_ids (one row of context_length ids) and "
                       "expected_answer (or code) "
                       "(default: dms_perf.bench.workloads:needle_prompts, the suite's needle)")
    bench.add_argument("--perplexity-text", default=None, metavar="FILE",
                       help="held-out text of the --accuracy perplexity, its start tokenized (default: the needle "
                       "workload's filler sentences in a seeded order)")
    bench.add_argument("--perplexity-tokens", type=int, default=perplexity_n, metavar="N",
                       help=f"tokens scored after each context's prefill, teacher forced through the method's decode "
                       f"({PERPLEXITY_TOKENS[0]} on a GPU, {PERPLEXITY_TOKENS[1]} without)")
    bench.add_argument("--requests", type=int, default=None, metavar="N",
                       help="a request stream instead of the cells: N requests of the context length whose output "
                       "lengths are drawn from --output-lengths, admitted whenever the paged KV pool has the pages, "
                       "decoded together; per method: requests per minute, total tok/s, peak pages, and "
                       "running_vs_time.png (engine methods only; one context length)")
    bench.add_argument("--output-lengths", default=None, metavar="LOW-HIGH",
                       help="the stream's output lengths, uniform in LOW-HIGH (seeded by --seed), e.g. 2k-16k "
                       "(default: 2k-16k on a GPU, 8-24 without)")
    bench.add_argument("--max-running", type=int, default=None, metavar="N",
                       help="the stream's sequence slots: at most N requests decode at once (default: 256 on a "
                       "GPU, 8 without)")
    bench.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                       help="the stream: measure each method over this many seconds of wall time (requests "
                       "completed and tokens generated in the window) instead of running every request to its end")
    bench.add_argument("--warmup-seconds", type=float, default=None, metavar="SECONDS",
                       help="the stream with --duration: run each method this many seconds first and count only "
                       "after them (the steady state, without the cold start's admissions, compiles and captures)")
    bench.add_argument("--steady-start", action="store_true",
                       help="the stream with --warmup-seconds: begin as a stream that has been running (the first "
                       "admitted requests part-way through their outputs, drawn as a steady stream's running ones "
                       "are), so that the window reaches the steady state without a cold start's minutes")
    bench.add_argument("--overlap-prefill", action="store_true",
                       help="the stream on a GPU: run each admission's prefill on a second CUDA stream beside "
                       "the decode steps, admitting it at the first step after it finishes")
    bench.add_argument("--capacity-step", type=int, default=None, metavar="N",
                       help="the stream: rows per KV head each page hand-out gives ahead (default 128); fewer "
                       "hold fewer spare pages and hand out more often")
    bench.add_argument("--page-rows", type=int, default=None, metavar="N",
                       help="the stream: K/V rows a page of the paged KV pool holds, a power of two (default 64); "
                       "smaller pages round each head up less and hand out more entries")
    bench.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                       help="the stream's paged KV pool, in GiB (default: the card's free memory less 10%% for "
                       "activations; 0.002 GiB without a GPU)")
    bench.add_argument("--out", default="results", metavar="DIR",
                       help="output directory (results.json, results.md, plots)")
    bench.set_defaults(run=run_bench, command_parser=bench)

    report = sub.add_parser(
        "report",
        help="merge results of several bench runs (same card and model) into one results.md and plots",
        description=textwrap.fill(
            "Join bench outputs made in parts, e.g. one device call per group of methods, and write results.json, "
            "results.md and the plots for all of them. Runs join when their card, model, dtype and seed agree; a "
            "cell (context, method, batch) present twice keeps the later row. Each input is a bench output "
            "directory, its results.json, or the pytest-benchmark JSON of benchmarks/test_end_to_end.py; request "
            "streams (stream.json, one method per run) join when their stream options, card and pool budget "
            "agree, into stream.json, stream.md and running_vs_time.png; capacity runs (capacity.json) join when "
            "their card, model, dtype, memory budget and generation agree, into capacity.json, capacity.md and the "
            "plot. Exit status: 0, or 2 when an input cannot be read or joined (one line naming it) or --out is "
            "unusable.",
            100),
        formatter_class=HelpFormatter,
    )
    report.add_argument("inputs", nargs="+", help="bench output directories or results.json files, in "
                        "order (a later run's row replaces an earlier one's)")
    report.add_argument("--out", default="results", metavar="DIR", help="output directory")
    report.add_argument("--per-model", action="store_true",
                        help="join runs of different checkpoints (e.g. a base and its DMS retrofits): each row's "
                        "method is named '<method> (<checkpoint directory name>)'")
    report.set_defaults(run=run_report, command_parser=report)

    methods = sub.add_parser(
        "methods",
        help="list the methods bench can run: name, parameter and default, model backend, what it is",
        description="The method registry (dms_perf.bench.methods.FAMILIES) as a table. A family taking a "
        "parameter is written family:R, R the fraction of the prompt's KV pairs removed, in [0, 1).",
    )
    methods.set_defaults(run=run_methods, command_parser=methods)

    from dms_perf.bench import capacity

    capacity.add_parser(sub)

    from dms_perf.train import cli as train_cli

    train_cli.add_parser(sub)

    ci = sub.add_parser(
        "ci",
        add_help=False,  # `dms-perf ci --help` is answered by dms_perf.ci itself
        help="GPU CI: tests + benchmarks gated on this GPU model's baseline, base-vs-head, shard merge "
        "(`dms-perf ci --help`; same as .ci/gpu and python -m dms_perf.ci)",
    )
    ci.add_argument("ci_args", nargs=argparse.REMAINDER)  # listed in --help; main() hands these over
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ci"]:  # everything after `ci`, --help included, belongs to dms_perf.ci
        from dms_perf.ci.runner import main as ci_main

        return ci_main(argv[1:], prog="dms-perf ci")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:  # the sub-command's own parser, so that its errors show `usage: dms-perf bench ...`
        return args.run(args, args.command_parser)
    except KeyboardInterrupt:  # before any row (bench handles it once rows are being written)
        print("interrupted", file=sys.stderr)
        return 130


def _error(parser, message: str, status: int = 2) -> int:
    """One line on stderr, ``dms-perf bench: error: ...``, and the exit status to return."""
    print(f"{parser.prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def _prepare_out(out) -> str | None:
    """Create the output directory; None if it is usable, else why not (one line)."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"--out {out}: is a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: cannot create the output directory: {exc.strerror or exc}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--out {out}: the output directory is not writable"
    return None


def _validate(args, parser):
    from dms_perf.bench.methods import resolve_methods
    from dms_perf.bench.options import check_target_cr, parse_context_lengths

    try:
        contexts = parse_context_lengths(args.contexts)
        methods = resolve_methods(args.methods)
        check_target_cr(args.target_cr)
    except ValueError as exc:
        parser.error(str(exc))
    args.new_tokens = _token_count(parser, "--new-tokens", args.new_tokens)
    for name in ("new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 <= args.needle_depth <= 1.0:
        parser.error(f"--needle-depth must be in [0, 1], got {args.needle_depth}")
    return contexts, methods


def _token_count(parser, option: str, value) -> int:
    """``16k`` -> 16384 (``parse_token_count``); a whole number below 1 is returned for the caller's range
    check, anything else is argparse's error for the option."""
    from dms_perf.bench.options import parse_token_count

    text = str(value)
    try:
        return parse_token_count(text)
    except ValueError:
        if text.strip().lstrip("+-").isdecimal():
            return int(text)
        parser.error(f"argument {option}: invalid int value: {text!r} (a token count such as 256 or 16k)")


def run_bench(args, parser) -> int:
    from rich.console import Console

    from dms_perf.bench.methods import check_model, is_model_path, weights_note
    from dms_perf.bench.options import parse_batch_sizes, positions_problem
    from dms_perf.bench.report import ResultsWriter
    from dms_perf.bench.workloads import load_tokenizer

    contexts, methods = _validate(args, parser)
    if args.requests is not None:
        if args.accuracy is not None:
            return _error(parser, "--accuracy scores the (context, method) cells, and a request stream (--requests) "
                          "has none: run them apart")
        return _run_stream_bench(args, parser, contexts, methods)
    stream_options = (("--output-lengths", args.output_lengths), ("--max-running", args.max_running),
                      ("--duration", args.duration), ("--warmup-seconds", args.warmup_seconds),
                      ("--capacity-step", args.capacity_step), ("--overlap-prefill", args.overlap_prefill or None),
                      ("--page-rows", args.page_rows))
    stream_only = [flag for flag, value in stream_options if value is not None]
    if stream_only:
        return _error(parser, f"{', '.join(stream_only)} set(s) a request stream: add --requests N")
    try:
        batches = parse_batch_sizes(args.batch)
    except ValueError as exc:
        return _error(parser, exc)
    if (problem := _accuracy_problem(args)) is not None:
        return _error(parser, problem)
    # Everything a cell needs from outside is checked once, before the first cell: a bad --model,
    # --tokenizer or --out is one line here rather than a row of errors per cell.
    try:
        check_model(args.model)
    except ValueError as exc:
        return _error(parser, exc)
    generated = max(args.new_tokens, args.perplexity_tokens if args.accuracy else 0)
    if (problem := positions_problem(args.model, contexts, generated)) is not None:
        if generated > args.new_tokens:
            problem = problem.replace("its --new-tokens", "its --new-tokens or --perplexity-tokens")
        return _error(parser, problem)
    real_weights = is_model_path(args.model)
    tokenizer = args.tokenizer or (args.model if real_weights else None)
    loaded_tokenizer = None
    if tokenizer is not None:
        try:
            loaded_tokenizer = load_tokenizer(tokenizer)
        except ValueError as exc:  # names the tokenizer
            return _error(parser, exc)
        except OSError as exc:  # transformers found no tokenizer there
            return _error(parser, f"cannot load the tokenizer {tokenizer!r}: {exc}")
    plan = None
    if args.accuracy is not None:
        try:
            plan = _accuracy_plan(args, contexts, loaded_tokenizer)
        except ValueError as exc:
            return _error(parser, exc)
    if (problem := _prepare_out(args.out)) is not None:
        return _error(parser, problem)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_info(),
        "model": args.model,
        "dtype": args.dtype,
        "weights": weights_note(args.model, methods, args.target_cr),
        "contexts": list(contexts),
        "methods": [m.name for m in methods],
        "batches": list(batches),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "needle_depth": args.needle_depth,
        "seed": args.seed,
        "tokenizer": tokenizer,
        "calibration": {},
        "command": "dms-perf " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if len(sys.argv) > 1 else ["bench"])),
    }
    if plan is not None:
        from dms_perf.bench.accuracy import DEFAULT_PROMPTS

        meta["accuracy"] = {
            "prompts": plan.n, "prompt_source": args.accuracy_prompts or DEFAULT_PROMPTS, "seed": args.seed,
            "scoring": "exact answer of a greedy decode (dms_perf.bench.workloads.exact_answer)",
            "perplexity_text": args.perplexity_text or "the needle workload's filler sentences in a seeded order",
            "perplexity_tokens": args.perplexity_tokens,
        }
    try:
        writer = ResultsWriter(args.out, meta)
    except OSError as exc:
        return _error(parser, f"--out {args.out}: cannot write results.json: {exc.strerror or exc}")
    console = Console(stderr=True)
    interrupted = False
    try:
        _run_cells(args, contexts, methods, batches, writer, console, tokenizer=loaded_tokenizer,
                   real_weights=real_weights, accuracy=plan)
    except KeyboardInterrupt:
        interrupted = True
    finally:  # an interrupted run still gets its tables and plots for the cells measured so far
        files = writer.finish()
    if interrupted:
        n = len(writer.rows)
        partial = [r for r in writer.rows if r.get("partial")]
        print(f"interrupted: {n} row{'' if n == 1 else 's'} kept in {writer.json_path}, results.md and plots written"
              + "".join(f"; {r['method']} @ {_cell_name(r['context'], r.get('batch', 1))} partial: {r['status']}"
                        for r in partial), file=sys.stderr)
        return 130
    from dms_perf.bench.report import (
        accuracy_table,
        comparison_table,
        has_accuracy,
        reading_notes,
        speedup_rows,
        speedup_table,
    )

    notes = reading_notes(writer.meta, writer.rows)  # as results.md: notes, comparison, DMS prefill speedup
    if notes:
        print("Reading these tables:\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    print(comparison_table(writer.rows))
    if speedup_rows(writer.rows):
        print("\n" + speedup_table(writer.rows))
    if has_accuracy(writer.rows):
        print("\n" + accuracy_table(writer.rows, writer.meta.get("methods")))
    console.print("wrote " + ", ".join(str(f) for f in files))
    failed = [r for r in writer.rows if str(r.get("status", "")).startswith("error")]
    if failed:
        return _error(parser, _failure_summary(failed, len(writer.rows)), status=1)
    return 0


def _run_stream_bench(args, parser, contexts, methods) -> int:
    """``dms-perf bench --requests N``: one request stream per method (``dms_perf.bench.stream``)."""
    from rich.console import Console

    from dms_perf.bench import stream
    from dms_perf.bench.generation import failure_status
    from dms_perf.bench.methods import check_model, config_of, group_by_backend, load_model_for
    from dms_perf.bench.options import DTYPES, positions_problem

    if args.requests < 1:
        return _error(parser, f"--requests must be >= 1, got {args.requests}")
    if len(contexts) != 1:
        return _error(parser, "a request stream takes one context length (the prompts'), got --contexts "
                      f"{args.contexts}")
    try:
        low, high = stream.parse_output_lengths(args.output_lengths or ("2k-16k" if HAS_CUDA else "8-24"))
        check_model(args.model)
    except ValueError as exc:
        return _error(parser, exc)
    max_running = args.max_running or (stream.GPU_MAX_RUNNING if HAS_CUDA else stream.CPU_MAX_RUNNING)
    if max_running < 1:
        return _error(parser, f"--max-running must be >= 1, got {max_running}")
    if args.memory_budget is not None and not args.memory_budget > 0:
        return _error(parser, f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
    if args.duration is not None and not args.duration > 0:
        return _error(parser, f"--duration must be a positive number of seconds, got {args.duration}")
    if args.warmup_seconds is not None and (args.duration is None or not args.warmup_seconds >= 0):
        return _error(parser, f"--warmup-seconds takes seconds >= 0 beside --duration, got {args.warmup_seconds}"
                      + ("" if args.duration is not None else " without --duration"))
    if args.steady_start and not args.warmup_seconds:
        return _error(parser, "--steady-start needs --warmup-seconds > 0 (and --duration): its first admissions' "
                      "prefills are the warm-up's")
    if args.capacity_step is not None and args.capacity_step < 1:
        return _error(parser, f"--capacity-step must be >= 1, got {args.capacity_step}")
    if args.page_rows is not None and (args.page_rows < 1 or args.page_rows & (args.page_rows - 1)):
        return _error(parser, f"--page-rows must be a power of two (rows a page; docs/DMS.md, 'Cache and decode'), "
                      f"got {args.page_rows}")
    not_engine = [m.name for m in methods if not m.family.fused]
    if not_engine:
        return _error(parser, f"a request stream runs on the decode engine's paged KV pool; {', '.join(not_engine)} "
                      "decode elsewhere: use the -triton methods")
    if (problem := positions_problem(args.model, contexts, high)) is not None:
        return _error(parser, problem.replace("--new-tokens", "--output-lengths high"))
    if args.memory_budget is not None and (problem := stream.fit_problem(config_of(args.model), DTYPES[args.dtype],
                                                                        args.memory_budget, contexts[0],
                                                                        args.page_rows)):
        return _error(parser, problem)
    if (problem := _prepare_out(args.out)) is not None:
        return _error(parser, problem)
    console = Console(stderr=True)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_info(), "model": args.model, "dtype": args.dtype, "requests": args.requests,
        "prompt_length": contexts[0], "output_lengths": [low, high], "max_running": max_running,
        "duration_s": args.duration, "warmup_s": args.warmup_seconds, "capacity_step": args.capacity_step,
        "steady_start": True if args.steady_start else None,  # None, as in streams from before the option
        "overlap_prefill": True if args.overlap_prefill else None,
        "page_rows": args.page_rows,  # None: the default, as in streams from before the option
        "seed": args.seed, "methods": [m.name for m in methods],
        "command": "dms-perf " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if len(sys.argv) > 1 else ["bench"])),
    }
    rows = []
    for group in group_by_backend(methods).values():
        try:
            model, _ = load_model_for(args.model, group[0], dtype=DTYPES[args.dtype], device=device, seed=args.seed,
                                      target_cr=args.target_cr)
        except Exception as exc:
            rows += [{"method": m.name, "status": f"error: model build failed: {failure_status(exc)}"} for m in group]
            continue
        requests = stream.make_requests(args.requests, contexts[0], (low, high), vocab_size=model.config.vocab_size,
                                        seed=args.seed)
        if args.steady_start:
            requests = stream.steady_start(requests, max_running, (low, high), vocab_size=model.config.vocab_size,
                                           seed=args.seed)
        for method in group:
            console.print(f"{method.name}: {args.requests} requests, outputs {low}-{high} tokens")
            def progress(line, name=method.name):
                console.print(f"  {name}: {line}")

            rows.append(stream.stream_method(model, method, requests, budget_gib=args.memory_budget,
                                             max_running=max_running, on_progress=progress,
                                             duration_s=args.duration, warmup_s=args.warmup_seconds,
                                             capacity_step=args.capacity_step, overlap_prefill=args.overlap_prefill,
                                             page_rows=args.page_rows))
        del model
    for row in rows:
        row.setdefault("context", contexts[0])
    files = stream.write_stream_outputs(args.out, meta, rows)
    print(stream.render_stream_markdown(meta, rows))
    console.print("wrote " + ", ".join(str(f) for f in files))
    failed = [r for r in rows if str(r["status"]).startswith("error")]
    return _error(parser, _failure_summary(failed, len(rows)), status=1) if failed else 0


def _accuracy_problem(args) -> str | None:
    """Why the --accuracy options cannot run (one line), before anything is loaded; None if they can."""
    from dms_perf.bench.methods import is_model_path

    if args.accuracy is None:
        return None
    if args.accuracy < 1:
        return f"--accuracy must be >= 1 prompts per cell, got {args.accuracy}"
    if args.perplexity_tokens < 1:
        return f"--perplexity-tokens must be >= 1, got {args.perplexity_tokens}"
    if not is_model_path(args.model):
        return (f"--accuracy scores the model's answers, and --model {args.model} has random weights (it answers "
                "nothing): pass --model DIR, a checkpoint with its tokenizer")
    return None


def _accuracy_plan(args, contexts, tokenizer):
    """The prompt source, held-out tokens and tokenizer every cell is scored with (``AccuracyPlan``); ValueError
    in one line when the source cannot be imported or the text is too short."""
    from dms_perf.bench.accuracy import AccuracyPlan, heldout_tokens, load_prompt_source

    source = load_prompt_source(args.accuracy_prompts)
    heldout = heldout_tokens(tokenizer, max(contexts) + args.perplexity_tokens, text_file=args.perplexity_text,
                             seed=args.seed)
    return AccuracyPlan(source=source, n=args.accuracy, tokenizer=tokenizer, heldout=heldout,
                        perplexity_tokens=args.perplexity_tokens, seed=args.seed)


def _device_info() -> dict:
    from dms_perf.bench.device import device_info

    return device_info()


def _run_cells(args, contexts, methods, batches, writer, console, *, tokenizer, real_weights: bool,
               accuracy=None) -> None:
    """Every (method, context, batch) cell, one model alive at a time, each row written as it is measured.
    ``accuracy`` (an ``AccuracyPlan``): each (method, context)'s row of the smallest batch also gets its
    accuracy fields, measured on the same model right after the timed runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dms_perf.bench.generation import CellInterrupted, measure_generation, release_memory
    from dms_perf.bench.methods import calibration_record, group_by_backend, load_model_for
    from dms_perf.bench.workloads import needle_batch

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    workloads: dict[int, object] = {}  # context -> the prompts of the largest batch (smaller ones: the first B)

    by_backend = group_by_backend(methods)  # one model alive at a time, shared by the methods of its backend

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("dms-perf bench", total=len(methods) * len(contexts) * len(batches))
        for backend, group in by_backend.items():
            progress.update(task, description=f"building model ({backend or 'vanilla'})")
            try:
                model, calibration = load_model_for(args.model, group[0], dtype=dtype, device=device,
                                                    seed=args.seed,
                                                    target_cr=None if real_weights else args.target_cr)
            except Exception as exc:  # the other backends can still run
                reason = _reason("model build failed", exc)
                for m in group:
                    for ctx in contexts:
                        for batch in batches:
                            writer.add({"context": ctx, "method": m.name, "batch": batch,
                                        "new_tokens": args.new_tokens, "status": reason})
                            progress.advance(task)
                release_memory()
                continue
            if calibration is not None:
                writer.meta["calibration"][backend] = calibration_record(calibration)
            for m in group:
                for ctx in contexts:
                    for batch in batches:
                        cell = f"{m.name} @ {_cell_name(ctx, batch)}"
                        progress.update(task, description=cell)
                        try:
                            if ctx not in workloads:
                                workloads[ctx] = needle_batch(
                                    ctx, max(batches), tokenizer=tokenizer, needle_depth=args.needle_depth,
                                    vocab_size=model.config.vocab_size, seed=args.seed,
                                )
                        except ValueError as exc:
                            row = {"context": ctx, "method": m.name, "batch": batch, "new_tokens": args.new_tokens,
                                   "status": _reason("workload", exc)}
                        else:
                            now = {"run": ""}

                            def on_run(what, cell=cell, now=now):  # "warm-up 1/1", "repeat 2/5": progress inside a cell
                                now["run"] = what
                                progress.update(task, description=f"{cell}: {what}")

                            def on_tokens(generated, total, cell=cell, now=now):  # a long generation's own progress
                                progress.update(task, description=f"{cell}: {now['run']}: {generated}/{total} tokens")

                            try:
                                row = measure_generation(model, workloads[ctx].first(batch), m,
                                                         new_tokens=args.new_tokens, repeats=args.repeats,
                                                         warmup=args.warmup, real_weights=real_weights, device=device,
                                                         on_run=on_run, on_tokens=on_tokens)
                            except CellInterrupted as stop:  # the repeats finished before Ctrl-C: a partial row
                                writer.add(stop.row)
                                raise
                        if accuracy is not None and batch == min(batches) and not row["status"].startswith("skipped"):
                            try:
                                row.update(accuracy.measure(model, m, ctx, device=device,
                                                            on_progress=lambda what, cell=cell: progress.update(
                                                                task, description=f"{cell}: {what}")))
                            except KeyboardInterrupt:  # the cell's timed row is kept, its accuracy said unmeasured
                                writer.add({**row, "accuracy_status": "interrupted"})
                                raise
                        if m.family.calibrated and row["status"] == "ok" and m.name not in writer.meta["calibration"]:
                            writer.meta["calibration"][m.name] = calibration_record(m.calibration(model))
                        writer.add(row)
                        progress.advance(task)
            del model
            release_memory()


def _cell_name(context, batch) -> str:
    """``4096`` for a batch-1 cell, ``4096 batch 8`` for another."""
    return f"{context}" if batch == 1 else f"{context} batch {batch}"


def _failure_summary(failed: list[dict], total: int) -> str:
    """``2 of 8 cells ended in an error: <status> (method @ context[ batch B], ...); ...`` on one line."""
    from dms_perf.bench.report import row_batch

    by_status: dict[str, list[str]] = {}
    for r in failed:
        cell = f"{r['method']} @ {_cell_name(r['context'], row_batch(r))}"
        by_status.setdefault(str(r["status"]), []).append(cell)
    parts = []
    for status, cells in by_status.items():
        shown = ", ".join(cells[:4]) + (f" and {len(cells) - 4} more" if len(cells) > 4 else "")
        parts.append(f"{status.removeprefix('error: ')[:200]} ({shown})")
    return f"{len(failed)} of {total} cells ended in an error: " + "; ".join(parts)


def run_report(args, parser) -> int:
    from dms_perf.bench import capacity_report, stream
    from dms_perf.bench.report import ResultsFileError, ResultsWriter, is_output, merge_results

    # Outputs of commands with files of their own join only with their kind: (kind, file, join, write).
    kinds = (("capacity runs", capacity_report.JSON_NAME, capacity_report.merge_capacity,
              capacity_report.write_capacity_outputs),
             ("request streams", stream.JSON_NAME, stream.merge_streams, stream.write_stream_outputs))
    for kind, json_name, join, write in kinds:
        found = [is_output(path, json_name) for path in args.inputs]
        if not any(found):
            continue
        if not all(found):
            other = next(path for path, ok in zip(args.inputs, found, strict=True) if not ok)
            return _error(parser, f"cannot merge {other}: {kind} join only with {kind} ({json_name})")
        try:
            meta, rows = join(args.inputs)
        except ValueError as exc:  # ResultsFileError too: names the input and what is wrong
            return _error(parser, exc)
        if (problem := _prepare_out(args.out)) is not None:
            return _error(parser, problem)
        print("wrote " + ", ".join(str(f) for f in write(args.out, meta, rows)))
        return 0
    try:
        meta, rows = merge_results(args.inputs, per_model=args.per_model)
    except ResultsFileError as exc:  # names the file and what is wrong with it
        return _error(parser, f"cannot merge {exc}")
    except ValueError as exc:  # runs that do not join: names the run and what differs
        return _error(parser, exc)
    if (problem := _prepare_out(args.out)) is not None:
        return _error(parser, problem)
    try:
        writer = ResultsWriter(args.out, meta)
    except OSError as exc:
        return _error(parser, f"--out {args.out}: cannot write results.json: {exc.strerror or exc}")
    for row in rows:
        writer.add(row)
    print("wrote " + ", ".join(str(f) for f in writer.finish()))
    return 0


def run_methods(args, parser) -> int:
    from dms_perf.bench.methods import format_methods_table

    print(format_methods_table())
    print("\nR: the fraction of the prompt's KV pairs removed, in [0, 1); write e.g. snapkv:0.25 (family alone = "
          "its default).")
    print(f"bench --methods default here ({'GPU' if HAS_CUDA else 'CPU'}): {_defaults()['methods']}")
    return 0


def _reason(what: str, exc: Exception) -> str:
    return f"error: {what}: {type(exc).__name__}: {exc}".splitlines()[0][:240]


if __name__ == "__main__":
    sys.exit(main())
