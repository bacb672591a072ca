"""``dms-perf capacity``: the largest batch each method decodes within a memory budget, and its throughput.

    dms-perf capacity                                # CPU: tiny random model, 128 tokens, a small fixed budget
    dms-perf capacity --contexts 32k --methods dms-triton,dense-triton --model qwen3-8b --out results-capacity/

For every (context, method): a search over batch sizes (``search_largest_batch``: doubling from 1 until a
batch does not fit or ``--max-batch`` is reached, then bisection between the last batch that fit and the
first that did not) where each tried batch B is measured, not predicted (``measure_batch``):

* one prompt of the context length is prefilled and its cache copied into all B slots
  (``fill_batch``, ``DMSCache.stacked``): prefilling B long prompts would take minutes, and every slot
  then holds as many bytes as a distinct prompt of that length would. The engine families (``fused``)
  fill a KV pool of exactly the batch's rows (``DMSCache.repeated``; on a GPU the template waits on the
  host meanwhile, so that it is not one more sequence in the peak) and decode with the pool's graphs;
  a press on the engine fills with its compressed prefill cache;
* ``--warmup-steps`` untimed and ``--steps`` timed greedy decode steps run on the batch;
* peak memory: on a GPU ``torch.cuda.max_memory_allocated()`` from just before the batch is filled to
  the end of the timed steps (weights, KV cache, decode activations and CUDA-graph pools); without a GPU an
  estimate, weights + ``cache.kv_bytes()`` (activations not counted).

B fits iff nothing raised (an out-of-memory error is "OOM") and the peak is within the budget. Every tried
batch is recorded with its verdict. Writes ``capacity.json``, ``capacity.md`` and
``throughput_vs_batch.png`` to ``--out``.

The CLI wires this in with ``add_parser(subparsers)``; ``run(args)`` returns the exit code.
``python -m dms_perf.bench.capacity`` runs it on its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.options import HelpFormatter
from dms_perf.bench.report import no_gpu

JSON_NAME = "capacity.json"
MD_NAME = "capacity.md"
PLOT_NAME = "throughput_vs_batch.png"
DASH = "—"
BATCH_FILL = "one prefilled sequence copied into every slot"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Without a GPU the budget is a small fixed one (not the host's RAM): at the tiny model's 128 tokens,
# 0.004 GiB holds ~9 dense sequences and ~15 DMS ones (8x) next to the weights, so the default run shows the
# difference; 0.05 GiB would let both methods reach the --max-batch ceiling of 64.
CPU_BUDGET_GIB = 0.004
CPU_DEFAULTS = {"contexts": "128", "model": "tiny", "dtype": "float32", "max_batch": 64, "steps": 2,
                "warmup_steps": 0}
# Two untimed steps on a GPU: the first runs eagerly (compiles, warms up), the second captures the CUDA
# graph that the timed steps replay (dms_perf.model.graph).
GPU_DEFAULTS = {"contexts": "32k", "model": "qwen3-8b", "dtype": "bfloat16", "max_batch": 1024, "steps": 8,
                "warmup_steps": 2}
DEFAULT_METHODS = "dms-triton,dense-triton"


class UsageError(ValueError):
    """A bad command line: reported as one line on stderr, exit code 2."""


def _defaults() -> dict[str, Any]:
    return GPU_DEFAULTS if HAS_CUDA else CPU_DEFAULTS


# --- the search ------------------------------------------------------------------------------------------


@dataclass
class Try:
    """One tried batch size: whether it fits, why (not), and what was measured."""

    batch: int
    fits: bool
    reason: str  # "ok", "over budget: X GiB > Y GiB", "OOM" or "error: ..."
    peak_bytes: int | None = None
    step_ms: float | None = None
    tok_s: float | None = None  # batch / step seconds: tokens of all sequences per second
    kv_bytes: int | None = None  # the batch's KV cache (every slot), at the end of the steps

    @property
    def fatal(self) -> bool:
        """A failure that says nothing about capacity (a bug, a bad input): the search stops there."""
        return not self.fits and self.reason.startswith("error")


@dataclass
class Search:
    tries: list[Try] = field(default_factory=list)
    largest: int = 0  # the largest batch that fit; 0 when batch 1 did not
    ceiling_reached: bool = False  # every batch up to --max-batch fit: the true largest may be higher
    stopped: str | None = None  # "batch 8: error: ..." when an error ended the search early

    @property
    def best(self) -> Try | None:
        """The try of the largest batch that fit."""
        return next((t for t in self.tries if t.fits and t.batch == self.largest), None)


def search_largest_batch(try_batch: Callable[[int], Try], max_batch: int) -> Search:
    """The largest batch in ``1 .. max_batch`` for which ``try_batch(batch).fits``, assuming that fitting is
    monotone (a batch fits if a larger one does).

    Doubling from 1 (1, 2, 4, ..., then ``max_batch`` itself if it is no power of two) until a batch does not
    fit, then bisection between the last batch that fit and the first that did not: about
    ``2 log2(answer)`` tries, every one kept in ``tries`` in the order tried. A try whose failure is an error
    (``Try.fatal``) ends the search there: the answer is then the largest batch that fit before it.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    search = Search()

    def attempt(batch: int) -> Try:
        result = try_batch(batch)
        search.tries.append(result)
        if result.fatal:
            search.stopped = f"batch {batch}: {result.reason}"
        return result

    fit, fail = 0, None  # the largest batch that fit, the smallest that did not
    batch = 1
    while True:
        result = attempt(batch)
        if not result.fits:
            fail = batch
            break
        fit = batch
        if batch == max_batch:
            search.ceiling_reached = True
            break
        batch = min(2 * batch, max_batch)
    while fail is not None and fail - fit > 1 and search.stopped is None:
        batch = (fit + fail) // 2
        if attempt(batch).fits:
            fit = batch
        else:
            fail = batch
    search.largest = fit
    return search


# --- measuring one batch -----------------------------------------------------------------------------------


def weight_bytes(model) -> int:
    """Bytes of the model's parameters: what its weights occupy on the device."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_read_bytes(model, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads: every parameter once, except the input
    embedding table, of which the step reads only its ``batch`` tokens' rows (unless the table is also the
    output projection, which reads all of it). The weight part of a decode step's memory floor."""
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() == table.data_ptr():
        return weight_bytes(model)
    rows = min(batch, table.shape[0])
    return weight_bytes(model) - (table.shape[0] - rows) * table.shape[1] * table.element_size()


def fill_batch(template, batch: int, *, consume: bool = False, pool=None):
    """A ``batch``-sequence DMSCache whose every slot is a copy of the single prefilled ``template``.

    ``DMSCache.stacked([template] * batch)``, built layer by layer; ``consume``: empty each of the
    template's layers once copied, so that the template does not count as one more sequence in the peak.
    ``pool``: the batch lives on that KV pool (the decode engine; ``DMSCache.repeated``).
    """
    from dms_perf.model.cache import DMSCache, DMSCacheLayer

    if not isinstance(template, DMSCache):
        raise TypeError(f"the model made a {type(template).__name__}, not a DMSCache")
    if pool is not None:
        return DMSCache.repeated(template, batch, pool=pool, consume=consume)
    if not consume:
        return DMSCache.stacked([template] * batch)
    template.finish_prefill()
    step = template.layers[0].capacity_step
    out = DMSCache(len(template.layers), template.window, step)
    for i, layer in enumerate(template.layers):
        out.layers[i] = DMSCacheLayer.stacked([layer] * batch)
        template.layers[i] = DMSCacheLayer(template.window, step)
    return out


class Prompt:
    """One prompt's prefilled cache, the template every slot of a tried batch copies.

    ``reuse=False`` (on a GPU): every ``prefill()`` prefills afresh and the batch consumes the template, so
    that no template stays allocated beside the batch (it would count as one more sequence in the measured
    peak, and could make a batch that fits run out of memory). ``reuse=True`` (without a GPU, where memory is
    estimated from the batch's cache alone): prefilled once, the template is copied for every try.
    """

    def __init__(self, model, input_ids: torch.Tensor, *, reuse: bool = not HAS_CUDA, method=None):
        self.model, self.input_ids, self.reuse = model, input_ids, reuse
        # A press on the engine prefills with its press (transformers' attention), then hands over its
        # cache; the engine families decode their batch on a KV pool sized for it.
        self.method = method
        self.engine = method is not None and method.family.fused
        self._kept = None

    @property
    def context(self) -> int:
        return self.input_ids.shape[-1]

    def prefill(self):
        """(template DMSCache, first greedy token ``[1, 1]``), in inference mode."""
        if self._kept is not None:
            return self._kept
        with torch.inference_mode():
            if self.method is not None and self.method.family.press_on_engine:
                from dms_perf.bench.generation import prefill_for_the_engine

                press = self.method.press_for(self.model, self.input_ids)
                out, cache = prefill_for_the_engine(self.model, self.input_ids, press)
            else:
                cache = self.model.make_dms_cache(pooled=False)
                out = self.model(input_ids=self.input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            result = cache, out.logits[:, -1:].argmax(-1)
        if self.reuse:
            self._kept = result
        return result

    def release(self) -> None:
        self._kept = None


def _gib(nbytes: int | float | None, digits: int = 4) -> str:
    return DASH if nbytes is None else f"{nbytes / 2**30:.{digits}g}"


def over_budget(peak: int, budget: int, when: str = "") -> str:
    """'over budget: X GiB > Y GiB', with enough digits that the two numbers differ."""
    digits = 4
    while _gib(peak, digits) == _gib(budget, digits) and digits < 12:
        digits += 1
    return f"over budget: {_gib(peak, digits)} GiB > {_gib(budget, digits)} GiB{when}"


def _peak_bytes(model, cache) -> int:
    if HAS_CUDA:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return weight_bytes(model) + cache.kv_bytes()  # CPU estimate: activations not counted


def _decode(model, cache, token, position, steps: int) -> None:
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
        token.copy_(out.logits[:, -1:].argmax(-1))
        position.add_(1)


def _run_batch(prompt: Prompt, batch: int, *, steps: int, warmup_steps: int, budget: int) -> Try:
    model = prompt.model
    template, first = prompt.prefill()
    with torch.inference_mode():
        token = first.repeat(batch, 1)
        del first
        if HAS_CUDA:  # the peak of this batch: from here (weights and the one prefilled sequence allocated)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        pool = None
        if prompt.engine:  # the decode engine: a KV pool of exactly the batch's rows
            from dms_perf.model.pool import KVPool

            if not prompt.reuse:  # parked on the host meanwhile: the template is not one more sequence
                template.to("cpu")
            pool = KVPool.for_model(model, rows=batch * template.segment_rows())
            model.use_kv_pool(pool)
        cache = fill_batch(template, batch, consume=not prompt.reuse, pool=pool)
        del template
        position = torch.full((batch, 1), prompt.context, device=token.device)
        peak = _peak_bytes(model, cache)
        if peak > budget:  # the cache alone is over: no need to decode
            return Try(batch, False, over_budget(peak, budget, " before decoding"), peak, kv_bytes=cache.kv_bytes())
        _decode(model, cache, token, position, warmup_steps)
        if HAS_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _decode(model, cache, token, position, steps)
        if HAS_CUDA:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / steps
        peak = _peak_bytes(model, cache)
        kv = cache.kv_bytes()
    fits = peak <= budget
    return Try(batch, fits, "ok" if fits else over_budget(peak, budget), peak, step_s * 1e3, batch / step_s, kv)


def measure_batch(prompt: Prompt, batch: int, *, steps: int, warmup_steps: int, budget: int) -> Try:
    """Whether ``batch`` sequences of ``prompt`` decode within ``budget`` bytes (see the module docstring);
    never raises for a failing batch, and frees what it allocated either way."""
    from dms_perf.bench.generation import failure_status, release_memory

    prompt.model.release_decode_graph()  # the last batch's graph pool must not count
    release_memory()
    try:
        result = _run_batch(prompt, batch, steps=steps, warmup_steps=warmup_steps, budget=budget)
    except Exception as exc:  # OOM or an error: a verdict, the search goes on
        result = Try(batch, False, failure_status(exc))
    prompt.model.release_decode_graph()  # and this batch's is freed before the next try
    if prompt.engine:
        prompt.model.use_kv_pool(None)
    release_memory()
    return result


def sequence_bytes(prompt: Prompt) -> dict[str, int]:
    """KV-cache bytes of one prefilled sequence: allocated (with spare rows and bookkeeping) and kept K/V."""
    from dms_perf.bench.generation import release_memory

    cache, _ = prompt.prefill()
    sizes = {"sequence_kv_bytes": cache.kv_bytes(), "sequence_kept_kv_bytes": cache.kept_kv_bytes()}
    del cache
    release_memory()
    return sizes


# --- the command -------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``capacity`` sub-command to an ``add_subparsers()`` object; returns its parser."""
    from dms_perf.bench.methods import describe_methods

    d = _defaults()
    budget_default = ("the card's free memory at start (torch.cuda.mem_get_info)" if HAS_CUDA
                      else f"{CPU_BUDGET_GIB} GiB without a GPU (a small fixed budget, not the host's RAM)")
    parser = subparsers.add_parser(
        "capacity",
        help="largest batch per method within a memory budget, and decode throughput up to it",
        description="For each method and context length, search the largest batch whose decode fits a memory "
        "budget (doubling from 1, then bisection; every tried batch is recorded with why it fit or not) and "
        "time the decode at each tried batch. Memory is measured: on a GPU the peak allocated memory of "
        "filling the batch and decoding it (weights, KV cache, activations); without a GPU an estimate "
        "(weights + KV cache bytes). Every slot holds a copy of one prefilled sequence's cache. Writes "
        f"{JSON_NAME}, {MD_NAME} and {PLOT_NAME}. Defaults here ({'GPU' if HAS_CUDA else 'no GPU'}): {d}.",
        epilog="methods with a DMS cache (R = fraction of the prompt's KV pairs removed; the kvpress and "
        "vanilla methods keep no DMSCache and are refused):\n" + describe_methods(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--contexts", default=d["contexts"],
                        help="comma-separated prompt lengths in tokens, e.g. 32k or 8k,32k")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated methods whose model keeps a DMSCache (dms-*, dense-triton)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                        help=f"memory the weights, KV cache and decode activations may take, in GiB "
                        f"(default: {budget_default})")
    parser.add_argument("--max-batch", type=int, default=d["max_batch"], help="search ceiling (largest batch tried)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="decode steps timed at each tried batch")
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"],
                        help="untimed decode steps before the timed ones (compilation, CUDA-graph capture)")
    parser.add_argument("--model", default=d["model"],
                        help="'tiny' (random tiny Qwen3), 'qwen3-8b' (random weights, Qwen3-8B-DMS shape) or a "
                        "local checkpoint directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=d["dtype"], help="model weights and activations")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    parser.add_argument("--target-cr", type=float, default=8.0,
                        help="with random weights, calibrate DMS eviction to this compression ratio "
                        "(docs/DMS.md); 0 keeps the config's offset. Ignored for checkpoints")
    parser.add_argument("--out", default="results-capacity", help="output directory")
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


def validate(args) -> Settings:
    """The checked options (raises UsageError with a one-line message)."""
    from dms_perf.bench.methods import FAMILIES, resolve_methods
    from dms_perf.bench.options import parse_context_lengths

    try:
        contexts = parse_context_lengths(args.contexts)
        methods = resolve_methods(args.methods)
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
    if args.target_cr != 0 and args.target_cr < 1:
        raise UsageError(f"--target-cr must be 0 (off) or >= 1, got {args.target_cr}")
    if args.memory_budget is not None:
        if not (math.isfinite(args.memory_budget) and args.memory_budget > 0):
            raise UsageError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
        budget, source = round(args.memory_budget * 2**30), "--memory-budget"
    elif HAS_CUDA:
        budget, source = torch.cuda.mem_get_info()[0], "the card's free memory at start (torch.cuda.mem_get_info)"
    else:
        budget = round(CPU_BUDGET_GIB * 2**30)
        source = "CPU default, a small fixed budget rather than the host's RAM; --memory-budget sets another"
    return Settings(contexts, methods, budget, source, args.max_batch, args.steps, args.warmup_steps)


def _weights_note(args, methods) -> str:
    from dms_perf.bench.methods import is_model_path

    if is_model_path(args.model):
        return f"real weights from {args.model}"
    if args.target_cr and any(m.evicts for m in methods):
        return f"random weights, eviction calibrated to {args.target_cr:g}x"
    return "random weights"


def memory_note() -> str:
    if HAS_CUDA:
        return ("peak allocated memory (torch.cuda.max_memory_allocated) from filling the batch to the end of the "
                "timed decode steps: weights, KV cache, decode activations, CUDA-graph pools")
    return ("CPU estimate: weights + the batch's KV cache bytes (DMSCache.kv_bytes) after the decode steps; "
            "activations not counted")


class CapacityWriter:
    """capacity.json, rewritten after every (context, method), then capacity.md and the plot."""

    def __init__(self, out_dir: str | os.PathLike, meta: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.results: list[dict[str, Any]] = []
        self.write_json()

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        self.write_json()

    def ordered(self) -> list[dict[str, Any]]:
        methods = self.meta["methods"]
        return sorted(self.results, key=lambda r: (r["context"], methods.index(r["method"])))

    def write_json(self) -> Path:
        path = self.out_dir / JSON_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "results": self.ordered()}, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def finish(self) -> list[Path]:
        results = self.ordered()
        md = self.out_dir / MD_NAME
        md.write_text(render_markdown(self.meta, results))
        plot = self.out_dir / PLOT_NAME
        build_figure(self.meta, results).savefig(plot, dpi=120, bbox_inches="tight")
        return [self.write_json(), md, plot]


def _result(context: int, method: str, search: Search, extra: dict[str, Any]) -> dict[str, Any]:
    best = search.best
    return {
        "context": context,
        "method": method,
        "largest_batch": search.largest,
        "tok_s": best.tok_s if best else None,
        "step_ms": best.step_ms if best else None,
        "peak_bytes": best.peak_bytes if best else None,
        "ceiling_reached": search.ceiling_reached,
        "stopped": search.stopped,
        **extra,
        "tries": [asdict(t) for t in search.tries],
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args, parser=None) -> int:
    """``dms-perf capacity`` with parsed ``args``; returns the exit code (2: bad options, one line on stderr).

    ``parser`` is accepted, unused, so that the CLI's ``args.run(args, parser)`` dispatch works too."""
    from dms_perf.bench.device import device_info
    from dms_perf.bench.generation import failure_status, release_memory
    from dms_perf.bench.methods import is_model_path, load_model_for

    try:
        settings = validate(args)
    except UsageError as exc:
        print(f"dms-perf capacity: error: {exc}", file=sys.stderr)
        return 2
    real_weights = is_model_path(args.model)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_info(),
        "model": args.model,
        "dtype": args.dtype,
        "weights": _weights_note(args, settings.methods),
        "memory_budget_bytes": settings.budget,
        "memory_budget_gib": settings.budget / 2**30,
        "memory_budget_source": settings.budget_source,
        "memory": memory_note(),
        "contexts": list(settings.contexts),
        "methods": [m.name for m in settings.methods],
        "max_batch": settings.max_batch,
        "steps": settings.steps,
        "warmup_steps": settings.warmup_steps,
        "batch_fill": BATCH_FILL,
        "search": "doubling from 1 until a batch does not fit or --max-batch, then bisection between the last "
        "batch that fit and the first that did not",
        "seed": args.seed,
        "target_cr": args.target_cr,
        "calibration": {},
        "command": "dms-perf " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
    }
    _progress(f"memory budget {_gib(settings.budget)} GiB ({settings.budget_source}); memory: {meta['memory']}")
    _progress(f"batch fill: {BATCH_FILL} (prefilling B long prompts would take minutes)")
    writer = CapacityWriter(args.out, meta)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {}  # context -> input ids, one prompt for every method
    for ctx in settings.contexts:
        prompts[ctx] = torch.randint(0, 2**31 - 1, (1, ctx), generator=generator)

    # One model alive at a time: methods of one backend share the model built for it (as dms-perf bench).
    by_backend: dict[str | None, list] = {}
    for m in settings.methods:
        by_backend.setdefault(m.backend, []).append(m)
    try:
        for backend, group in by_backend.items():
            _progress(f"building {args.model} ({backend} backend) for {', '.join(m.name for m in group)}")
            try:
                model, calibration = load_model_for(args.model, group[0], dtype=dtype, device=device, seed=args.seed,
                                                    target_cr=None if real_weights else args.target_cr)
            except Exception as exc:  # the other backends can still run
                reason = f"error: model build failed: {failure_status(exc).removeprefix('error: ')}"
                for m in group:
                    for ctx in settings.contexts:
                        writer.add(_result(ctx, m.name, Search(stopped=reason), {}))
                release_memory()
                continue
            if calibration is not None:
                meta["calibration"][backend] = {
                    "alpha_offset": calibration.alpha_offset, "marked_fraction": calibration.marked_fraction,
                    "target_cr": calibration.target_cr, "compression_ratio": calibration.compression_ratio,
                }
            weights = weight_bytes(model)
            for m in group:
                m.prepare(model)
                for ctx in settings.contexts:
                    prompt = Prompt(model, (prompts[ctx] % model.config.vocab_size).to(device), method=m)
                    try:
                        extra = {"weights_bytes": weights, **sequence_bytes(prompt)}
                    except Exception as exc:
                        extra = {"weights_bytes": weights}
                        _progress(f"{m.name} @ {ctx}: one sequence failed: {failure_status(exc)}")
                        release_memory()

                    def attempt(batch, prompt=prompt, m=m, ctx=ctx):
                        result = measure_batch(prompt, batch, steps=settings.steps,
                                               warmup_steps=settings.warmup_steps, budget=settings.budget)
                        _progress(f"{m.name} @ {ctx} tokens, batch {batch}: {result.reason}"
                                  + (f", peak {_gib(result.peak_bytes)} GiB" if result.peak_bytes else "")
                                  + (f", {_num(result.step_ms)} ms/step" if result.step_ms else ""))
                        return result

                    search = search_largest_batch(attempt, settings.max_batch)
                    prompt.release()
                    del prompt
                    writer.add(_result(ctx, m.name, search, extra))
            del model
            release_memory()
    finally:  # an interrupted run still gets its table and plot for what was measured
        files = writer.finish()
    print(render_summary(meta, writer.ordered()))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


# --- tables and the plot -------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _largest(result: dict[str, Any]) -> str:
    text = str(result["largest_batch"])
    if result["ceiling_reached"]:
        text += " (--max-batch)"
    elif result["largest_batch"] == 0:
        text += f" (batch 1 does not fit: {result['tries'][0]['reason']})" if result["tries"] else \
            f" ({result['stopped']})"
    if result["stopped"] and result["largest_batch"]:
        text += f" (search stopped at {result['stopped']})"
    return text


def _card(meta: dict[str, Any]) -> str:
    return "CPU (no GPU)" if no_gpu(meta) else (meta.get("device") or {}).get("gpu", "unknown card")


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| context | method | largest batch | tok/s at it | ms/step | peak GiB |",
             "|---:|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['context']} | {r['method']} | {_largest(r)} | {_num(r['tok_s'])} | "
                     f"{_num(r['step_ms'])} | {_gib(r['peak_bytes'])} |")
    return "\n".join(lines)


def _caveats(meta: dict[str, Any]) -> list[str]:
    notes = [meta["weights"]]
    if no_gpu(meta) and any("triton" in m for m in meta["methods"]):
        notes.append("Triton kernels ran in Triton's interpreter on the CPU: the times are not speeds")
    return notes


def render_summary(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The console's view: what was measured, then the table."""
    return "\n".join([
        f"capacity: {meta['model']} {meta['dtype']} on {_card(meta)}, budget {_gib(meta['memory_budget_bytes'])} GiB "
        f"({meta['memory_budget_source']})",
        f"memory: {meta['memory']}",
        f"batch fill: {meta['batch_fill']}; {'; '.join(_caveats(meta))}",
        "",
        summary_table(results),
    ])


def render_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    out = [
        "# Capacity: largest batch within a memory budget",
        "",
        f"- model: {meta['model']} ({meta['dtype']}), {meta['weights']}",
        f"- card: {_card(meta)}",
        f"- memory budget: {_gib(meta['memory_budget_bytes'])} GiB ({meta['memory_budget_source']})",
        f"- memory measured: {meta['memory']}",
        f"- batch fill: {meta['batch_fill']} (prefilling B long prompts would take minutes; every slot holds "
        "as many bytes as a distinct prompt of that length)",
        f"- search: {meta['search']} (ceiling {meta['max_batch']})",
        f"- throughput: {meta['steps']} timed greedy decode steps per tried batch after {meta['warmup_steps']} "
        "untimed; tok/s = batch / step time",
        f"- date: {meta['date']}",
    ]
    out += [f"- note: {c}" for c in _caveats(meta)[1:]]
    out += ["", "## Largest batch per method", "", summary_table(results), "", "## Every tried batch", ""]
    for r in results:
        out += [f"### {r['method']} at {r['context']} tokens", ""]
        if not r["tries"]:
            out += [f"Nothing tried: {r['stopped']}", ""]
            continue
        if r.get("sequence_kv_bytes") is not None:
            out += [f"One sequence's KV cache: {r['sequence_kv_bytes']:,} bytes allocated "
                    f"({r['sequence_kept_kv_bytes']:,} of them kept K/V); weights {r['weights_bytes']:,} bytes.", ""]
        out += ["| try | batch | fits | reason | peak GiB | ms/step | tok/s |", "|---:|---:|---|---|---:|---:|---:|"]
        for i, t in enumerate(r["tries"], 1):
            out.append(f"| {i} | {t['batch']} | {'yes' if t['fits'] else 'no'} | {t['reason']} | "
                       f"{_gib(t['peak_bytes'])} | {_num(t['step_ms'])} | {_num(t['tok_s'])} |")
        out.append("")
    return "\n".join(out)


def build_figure(meta: dict[str, Any], results: list[dict[str, Any]]):
    """tok/s against batch (log2 axis) for every batch that fit, one panel per context; each method's largest
    batch marked; a method that fit no batch is named in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    from dms_perf.bench.report import method_styles

    contexts = list(dict.fromkeys(r["context"] for r in results)) or meta["contexts"]
    styles = method_styles(meta["methods"])
    fig = Figure(figsize=(10.5, 1.2 + 4.0 * len(contexts)), layout="constrained")
    FigureCanvasAgg(fig)
    title = (f"Decode throughput vs batch: {meta['model']} {meta['dtype']} on {_card(meta)}, "
             f"budget {_gib(meta['memory_budget_bytes'])} GiB, {meta['date']}")
    lines = [title]
    for k, note in enumerate([*_caveats(meta), meta["batch_fill"]]):  # notes under the title, ~100 characters a line
        if k and len(lines[-1]) + len(note) < 100:
            lines[-1] += f"; {note}"
        else:
            lines.append(note)
    fig.suptitle("\n".join(lines), fontsize=10)
    axes = fig.subplots(len(contexts), 1, squeeze=False)[:, 0]
    for ax, ctx in zip(axes, contexts, strict=True):
        largest_x, drawn = 1, False
        for r in (r for r in results if r["context"] == ctx):
            colour, marker = styles[r["method"]]
            fit = sorted((t["batch"], t["tok_s"]) for t in r["tries"] if t["fits"] and t["tok_s"])
            if not fit:
                why = r["tries"][0]["reason"] if r["tries"] else r["stopped"]
                ax.plot([], [], color=colour, marker=marker, linestyle="none",
                        label=f"{r['method']}: batch 1 does not fit\n({why})")
                continue
            drawn = True
            xs, ys = zip(*fit, strict=True)
            largest_x = max(largest_x, xs[-1])
            label = f"{r['method']}: largest batch {r['largest_batch']}"
            failed = [t for t in r["tries"] if not t["fits"] and t["batch"] > r["largest_batch"]]
            if r["ceiling_reached"]:
                label += " (the --max-batch ceiling)"
            elif failed:
                first = min(failed, key=lambda t: t["batch"])
                label += f"\n({first['batch']}: {first['reason'].split(':')[0]})"
            ax.plot(xs, ys, color=colour, marker=marker, markersize=5, linewidth=1.4, label=label)
            best = r["largest_batch"]
            best_tok_s = dict(fit).get(best)
            if best_tok_s is not None:
                ax.plot([best], [best_tok_s], marker="o", markersize=13, markerfacecolor="none", color=colour,
                        markeredgewidth=1.6, linestyle="none")
                ax.annotate(f"max {best}\n{_num(best_tok_s)} tok/s", (best, best_tok_s), textcoords="offset points",
                            xytext=(0, 12), ha="center", fontsize=8, color=colour)
        ticks = [2**k for k in range(math.ceil(math.log2(largest_x)) + 1)]
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(2**-0.4, ticks[-1] * 2**0.4)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.18)  # room for the labels of the maxima
        if not drawn:
            ax.text(0.5, 0.5, "no method fits batch 1 within the budget", transform=ax.transAxes, ha="center",
                    va="center")
            ax.set_yticks([])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _num(v) if v else "0"))
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_ylabel("decode tok/s (all sequences)")
        ax.set_title(f"{ctx:,} tokens of context", fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


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
