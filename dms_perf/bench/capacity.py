"""``dms-perf capacity``: the largest batch each method decodes within a memory budget, and its throughput.

    dms-perf capacity                                # CPU: tiny random model, 128 tokens, a small fixed budget
    dms-perf capacity --contexts 32k --methods dms-triton,dense-triton --model qwen3-8b --out results-capacity/

For every (context, method): ``dms_perf.bench.batch_search`` searches the batch sizes, each tried batch
measured, not predicted (one prefilled sequence copied into every slot, peak memory against the budget).
Every tried batch is recorded with its verdict. Writes ``capacity.json``, ``capacity.md`` and
``throughput_vs_batch.png`` to ``--out``. The options it shares with ``dms-perf bench`` (contexts, methods,
model, dtype, calibration, seed) are ``dms_perf.bench.options``'s, its model building and calibration
``dms_perf.bench.methods``'s, its writer and plot ``dms_perf.bench.report``'s.

The CLI wires this in with ``add_parser(subparsers)``; ``run(args)`` returns the exit code.
``python -m dms_perf.bench.capacity`` runs it on its own.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench import options
from dms_perf.bench.batch_search import (
    BATCH_FILL,
    Prompt,
    Search,
    Try,
    beyond_the_pages,
    gib,
    guess_from_pages,
    measure_batch,
    measure_generation_batch,
    pages_from_file,
    room_for_pool,
    search_largest_batch,
    sequence_bytes,
)
from dms_perf.bench.capacity_report import JSON_NAME, MD_NAME, PLOT_NAME, CapacityWriter, render_summary
from dms_perf.bench.floors import config_weight_bytes, weight_bytes
from dms_perf.bench.report import _num

# Without a GPU the budget is a small fixed one (not the host's RAM): at the tiny model's 128 tokens,
# 0.004 GiB holds ~9 dense sequences and ~15 DMS ones (8x) next to the weights, so the default run shows the
# difference; 0.05 GiB would let both methods reach the --max-batch ceiling of 64.
CPU_BUDGET_GIB = 0.004
DEFAULT_METHODS = "dms-triton,dense-triton"
CPU_DEFAULTS = {"contexts": "128", "methods": DEFAULT_METHODS, **options.CPU_MODEL, "max_batch": 64, "steps": 2,
                "warmup_steps": 0}
# Two untimed steps on a GPU: the first runs eagerly (compiles, warms up), the second captures the CUDA
# graph that the timed steps replay (dms_perf.model.graph).
GPU_DEFAULTS = {"contexts": "32k", "methods": DEFAULT_METHODS, **options.GPU_MODEL, "max_batch": 1024, "steps": 8,
                "warmup_steps": 2}


class UsageError(ValueError):
    """A bad command line: reported as one line on stderr, exit code 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``capacity`` sub-command to an ``add_subparsers()`` object; returns its parser."""
    from dms_perf.bench.methods import FAMILIES, describe_methods

    d = GPU_DEFAULTS if HAS_CUDA else CPU_DEFAULTS
    budget_default = ("the card's free memory at start (torch.cuda.mem_get_info)" if HAS_CUDA
                      else f"{CPU_BUDGET_GIB} GiB without a GPU (a small fixed budget, not the host's RAM)")
    taken = [f for f in FAMILIES.values() if f.backend is not None]
    refused = [f.name for f in FAMILIES.values() if f.backend is None]
    parser = subparsers.add_parser(
        "capacity",
        help="largest batch per method within a memory budget, and decode throughput up to it",
        description=textwrap.fill(
        "For each method and context length, search the largest batch whose decode fits a memory budget "
        "(doubling from 1, then bisection; every tried batch is recorded with why it fit or not) and "
        "time the decode at each tried batch. Memory is measured: on a GPU the peak allocated memory of "
        "filling the batch and decoding it (weights, KV cache, activations); without a GPU an estimate "
        "(weights + KV cache bytes). Every slot holds a copy of one prefilled sequence's cache. Writes "
        f"{JSON_NAME}, {MD_NAME} and {PLOT_NAME}. A budget below the model's weights is refused at once.", 100)
        + "\n\n" + options.defaults_text(CPU_DEFAULTS, GPU_DEFAULTS),
        epilog="capacity takes the methods whose model keeps a DMS cache, listed below (R = fraction of the "
        f"prompt's KV pairs removed); it refuses {', '.join(refused[:-1])} and {refused[-1]}, which keep no DMS "
        "cache to fill:\n"
        + describe_methods(taken),
        formatter_class=options.HelpFormatter,
    )
    options.add_workload_options(parser, d, methods_help="comma-separated methods whose model keeps a DMS cache "
                                 "(the list below)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                        help=f"memory the weights, KV cache and decode activations may take, in GiB "
                        f"(default: {budget_default})")
    parser.add_argument("--max-batch", type=int, default=d["max_batch"], metavar="N",
                        help="search ceiling (largest batch tried)")
    parser.add_argument("--steps", type=int, default=d["steps"], metavar="N",
                        help="decode steps timed at each tried batch")
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], metavar="N",
                        help="untimed decode steps before the timed ones (compilation, CUDA-graph capture)")
    parser.add_argument("--new-tokens", default="0", metavar="N",
                        help="long generations: the largest batch whose whole generation of N tokens (e.g. 16k) "
                        "fits the budget on the decode engine's paged KV pool, measured at its end, with the "
                        "decode throughput over the whole generation (engine methods only; batch 1 is measured, "
                        "the batch its pages predict is tried next). 0: the prompt regime above (--steps)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="a search starts no new try once its longest try so far would end more than SECONDS "
                        "after the search began; its largest batch is then a lower bound, and the report says "
                        "which batch was not tried (default: no limit)")
    parser.add_argument("--guess-from", default=None, metavar="CAPACITY_JSON",
                        help="with --new-tokens: skip batch 1 and try first the batch that the most pages one "
                        "sequence held in an earlier run's capacity.json (same model, context, method and "
                        "--new-tokens) predicts for this budget")
    options.add_model_options(parser, d)
    parser.add_argument("--out", default="results-capacity", metavar="DIR", help="output directory")
    parser.set_defaults(run=run, command_parser=parser)
    return parser


@dataclass
class Settings:
    contexts: tuple[int, ...]
    methods: list  # dms_perf.bench.methods.Method
    budget: int  # bytes
    budget_source: str
    max_batch: int
    steps: int
    warmup_steps: int
    new_tokens: int = 0  # > 0: long generations (measure_generation_batch)
    time_limit: float | None = None  # seconds a search may start tries in (None: no limit)
    held_pages: dict = field(default_factory=dict)  # --guess-from: (context, method name) -> pages a sequence held


def validate(args) -> Settings:
    """The checked options (raises UsageError with a one-line message), the budget against the weights
    included (counted from the config, before any model is built)."""
    from dms_perf.bench.methods import FAMILIES, check_model, config_of, resolve_methods

    try:
        contexts = options.parse_context_lengths(args.contexts)
        methods = resolve_methods(args.methods)
        options.check_target_cr(args.target_cr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not contexts:
        raise UsageError(f"--contexts gave no context length: {args.contexts!r}")
    refused = [m.name for m in methods if not m.is_dms]
    if refused:
        usable = ", ".join(f.name for f in FAMILIES.values() if f.backend is not None)
        raise UsageError(f"capacity measures methods whose model keeps a DMSCache; {', '.join(refused)} "
                         f"{'does' if len(refused) == 1 else 'do'} not (no DMSCache to fill): use {usable}")
    for name in ("max_batch", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise UsageError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.memory_budget is not None:
        if not (math.isfinite(args.memory_budget) and args.memory_budget > 0):
            raise UsageError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
        budget, source = round(args.memory_budget * 2**30), "--memory-budget"
    elif HAS_CUDA:
        budget, source = torch.cuda.mem_get_info()[0], "the card's free memory at start (torch.cuda.mem_get_info)"
    else:
        budget = round(CPU_BUDGET_GIB * 2**30)
        source = "CPU default, a small fixed budget rather than the host's RAM; --memory-budget sets another"
    try:
        check_model(args.model)
        weights = config_weight_bytes(config_of(args.model), options.DTYPES[args.dtype])
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        new_tokens = 0 if str(args.new_tokens).strip() == "0" else options.parse_token_count(str(args.new_tokens))
    except ValueError as exc:
        raise UsageError(f"--new-tokens: {exc}") from None
    if new_tokens:
        not_engine = [m.name for m in methods if not m.family.fused]
        if not_engine:
            raise UsageError("--new-tokens measures methods on the decode engine (paged KV pool); "
                             f"{', '.join(not_engine)} decode elsewhere: use the -triton methods")
        if (problem := options.positions_problem(args.model, contexts, new_tokens)) is not None:
            raise UsageError(problem)
    elif (problem := options.positions_problem(args.model, contexts, args.warmup_steps + args.steps + 1)) is not None:
        raise UsageError(problem.replace("--new-tokens", "decode steps"))
    held_pages = {}
    if args.guess_from is not None:
        if not new_tokens:
            raise UsageError("--guess-from predicts long generations' batches: give --new-tokens too")
        try:
            held_pages = {(ctx, m.name): pages_from_file(args.guess_from, ctx, m.name, new_tokens, args.model)
                          for ctx in contexts for m in methods}
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if weights > budget:
        raise UsageError(f"the memory budget, {gib(budget)} GiB ({source}), is less than the weights of {args.model} "
                         f"in {args.dtype} alone ({gib(weights)} GiB): no batch can fit")
    return Settings(contexts, methods, budget, source, args.max_batch, args.steps, args.warmup_steps, new_tokens,
                    args.time_limit, held_pages)


def memory_note() -> str:
    if HAS_CUDA:
        return ("peak allocated memory (torch.cuda.max_memory_allocated) from filling the batch to the end of the "
                "timed decode steps: weights, KV cache, decode activations, CUDA-graph pools")
    return ("CPU estimate: weights + the batch's KV cache bytes (DMSCache.kv_bytes) after the decode steps; "
            "activations not counted")


def _result(context: int, method: str, search: Search, extra: dict[str, Any]) -> dict[str, Any]:
    best = search.best
    return {
        "context": context, "method": method, "largest_batch": search.largest,
        "tok_s": best.tok_s if best else None, "step_ms": best.step_ms if best else None,
        "peak_bytes": best.peak_bytes if best else None, "ceiling_reached": search.ceiling_reached,
        "stopped": search.stopped, **extra, "tries": [asdict(t) for t in search.tries],
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args, parser=None) -> int:
    """``dms-perf capacity`` with parsed ``args``; returns the exit code (2: bad options, one line on stderr).

    ``parser`` is accepted, unused, so that the CLI's ``args.run(args, parser)`` dispatch works too."""
    from dms_perf.bench.device import device_info
    from dms_perf.bench.generation import failure_status, release_memory
    from dms_perf.bench.methods import calibration_record, group_by_backend, is_model_path, load_model_for, weights_note

    try:
        settings = validate(args)
    except UsageError as exc:
        print(f"dms-perf capacity: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    real_weights = is_model_path(args.model)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_info(), "model": args.model, "dtype": args.dtype,
        "weights": weights_note(args.model, settings.methods, args.target_cr),
        "memory_budget_bytes": settings.budget, "memory_budget_gib": settings.budget / 2**30,
        "memory_budget_source": settings.budget_source, "memory": memory_note(),
        "contexts": list(settings.contexts), "methods": [m.name for m in settings.methods],
        "max_batch": settings.max_batch, "steps": settings.steps, "warmup_steps": settings.warmup_steps,
        "new_tokens": settings.new_tokens, "time_limit_s": settings.time_limit, "guess_from": args.guess_from,
        "batch_fill": BATCH_FILL,
        "search": (SEARCH_PROMPT if not settings.new_tokens else SEARCH_GENERATION if args.guess_from is None
                   else f"{SEARCH_GENERATION}; batch 1 not run: its pages are the most one sequence held in "
                   f"{args.guess_from}"),
        "seed": args.seed, "target_cr": args.target_cr, "calibration": {},
        "command": "dms-perf " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
    }
    _progress(f"memory budget {gib(settings.budget)} GiB ({settings.budget_source}); memory: {meta['memory']}")
    _progress(f"batch fill: {BATCH_FILL} (prefilling B long prompts would take minutes)")
    writer = CapacityWriter(args.out, meta)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {ctx: torch.randint(0, 2**31 - 1, (1, ctx), generator=generator) for ctx in settings.contexts}
    try:
        for backend, group in group_by_backend(settings.methods).items():
            _progress(f"building {args.model} ({backend} backend) for {', '.join(m.name for m in group)}")
            try:
                model, calibration = load_model_for(args.model, group[0], dtype=options.DTYPES[args.dtype],
                                                    device=device, seed=args.seed,
                                                    target_cr=None if real_weights else args.target_cr)
            except Exception as exc:  # the other backends can still run
                reason = f"error: model build failed: {failure_status(exc).removeprefix('error: ')}"
                for m in group:
                    for ctx in settings.contexts:
                        writer.add(_result(ctx, m.name, Search(stopped=reason), {}))
                release_memory()
                continue
            if calibration is not None:
                writer.meta["calibration"][backend] = calibration_record(calibration)
            for m in group:
                m.prepare(model)
                for ctx in settings.contexts:
                    writer.add(_search(model, m, ctx, (prompts[ctx] % model.config.vocab_size).to(device), settings))
            del model
            release_memory()
    finally:  # an interrupted run still gets its table and plot for what was measured
        files = writer.finish()
    print(render_summary(writer.meta, writer.ordered()))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


SEARCH_PROMPT = ("doubling from 1 until a batch does not fit or --max-batch, then bisection between the last batch "
                 "that fit and the first that did not")
SEARCH_GENERATION = ("batch 1, then the batch its pages predict (the most copies of the pages the one sequence held "
                     "whose pool, tables included, fits what the budget leaves), then the batch above it (recorded "
                     "without running it when the method evicts nothing and its pages cannot fit); a wrong "
                     "prediction falls back to doubling (from above it) or bisection (below it)")


def _search(model, method, ctx: int, input_ids: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """The result of one (context, method): one sequence's bytes, then the search over batch sizes."""
    from dms_perf.bench.generation import failure_status, release_memory

    prompt = Prompt(model, input_ids, method=method)
    extra = {"weights_bytes": weight_bytes(model)}
    try:
        extra.update(sequence_bytes(prompt))
    except Exception as exc:
        _progress(f"{method.name} @ {ctx}: one sequence failed: {failure_status(exc)}")
        release_memory()

    started, longest = time.perf_counter(), [0.0]

    def attempt(batch):
        begun = time.perf_counter()
        if settings.new_tokens:
            result = measure_generation_batch(prompt, batch, new_tokens=settings.new_tokens, budget=settings.budget)
        else:
            result = measure_batch(prompt, batch, steps=settings.steps, warmup_steps=settings.warmup_steps,
                                   budget=settings.budget)
        _progress(f"{method.name} @ {ctx} tokens, batch {batch}: {result.reason}"
                  + (f", peak {gib(result.peak_bytes)} GiB" if result.peak_bytes else "")
                  + (f", {_num(result.step_ms)} ms/step" if result.step_ms else ""))
        longest[0] = max(longest[0], time.perf_counter() - begun)
        return result

    def stop(batch) -> str | None:
        """The time limit: the next try would run at least as long as the longest so far."""
        if settings.time_limit is None:
            return None
        elapsed = time.perf_counter() - started
        if elapsed + longest[0] <= settings.time_limit:
            return None
        why = (f"--time-limit {settings.time_limit:g} s ({elapsed:.0f} s spent, the longest try took "
               f"{longest[0]:.0f} s); the largest batch may be higher")
        _progress(f"{method.name} @ {ctx} tokens: batch {batch} not tried: {why}")
        return why

    long_run = bool(settings.new_tokens)
    start = None
    if (held := settings.held_pages.get((ctx, method.name))) is not None:
        start = guess_from_pages(Try(0, True, "--guess-from", kv_pages=held,
                                     free_bytes=room_for_pool(model, settings.budget)), model)
        _progress(f"{method.name} @ {ctx} tokens: a sequence held {held:,} pages in --guess-from's run: "
                  f"batch {start} tried first")
    search = search_largest_batch(
        attempt, settings.max_batch, stop=stop, start=start,
        guess=(lambda first: guess_from_pages(first, model)) if long_run else None,
        # a method that keeps every decoded row holds known pages: a batch beyond them need not run
        excluded=beyond_the_pages(model) if long_run and not method.evicts else None)
    prompt.release()
    return _result(ctx, method.name, search, extra)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dms_perf.bench.capacity [options]``: ``dms-perf capacity`` on its own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dms-perf", description="Benchmarks for DMS KV-cache compression.")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["capacity", *argv])
    args.argv = ["capacity", *argv]
    return args.run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
