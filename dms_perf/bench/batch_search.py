"""The largest batch a method decodes within a memory budget: the search over batch sizes and the
measurement of one tried batch (``dms-perf capacity``, dms_perf.bench.capacity).

* ``search_largest_batch``: doubling from 1 until a batch does not fit or the ceiling is reached, then
  bisection between the last batch that fit and the first that did not;
* ``measure_batch``: one prompt of the context length is prefilled and its cache copied into all B slots
  (``DMSCache.repeated``): prefilling B long prompts would take minutes, and every slot then holds as many
  bytes as a distinct prompt of that length would. The engine families (``fused``) fill a paged KV pool
  of exactly the batch's pages, decode reserve included (``batch_pages``; on a GPU the template waits on
  the host meanwhile, so that it is not one more sequence in the peak) and decode with the pool's graphs;
  a press on the engine fills with its compressed prefill cache. Untimed, then timed greedy decode steps
  run on the batch. Peak memory: on a GPU ``torch.cuda.max_memory_allocated()`` from just before the batch
  is filled to the end of the timed steps (weights, KV cache, decode activations and CUDA-graph pools);
  without a GPU an estimate, weights + ``cache.kv_bytes()`` (activations not counted).
* ``measure_generation_batch`` (``--new-tokens``): B copies of the prompt generate the whole output on a
  paged pool of what the budget leaves; the batch fits iff its pages never ran out and the peak stayed
  within the budget. The search tries batch 1, then the batch its pages predict (``guess_from_pages``);
  for a method that evicts nothing, a batch whose pages are known to exceed the budget is recorded
  without running it (``beyond_the_pages``).

B fits iff nothing raised (an out-of-memory error is "OOM") and the peak is within the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.floors import weight_bytes
from dms_perf.bench.generation import (
    device_room,
    engine_pool,
    failure_status,
    prefill_for_the_engine,
    release_memory,
    sizing_budget,
)
from dms_perf.bench.report import DASH
from dms_perf.model.cache import DMSCache
from dms_perf.model.paged import DEFAULT_PAGE_ROWS, PagedKVPool, PagesExhausted

BATCH_FILL = "one prefilled sequence copied into every slot"


def gib(nbytes: int | float | None, digits: int = 4) -> str:
    """Bytes in GiB to ``digits`` significant digits: a CPU budget is thousandths of a GiB."""
    return DASH if nbytes is None else f"{nbytes / 2**30:.{digits}g}"


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
    kv_pages: int | None = None  # long generations: the most pool pages the batch held at once
    free_pages: int | None = None  # long generations: pages the budget and the card leave for a pool
    free_bytes: int | None = None  # long generations: bytes they leave (for its pages and per-head tables)
    ran: bool = True  # False: not run, known not to fit (``search_largest_batch``'s ``excluded``)

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


def search_largest_batch(try_batch: Callable[[int], Try], max_batch: int,
                         guess: Callable[[Try], int] | None = None,
                         excluded: Callable[[Try, int], str | None] | None = None,
                         stop: Callable[[int], str | None] | None = None, start: int | None = None) -> Search:
    """The largest batch in ``1 .. max_batch`` for which ``try_batch(batch).fits``, assuming that fitting is
    monotone (a batch fits if a larger one does).

    Doubling from 1 (1, 2, 4, ..., then ``max_batch`` itself if it is no power of two) until a batch does not
    fit, then bisection between the last batch that fit and the first that did not: about
    ``2 log2(answer)`` tries, every one kept in ``tries`` in the order tried. A try whose failure is an error
    (``Try.fatal``) ends the search there: the answer is then the largest batch that fit before it.

    ``guess(first_try)``: when batch 1 fit, a predicted answer (e.g. from the memory batch 1 took) is tried
    next, then the batch above it; a guess that was right costs three tries in all, a wrong one falls
    back to doubling (from above the guess) or bisection (below it). ``start``: a predicted answer known
    before any try (e.g. from an earlier run's pages), tried first in place of batch 1 and its guess.

    ``excluded(largest_fit, batch)``: a reason why ``batch`` cannot fit, known from the largest try that fit
    without running it (e.g. pages that every sequence is known to hold), or None. An excluded batch is
    recorded as a failing try with ``ran=False`` and its reason.

    ``stop(batch)``: checked before every try but the first; a reason (e.g. a time limit) ends the search
    before ``batch`` runs, and ``stopped`` says so: the answer is then a lower bound.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    search = Search()
    largest_fit: list[Try] = []  # the largest try that fit so far, once one has

    def attempt(batch: int) -> Try | None:
        """The try of ``batch`` (run or excluded), or None when ``stop`` ended the search before it."""
        reason = excluded(largest_fit[0], batch) if excluded is not None and largest_fit else None
        if reason is not None:
            result = Try(batch, False, reason, ran=False)
        else:
            if stop is not None and search.tries and (why := stop(batch)) is not None:
                search.stopped = f"batch {batch} not tried: {why}"
                return None
            result = try_batch(batch)
        search.tries.append(result)
        if result.fatal:
            search.stopped = f"batch {batch}: {result.reason}"
        if result.fits and (not largest_fit or batch > largest_fit[0].batch):
            largest_fit[:] = [result]
        return result

    fit, fail = 0, None  # the largest batch that fit, the smallest that did not
    batch, predicted = 1, None
    if start is not None:
        predicted = max(1, min(start, max_batch))
    elif guess is not None and max_batch > 1:
        first = attempt(1)
        if not first.fits:
            return search
        fit, predicted = 1, min(max(2, guess(first)), max_batch)
    if predicted is not None:
        batch = predicted
        result = attempt(batch)
        if result is None:
            search.largest = fit
            return search
        if result.fits:
            fit = batch
            batch = min(batch + 1, max_batch)
            if fit == max_batch:
                search.ceiling_reached = True
                search.largest = fit
                return search
        else:
            fail = batch
    while fail is None and search.stopped is None:
        result = attempt(batch)
        if result is None:
            break
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
        result = attempt(batch)
        if result is None:
            break
        if result.fits:
            fit = batch
        else:
            fail = batch
    search.largest = fit
    return search


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


def over_budget(peak: int, budget: int, when: str = "") -> str:
    """'over budget: X GiB > Y GiB', with enough digits that the two numbers differ."""
    digits = 4
    while gib(peak, digits) == gib(budget, digits) and digits < 12:
        digits += 1
    return f"over budget: {gib(peak, digits)} GiB > {gib(budget, digits)} GiB{when}"


def _peak_bytes(model, cache) -> int:
    if HAS_CUDA:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return weight_bytes(model) + cache.kv_bytes()  # CPU estimate: activations not counted


def batch_pages(model, template: DMSCache, batch: int, steps: int = 0) -> int:
    """Pages a batch of ``batch`` copies of ``template`` may hold on the engine's paged pool within
    ``steps`` decode steps of its start: each head's rows, one more per step, and the
    ``dms_capacity_step`` rows reserved ahead, in whole pages."""
    pool_rows = model.config.max_position_embeddings
    lengths = torch.stack([template.head_lengths(i) for i in range(len(template.layers))]).long().cpu()
    reserved = torch.clamp(lengths + steps + model.dms_capacity_step, max=pool_rows)
    return batch * PagedKVPool.pages_for_rows(reserved.numpy())


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
        if prompt.engine:  # the decode engine: a paged KV pool of exactly the batch's pages
            if not prompt.reuse:  # parked on the host meanwhile: the template is not one more sequence
                template.to("cpu")
            pool = engine_pool(model, max_seqs=batch, pages=batch_pages(model, template, batch))
        # Every slot a copy of the template; consumed on a GPU (it must not be one more sequence in the peak).
        cache = DMSCache.repeated(template, batch, pool=pool, consume=not prompt.reuse)
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
    return _verdict(prompt, batch, lambda: _run_batch(prompt, batch, steps=steps, warmup_steps=warmup_steps,
                                                      budget=budget))


def _verdict(prompt: Prompt, batch: int, run: Callable[[], Try]) -> Try:
    """``run()``'s Try, or a failing one naming what it raised (OOM or an error: a verdict, the search goes
    on); the decode graphs and the pool are freed before and after, so no try counts another's memory."""
    prompt.model.release_decode_graph()
    release_memory()
    try:
        result = run()
    except Exception as exc:
        result = Try(batch, False, failure_status(exc))
    prompt.model.release_decode_graph()
    if prompt.engine:
        prompt.model.use_kv_pool(None)
    release_memory()
    return result


# Share of the budget a long generation's pool leaves for decode activations and CUDA-graph pools.
GENERATION_HEADROOM = 0.05


def generation_pool_budget(prompt: Prompt, template, batch: int, *, new_tokens: int, budget: int) -> tuple[int, int]:
    """Ready a long generation of ``batch`` copies of ``template`` (``prompt.prefill()``'s cache) for its pool:
    the template parked on the host (unless the prompt reuses it: not one more sequence while the pool is
    allocated), the peak memory counted from here. Returns the bytes ``budget`` leaves for a pool
    (``room_for_pool``) and the pool's budget: that, but never more than every token of the batch kept would
    take (``sizing_budget``)."""
    if not prompt.reuse:
        template.to("cpu")
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    free = room_for_pool(prompt.model, budget)
    return free, min(free, sizing_budget(prompt.model, batch, prompt.context + new_tokens))


def _run_generation(prompt: Prompt, batch: int, *, new_tokens: int, budget: int) -> Try:
    model = prompt.model
    template, first = prompt.prefill()
    with torch.inference_mode():
        token = first.repeat(batch, 1)
        del first
        free, pool_budget = generation_pool_budget(prompt, template, batch, new_tokens=new_tokens, budget=budget)
        page = _page_bytes(model)
        room = {"free_pages": free // page, "free_bytes": free}
        try:
            pool = engine_pool(model, max_seqs=batch, budget_bytes=pool_budget)
        except ValueError:
            return Try(batch, False, over_budget(_allocated(model) + page, budget, " before decoding"), **room)
        cache = DMSCache.repeated(template, batch, pool=pool, consume=not prompt.reuse)
        del template
        position = torch.full((batch, 1), prompt.context, device=token.device)
        steps = new_tokens - 1
        if HAS_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            _decode(model, cache, token, position, steps)
        except PagesExhausted:
            done = int(position[0, 0]) - prompt.context
            return Try(batch, False, f"KV pages ran out after {done + 1} of {new_tokens} tokens "
                       f"({gib(pool.nbytes)} GiB pool)", kv_pages=pool.peak_pages_in_use, **room)
        if HAS_CUDA:
            torch.cuda.synchronize()
        decode_s = time.perf_counter() - start
        peak = _peak_bytes(model, cache)
        kv = pool.peak_pages_in_use * page
    fits = peak <= budget
    step_s = decode_s / max(steps, 1)
    return Try(batch, fits, "ok" if fits else over_budget(peak, budget), peak, step_s * 1e3,
               batch / step_s if steps else None, kv, kv_pages=pool.peak_pages_in_use, **room)


def measure_generation_batch(prompt: Prompt, batch: int, *, new_tokens: int, budget: int) -> Try:
    """Whether ``batch`` copies of ``prompt`` generate ``new_tokens`` tokens each within ``budget`` bytes on
    the decode engine's paged pool, measured at the end of the generation: the pool gets what the budget
    leaves (less ``GENERATION_HEADROOM``), and the batch fits iff its pages never ran out and the peak
    stayed within the budget. ``step_ms`` and ``tok_s`` cover the whole generation's decode; ``kv_bytes``
    is the most KV the pool held. Never raises for a failing batch; frees what it allocated."""
    return _verdict(prompt, batch, lambda: _run_generation(prompt, batch, new_tokens=new_tokens, budget=budget))


def _copies_bytes(model, each: int, batch: int) -> int:
    """Bytes of a pool for ``batch`` sequences holding ``each`` pages apiece: the pages and the per-head
    tables."""
    return PagedKVPool.budget_for_pages(model, batch * each, max_seqs=batch)


def _allocated(model) -> int:
    """Device memory allocated now (the weights, between tries); without a GPU the weights' bytes."""
    return torch.cuda.memory_allocated() if HAS_CUDA else weight_bytes(model)


def room_for_pool(model, budget: int) -> int:
    """Bytes a long generation's pool may take within ``budget``: the budget less ``GENERATION_HEADROOM``
    and what is allocated (the weights), never more than the card has room for (``device_room``)."""
    return max(0, min(int(budget * (1 - GENERATION_HEADROOM)) - _allocated(model), device_room()))


def pages_from_file(path, context: int, method: str, new_tokens: int, model_name: str) -> int:
    """The most pages one sequence held in an earlier ``dms-perf capacity --new-tokens`` run's file (its
    tries that ran to the end: ``kv_pages`` over the batch, rounded up), for ``--guess-from``. ValueError
    naming what does not match."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
        meta, results = data["meta"], data["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--guess-from {path}: not a capacity.json ({type(exc).__name__}: {exc})") from None
    for key, want in (("new_tokens", new_tokens), ("model", model_name)):
        if meta.get(key) != want:
            raise ValueError(f"--guess-from {path}: its run had {key} {meta.get(key)!r}, this one {want!r}")
    held = [-(-t["kv_pages"] // t["batch"]) for r in results if r["context"] == context and r["method"] == method
            for t in r["tries"] if t.get("fits") and t.get("kv_pages")]
    if not held:
        raise ValueError(f"--guess-from {path}: no batch of {method} at {context} tokens ran to its end there")
    return max(held)


def guess_from_pages(first: Try, model) -> int:
    """The batch a long generation's budget holds, predicted from batch 1: the most copies of the pages one
    sequence held (sequences of a tried batch are copies: they hold the same pages) whose pool, tables
    included, fits what the budget leaves."""
    if not first.kv_pages or not first.free_bytes:
        return 2
    batch = max(1, first.free_bytes // (first.kv_pages * _page_bytes(model)))
    while batch > 1 and _copies_bytes(model, first.kv_pages, batch) > first.free_bytes:
        batch -= 1
    return batch


def beyond_the_pages(model) -> Callable[[Try, int], str | None]:
    """``search_largest_batch``'s ``excluded`` for a method that evicts nothing while it decodes: every
    copy of the prompt then holds exactly the pages each sequence of a tried batch held, so a batch whose
    pages (and tables) exceed what the budget leaves cannot fit, and is not run."""
    def excluded(fit: Try, batch: int) -> str | None:
        if batch <= fit.batch or not fit.kv_pages or fit.free_bytes is None or fit.kv_pages % fit.batch:
            return None
        each = fit.kv_pages // fit.batch
        need = _copies_bytes(model, each, batch)
        if need <= fit.free_bytes:
            return None
        return (f"not run: {batch} sequences hold {batch * each:,} pages ({gib(need)} GiB with their tables), "
                f"more than the {gib(fit.free_bytes)} GiB the budget leaves (the method evicts nothing, so each "
                f"holds the {each:,} pages each of batch {fit.batch} held)")

    return excluded


def _page_bytes(model) -> int:
    return PagedKVPool.page_bytes(DEFAULT_PAGE_ROWS, model.config.head_dim, model.dtype)


def sequence_bytes(prompt: Prompt) -> dict[str, int]:
    """KV-cache bytes of one prefilled sequence: allocated (with spare rows and bookkeeping) and kept K/V."""
    cache, _ = prompt.prefill()
    sizes = {"sequence_kv_bytes": cache.kv_bytes(), "sequence_kept_kv_bytes": cache.kept_kv_bytes()}
    del cache
    release_memory()
    return sizes
