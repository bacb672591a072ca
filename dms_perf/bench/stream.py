"""A stream of requests that end at different lengths, decoded together on the engine's paged KV pool
(``dms-perf bench --requests N --output-lengths 2k-16k``).

Each request is a prompt of the context length and an output length drawn (seeded) from a stated uniform
range. A request is admitted whenever a sequence slot is free and the pool's free pages hold its prompt
plus one hand-out ahead (``admission_pages``) beyond a watermark kept for the running sequences' growth;
it is prefilled on its own and copied into the pool (``DMSCache.admit``), then decoded with every running
sequence in one batch. A finished request returns its pages at once and the last running sequence moves
into its slot (``PagedKVPool.move``: block tables, not rows), so the live sequences always occupy the
lowest slots and a step runs on the smallest batch bucket (``BUCKETS``) that holds them; the engine keeps
one CUDA graph per bucket. If the running sequences outgrow the pool, the one with the least progress is
preempted: its pages return and it goes back to the head of the queue with the tokens it generated; admitted
again, it prefills its prompt and those tokens together and goes on from there (vLLM's recompute
preemption: the KV cache is recomputed, no generated token is thrown away; a press's prefill compresses them
with the prompt), so the cache is never corrupted and the stream always completes.

An admission stops the decode: the device drains, the prefill runs, its lengths are read back, its rows are
copied in. DMS completes ~5x the requests of dense in the same memory, so it pays that ~5x as often (on an
H100, ~0.3 s an admission cost DMS a quarter of its wall time). With ``overlap_prefill``
(``--overlap-prefill``, CUDA only) the queue head's prefill is launched on a second stream once a page a head
fits beside the reserve, launched whole without a wait for the device (its kept K/V are packed at the
admission: ``DMSCache.pack_later``), the decode steps go on beside it (a 1K prefill is compute, a decode step
mostly memory reads), and it is admitted at the first step after it landed: its lengths are read back on the idle
side stream and the copy-in waits on its event, not on the decode. The next prefill waits for the copies that
read the last one's buffers, which it may reuse. With nothing decoding, and in a steady start's first
admission, prefills run as without the option. On an H100 it was slower than serial admissions (a 1K prefill's
launch alone kept the host as long as a serial prefill took; benchmarks/NOTES.md, session 15).

Reported: total generated tokens per second (the tokens the requests generated over the wall time, prefills
included), requests completed per minute, the most pages in use, preemptions and the generated tokens they
had to prefill again, the wall time spent admitting (prefills and copies into the pool, during which nothing
decodes; of it, the wait for the decode steps still queued on the device before each prefill, and the
prefills; apart from it, the host's checks that admitted nothing, beside the queued steps), and the number of
running sequences against time.

Admission keeps pages back for the running sequences' growth: the pages their next hand-out would take
(``PagedKVPool.pages_short`` at the heads' bounds when it asks: under DMS most heads' fit in the pages they
hold, as ~7 of 8 steps reuse a slot; until 2026-12-07 it was a page-rounded ``capacity_step`` of rows for every
head, 4 % of an H100's pool at DMS's ~240 sequences), plus
``ADMIT_HORIZON`` decode steps of growth for every running sequence and the new one, at the rate the pool's
decode steps have taken pages so far (net of the pages trims returned), or, before any step was measured, at
the most a sequence can grow (one row per KV head per step, as dense). Without it a cold start admits as many
prompts as the pool holds and then preempts most of them, re-prefilling each: the work a stream of unknown
output lengths must spend is the preemptions its admission could not foresee, not those of a full pool. A
hand-out that runs out trims first (one read-back of the heads' lengths returns the spare pages of earlier
hand-outs) and preempts only if it still runs out. Until 2026-12-07 the two parts of the reserve were the
larger of them, not their sum, and a hand-out preempted at once: on an H100 with DMS in the card's memory, the
running sequences swung between ~280 and ~140 every ~45 s, 464 preemptions in a 240 s window, 155 s of it
admitting (their recomputes).

``duration_s`` (``--duration``) measures a fixed window instead of the whole stream: admission and decoding
stop at the first step that ends past it (counted from the end of the warm-up, which can run past
``warmup_s`` while a cold start admits); requests completed per minute and tokens per second then count what
the window finished and generated (the tokens so far of a request still running or queued again
included), and the row says how many were still running and queued. Every method then gets the same wall
time, and a stream too long to finish in the time a machine is lent can still be compared. ``warmup_s``
(``--warmup-seconds``) runs the stream that long first and counts only from the first step past it (window figures are
differences from that step's): the cold start (every slot admitted at once, kernels compiled, graphs captured)
is then out of the figures, which measure the steady state.

A cold start reaches the steady state only after every slot's first request has run its life, and a request
lives minutes when hundreds decode together (H100, the card's memory: dense-triton went from 282 running to 61
over 200 s, DMS still falling at 210 s). ``steady_start`` (``--steady-start``) begins the stream as one that has
been running: the requests admitted before the first decode step are drawn as a steady stream's running ones
are, their output lengths in proportion to length times its probability (a long request is running for longer)
and each part-way through, its progress uniform over its life; each prefills its prompt and the tokens it had
"generated" (random ids, prefilled as a preempted request's are, with the method's own eviction). The requests
of the queue that the first admission did not take are the plain ones again. Those prefills are the warm-up's,
so a steady start needs ``warmup_s``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dms_perf.bench.timing import DeviceSpans, synchronize

# Decode steps of growth admission keeps pages for, per running sequence (module docstring).
ADMIT_HORIZON = 256

# Batch sizes a step runs at: the smallest that holds the running sequences (one CUDA graph each).
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 8


def bucket_for(running: int, max_seqs: int) -> int:
    """The batch a step with ``running`` live sequences runs at: 1, 2, 4, 8, then multiples of 8, at most
    ``max_seqs``."""
    if running < 1:
        raise ValueError(f"running must be >= 1, got {running}")
    bucket = next((b for b in SMALL_BUCKETS if b >= running), -(-running // BUCKET_STEP) * BUCKET_STEP)
    return min(bucket, max_seqs)


def parse_output_lengths(text: str) -> tuple[int, int]:
    """``"2k-16k"`` -> (2048, 16384); one value ``"4k"`` is a fixed length. ValueError names the problem."""
    from dms_perf.bench.options import parse_token_count

    parts = str(text).split("-")
    if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
        raise ValueError(f"--output-lengths takes LOW-HIGH (e.g. 2k-16k) or one length, got {text!r}")
    low, high = (parse_token_count(p.strip()) for p in (parts * 2)[:2])
    if low < 2 or high < low:
        raise ValueError(f"--output-lengths needs 2 <= LOW <= HIGH tokens, got {text!r}")
    return low, high


@dataclass
class Request:
    index: int
    prompt: torch.Tensor  # [1, L] ids
    output_length: int  # tokens to generate, the prefill's first token included
    admitted_at: float | None = None
    finished_at: float | None = None
    preempted: int = 0
    tokens: list | None = None  # run_stream(keep_tokens=True): the generated ids (device scalars)
    resumed: torch.Tensor | None = None  # preempted: the ids it had generated ([1, k], on the device)
    plain: Request | None = None  # a steady start's request in flight: the plain request it stands in for

    def prefill_ids(self) -> torch.Tensor:
        """What its admission prefills: the prompt, then the tokens it generated before a preemption."""
        if self.resumed is None:
            return self.prompt
        return torch.cat([self.prompt.to(self.resumed.device), self.resumed], dim=1)


# StreamRun's counters a window counts from the warm-up's end (the row gives each as a difference from then).
WINDOW_COUNTERS = ("completed", "steps", "preemptions", "admission_s", "admission_wait_s", "prefill_s",
                   "admission_check_s", "recomputed_tokens", "exhausted_trims")


@dataclass
class StreamRun:
    """What a stream measured (``as_row`` gives the bench row's figures)."""

    requests: int
    completed: int
    wall_s: float
    generated_tokens: int
    peak_pages: int
    page_bytes: int
    pool_bytes: int
    max_running: int
    preemptions: int
    steps: int
    duration_s: float | None = None  # the window, if the stream was cut at one (run_stream's duration_s)
    running_at_start: int = 0  # sequences running when counting began (a window's start; 0 without a warm-up)
    running_at_end: int = 0
    queued_at_end: int = 0
    admission_s: float = 0.0  # wall time spent admitting (prefills, copies into the pool), not decoding
    admission_wait_s: float = 0.0  # of it: waiting for the decode steps queued on the device before a prefill
    prefill_s: float = 0.0  # of it: the prefills (the rest is copying into the pool and the host's work)
    # Not in it: the host's checks at each step that admitted nothing and prefilled nothing (a request waiting
    # for pages, or for its overlapped prefill), which run beside the decode steps queued on the device.
    admission_check_s: float = 0.0
    recomputed_tokens: int = 0  # generated tokens prefilled again when a preempted request came back
    exhausted_trims: int = 0  # hand-outs that ran out and trimmed (one read-back) before preempting
    warmup_s: float | None = None  # run_stream's warmup_s: the figures count from counted_from_s
    counted_from_s: float = 0.0  # the first step past the warm-up (0 without one)
    mean_output_length: float = 0.0  # of all the stream's requests (its distribution's mean, as drawn)
    before: dict[str, float] = field(default_factory=dict)  # the counters at counted_from_s
    # The counted decode steps' device times in ms (CUDA events around each step; empty without CUDA): a step's
    # own time, which the wall time's admissions and host waits do not blur.
    device_step_ms: list[float] = field(default_factory=list)
    # The counted decode steps under each decode scheduler (``PagedCacheLayer.schedule``, the graph's key).
    schedule_steps: dict[str, int] = field(default_factory=dict)
    end_census: dict[str, Any] | None = None  # ``census`` of the sequences running when the stream stopped
    overlapped_prefill: bool = False  # prefills ran on a side stream beside the decode steps (run_stream)
    trace: dict[str, list] = field(default_factory=lambda: {"time_s": [], "running": [], "pages": []})

    def record(self, time_s: float, running: int, pages: int) -> None:
        """One point of the trace: seconds since the start, sequences running, pages in use."""
        for key, value in zip(("time_s", "running", "pages"), (time_s, running, pages), strict=True):
            self.trace[key].append(value)

    def mean_running(self) -> float | None:
        """Sequences running, averaged over the counted time (the trace's steps, weighted by their duration)."""
        times, running = self.trace["time_s"], self.trace["running"]
        area = covered = 0.0
        for t0, t1, n in zip(times, times[1:], running, strict=False):
            lo, hi = max(t0, self.counted_from_s), min(t1, self.wall_s)
            if hi > lo:
                area += n * (hi - lo)
                covered += hi - lo
        return area / covered if covered > 0 else None

    def snapshot(self, unfinished_tokens: int) -> dict[str, float]:
        """The counters now (``before`` at the warm-up's end): ``WINDOW_COUNTERS`` and the tokens generated so far,
        those of requests not finished (``unfinished_tokens``) included."""
        return {name: getattr(self, name) for name in WINDOW_COUNTERS} | {
            "tokens": self.generated_tokens + unfinished_tokens}

    def as_row(self) -> dict[str, Any]:
        """The bench row: with a warm-up, completed, tokens, preemptions and steps are those after it, and
        the rates are over the time after it (``wall_s``); ``warmup_wall_s`` is when counting began."""
        b = self.before
        counted = {name: getattr(self, name) - b.get(name, 0) for name in WINDOW_COUNTERS}
        wall = self.wall_s - self.counted_from_s
        completed = counted["completed"]
        tokens = self.generated_tokens - b.get("tokens", 0)
        tok_s = tokens / wall if wall > 0 else None
        return {
            "requests": self.requests, "completed": completed, "wall_s": wall,
            "total_tok_s": tok_s,
            "requests_per_min": 60 * completed / wall if wall > 0 else None,
            # A window shorter than a request's life counts the completions of whichever cohort it catches;
            # the tokens kept per second over the mean output length is the rate a steady stream completes at.
            "requests_per_min_by_tokens": (60 * tok_s / self.mean_output_length
                                           if tok_s is not None and self.mean_output_length else None),
            "mean_running": self.mean_running(),
            "generated_tokens": tokens, "peak_pages": self.peak_pages,
            "peak_kv_bytes": self.peak_pages * self.page_bytes, "kv_pool_bytes": self.pool_bytes,
            "max_running": self.max_running, "preemptions": counted["preemptions"],
            "decode_steps": counted["steps"], "duration_s": self.duration_s,
            **{name: counted[name] for name in ("admission_s", "admission_wait_s", "prefill_s", "admission_check_s",
                                                "recomputed_tokens", "exhausted_trims")},
            "warmup_s": self.warmup_s, "warmup_wall_s": self.counted_from_s,
            "running_at_start": self.running_at_start, "running_at_end": self.running_at_end,
            "queued_at_end": self.queued_at_end,
            "device_step_ms": statistics.median(self.device_step_ms) if self.device_step_ms else None,
            "device_decode_s": sum(self.device_step_ms) / 1e3 if self.device_step_ms else None,
            "schedule_steps": self.schedule_steps,
            "end_census": self.end_census, "overlapped_prefill": self.overlapped_prefill,
            "stream_trace": self.trace,
        }


def census(pool, running: list[Request], positions: torch.Tensor) -> dict[str, Any]:
    """What the sequences in slots ``0 .. len(running) - 1`` hold: their number, mean position (tokens seen),
    and a head's rows, averaged over their heads: kept (K/V rows now, read from the device) and held (the rows
    its pages have room for). For all of them, and (key ``plain``) for those that are not a steady start's
    stand-ins, whose progress was prefilled rather than generated."""
    n = len(running)
    kept = pool.lengths[:, :n].double().mean(dim=(0, 2)).cpu()
    held = torch.from_numpy(pool.rows_held(n).mean(axis=(0, 2)))
    seen = positions[:n, 0].double().cpu()

    def summary(chosen: list[int]) -> dict[str, Any]:
        if not chosen:
            return {"running": 0, "mean_position": None, "kept_rows_per_head": None, "held_rows_per_head": None}
        index = torch.tensor(chosen)
        return {"running": len(chosen), "mean_position": float(seen[index].mean()),
                "kept_rows_per_head": float(kept[index].mean()), "held_rows_per_head": float(held[index].mean())}

    plain = [i for i, request in enumerate(running) if request.plain is None]
    return summary(list(range(n))) | {"plain": summary(plain)}


def make_requests(count: int, prompt_length: int, output_lengths: tuple[int, int], *, vocab_size: int,
                  seed: int) -> list[Request]:
    """``count`` requests: random prompts of ``prompt_length`` ids and output lengths uniform in the inclusive
    range ``output_lengths``, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    low, high = output_lengths
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [Request(i, torch.randint(0, vocab_size, (1, prompt_length), generator=generator), n)
            for i, n in enumerate(lengths)]


def steady_start(requests: list[Request], count: int, output_lengths: tuple[int, int], *, vocab_size: int,
                 seed: int) -> list[Request]:
    """``requests`` with the first ``count`` standing in for requests a steady stream has in flight (module
    docstring): output length L drawn with probability in proportion to L over the inclusive range, progress k
    uniform in 0 .. L - 2 tokens (``resumed``: k random ids, so that admission's prefill gives token k + 1 of L
    and the request still decodes), the plain request kept in ``plain``. Seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed + 1)  # not the plain draws' stream
    count = min(count, len(requests))
    started = []
    for request, (length, done) in zip(requests[:count], steady_progress(count, output_lengths, generator),
                                       strict=True):
        ids = torch.randint(0, vocab_size, (1, done), generator=generator)
        started.append(Request(request.index, request.prompt, length, resumed=ids if done else None, plain=request))
    return started + list(requests[count:])


def steady_progress(count: int, output_lengths: tuple[int, int], generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` (output length, tokens generated so far) pairs of a steady stream's running requests: length L
    with probability in proportion to L over the inclusive range (a request is running for as many steps as
    it has tokens), progress uniform in 0 .. L - 2."""
    low, high = output_lengths
    weights = torch.arange(low, high + 1, dtype=torch.float64)
    drawn = (low + torch.multinomial(weights, count, replacement=True, generator=generator)).tolist()
    return [(length, int(torch.randint(0, max(1, length - 1), (1,), generator=generator))) for length in drawn]


def admission_pages(single, pool, lengths: torch.Tensor) -> int:
    """Pages a prefilled one-sequence cache takes when admitted, with one hand-out (``capacity_step`` rows per
    head) ahead; ``lengths``: its ``head_lengths_on_host``."""
    lengths = lengths.long()
    step = single.layers[0].capacity_step
    return pool.pages_for_rows((lengths + step).clamp(max=pool.max_rows_per_head).numpy(), pool.page_rows)


@dataclass
class Staged:
    """The queue head's prefill while it waits for its pages: read back once, not at every step it waits."""

    request: Request
    single: Any  # its one-sequence cache
    first: torch.Tensor  # its first greedy token
    done: Any = None  # with overlapped prefills on CUDA: an event after the prefill on the side stream
    lengths: torch.Tensor | None = None  # its cache's ``head_lengths_on_host``, once read back
    pages: int = 0  # ``admission_pages``, likewise

    def landed(self) -> bool:
        """Whether the prefill has finished on the device (always, unless it runs beside the decode steps)."""
        return self.done is None or self.done.query()

    def wait(self) -> None:
        """Block the host until the prefill has finished on the device."""
        if self.done is not None:
            self.done.synchronize()


def plain_prefill(model, prompt: torch.Tensor, *, pack_later: bool = False):
    """A request's prefill into a one-sequence DMS cache of its own: (cache, first greedy token [1]).
    ``pack_later``: launch it without a wait for the device (``DMSCache.pack_later``); its admission packs it."""
    single = model.make_dms_cache(pooled=False)
    single.pack_later = pack_later
    out = model(input_ids=prompt, past_key_values=single, use_cache=True, logits_to_keep=1)
    single.pack_later = False
    return single, out.logits[0, -1:].argmax(-1)


def run_stream(model, requests: list[Request], *, prefill: Callable | None = None,
               on_progress: Callable[[str], None] | None = None, trace_every: int = 16,
               keep_tokens: bool = False, duration_s: float | None = None,
               warmup_s: float | None = None, admit_horizon: int = ADMIT_HORIZON,
               overlap_prefill: bool = False) -> StreamRun:
    """Generate every request greedily on ``model``'s paged pool (``model.use_kv_pool``; the pool's
    ``max_seqs`` caps the running sequences). ``prefill(model, prompt)`` gives a request's one-sequence
    cache and first token (default ``plain_prefill``; a press on the engine passes its own). ``keep_tokens``:
    each request's generated ids in ``Request.tokens`` (for tests: what a request generates must not depend
    on what ran beside it). ``duration_s``: stop at the first step that ends past it, after ``warmup_s`` more
    seconds, whose figures are not counted; ``admit_horizon``: the decode steps of growth admission keeps pages
    for (module docstring; 0 keeps back only the pages of the running sequences' next hand-out).
    ``overlap_prefill``: on CUDA, run each admission's prefill on a side stream beside the decode steps and
    admit it at the first step after it lands (module docstring). Requests from ``steady_start`` are in
    flight if the first admission takes them, else their plain requests queue. Raises ``PagesExhausted``
    only if a single request cannot run alone in the pool."""
    from dms_perf.model.paged import PagesExhausted

    pool = model.dms_pool
    if pool is None:
        raise ValueError("run_stream needs a model on a paged KV pool (model.use_kv_pool)")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s}")
    if warmup_s is not None and (duration_s is None or not warmup_s >= 0):
        raise ValueError(f"warmup_s must be a number of seconds >= 0 beside a duration_s, got {warmup_s}")
    steady = any(r.plain is not None for r in requests)  # a steady start's first admission is still to come
    if steady and not warmup_s:
        raise ValueError("a steady start's prefills are its warm-up's: run_stream needs warmup_s > 0 with it")
    warmup = warmup_s or 0.0
    device = next(model.parameters()).device
    max_seqs = pool.max_seqs
    # Pages the decode steps took (hand-outs net of trims) over sequence-steps: the growth rate admission
    # reserves for, first at its bound (one row per KV head per step).
    grown, sequence_steps = 0, 0
    most_growth = pool.layers * pool.kv_heads / pool.page_rows
    queue = deque(requests)
    running: list[Request] = []  # running[i] decodes in slot i
    made = [0] * max_seqs  # tokens generated so far per slot (the first comes from the prefill)
    tokens = torch.zeros((max_seqs, 1), dtype=torch.long, device=device)
    positions = torch.zeros((max_seqs, 1), dtype=torch.long, device=device)
    # Every slot's generated ids by index (a token at position p of a prompt of length L is index p - L), kept
    # on the device without a sync, so that a preempted request keeps them.
    history = torch.zeros((max_seqs, max((r.output_length for r in requests), default=1)), dtype=torch.long,
                          device=device)
    prompt_lengths = torch.zeros((max_seqs, 1), dtype=torch.long, device=device)
    cache = model.make_dms_cache()
    run = StreamRun(len(requests), 0, 0.0, 0, 0, pool.page_bytes(pool.page_rows, pool.head_dim, pool.dtype),
                    pool.nbytes, 0, 0, 0, duration_s, warmup_s=warmup_s,
                    mean_output_length=sum((r.plain or r).output_length for r in requests) / max(1, len(requests)))
    batch = 0
    spans = DeviceSpans(device)
    side = torch.cuda.Stream(device) if overlap_prefill and device.type == "cuda" else None
    main = torch.cuda.current_stream(device) if side is not None else None
    run.overlapped_prefill = side is not None

    synchronize()
    start = time.perf_counter()

    def vacate(slot: int) -> None:
        """Return ``slot``'s pages and move the last running sequence into it."""
        pool.release(slot)
        last = len(running) - 1
        if slot != last:  # keep the running sequences in the lowest slots
            pool.move(last, slot)
            tokens[slot] = tokens[last]
            positions[slot] = positions[last]
            history[slot] = history[last]
            prompt_lengths[slot] = prompt_lengths[last]
            made[slot] = made[last]
            running[slot] = running[last]
        running.pop()

    def unfinished_tokens() -> int:
        """Tokens generated by requests not finished: the running ones and the preempted ones queued again."""
        return sum(made[: len(running)]) + sum(r.resumed.shape[1] for r in queue if r.resumed is not None)

    def finish(slot: int, now: float) -> None:
        request = running[slot]
        request.finished_at = now
        run.completed += 1
        run.generated_tokens += request.output_length
        vacate(slot)

    staged: Staged | None = None
    prefills = 0  # prefills started (an admission check that started none and admitted none is a check only)

    def stage(request: Request) -> Staged:
        """Start ``request``'s prefill. On the side stream, launched behind whatever the device is doing (the
        host's launch timed as the prefill), if ``overlap_prefill`` has decode steps to run beside it; else at
        once on this stream, the device drained first (the wait and the prefill timed apart) and the lengths
        read back."""
        nonlocal prefills
        prefills += 1
        beside = side is not None and bool(running) and not steady
        began = time.perf_counter()
        if not beside:
            synchronize()  # the decode steps still queued on the device: their time, not this prefill's
            run.admission_wait_s += time.perf_counter() - began
            began = time.perf_counter()
        done = None
        with torch.cuda.stream(side) if beside else contextlib.nullcontext():
            if beside:  # after the copies that read the last prefill's buffers, which this one may reuse
                side.wait_stream(main)
            ids = request.prefill_ids().to(device)
            single, first = prefill(model, ids) if prefill else plain_prefill(model, ids, pack_later=overlap_prefill)
            if beside:
                done = torch.cuda.Event()
                done.record(side)
        staged = Staged(request, single, first, done)
        if not beside:
            read_back(staged)  # its read-back ends the prefill
        run.prefill_s += time.perf_counter() - began
        return staged

    def read_back(staged: Staged) -> None:
        """The staged prefill's lengths and pages, read on the stream it ran on (the side stream is idle once it
        landed: no wait for the decode steps)."""
        with torch.cuda.stream(side) if staged.done is not None else contextlib.nullcontext():
            staged.lengths = staged.single.head_lengths_on_host()
        staged.pages = admission_pages(staged.single, pool, staged.lengths)

    def admit() -> bool:
        """Admit the next queued request if a slot and its pages (beyond the running ones' watermark) are free."""
        nonlocal staged
        if not queue or len(running) >= max_seqs:
            return False
        request = queue[0]
        measured = sequence_steps > 0 and run.steps >= 2 * model.dms_capacity_step  # two hand-outs at least
        rate = grown / sequence_steps if measured else most_growth
        reserve = rate * admit_horizon * (len(running) + 1)  # what the sequences keep growing by
        # Not even a page a head would fit: wait without prefilling (a preempted request queued ahead would
        # throw that prefill away; in a full pool's cold start most of the admission time went to such prefills).
        # The next hand-out's pages on top (it comes when the pages' room is spent and asks for capacity_step
        # steps more), counted only if the rest fits.
        one_page = pool.layers * pool.kv_heads
        if running and one_page + reserve > pool.free_pages:
            return False
        if running:
            reserve += pool.pages_short(pool.room(len(running)) + model.dms_capacity_step)
            if one_page + reserve > pool.free_pages:
                return False
        if staged is None or staged.request is not request:
            staged = stage(request)
        if not staged.landed():
            if running and not steady:
                return False  # the decode steps go on beside it
            staged.wait()  # nothing decodes beside it, or a steady start's first admission takes it at once
        if staged.lengths is None:
            read_back(staged)
        single, first = staged.single, staged.first
        if running and staged.pages + reserve > pool.free_pages:
            return False
        slot = len(running)
        if staged.done is not None:
            main.wait_event(staged.done)
        try:
            cache.admit(slot, single, lengths=staged.lengths)
        except PagesExhausted:
            if running:
                return False
            raise
        staged = None
        queue.popleft()
        request.admitted_at = time.perf_counter() - start
        done = 0 if request.resumed is None else request.resumed.shape[1]  # generated before a preemption
        tokens[slot] = first
        if keep_tokens:  # a steady start's request in flight kept no tokens of its own: its resumed ids
            before = request.tokens if request.tokens is not None else list(request.resumed[0]) if done else []
            request.tokens = [*before[:done], first.reshape(())]
        prompt_lengths[slot] = request.prompt.shape[1]
        positions[slot] = request.prompt.shape[1] + done
        if done:
            history[slot, :done] = request.resumed[0]
        history[slot, done] = first.reshape(())
        made[slot] = done + 1
        run.recomputed_tokens += done
        request.resumed = None
        running.append(request)
        if made[slot] >= request.output_length:  # its prefill gave its last token
            finish(slot, request.admitted_at)
        return True

    trimmed = False  # the pool trimmed since the last step that got its pages
    with torch.inference_mode():
        while queue or running:
            if duration_s is not None:
                now = time.perf_counter() - start
                if warmup_s and not run.before and not steady and now >= warmup:
                    run.counted_from_s, run.running_at_start = now, len(running)
                    run.before = run.snapshot(unfinished_tokens())
                if now >= (run.counted_from_s if run.before else warmup) + duration_s:
                    break  # the window is duration_s long even when the warm-up ran past warmup_s
            while True:  # admissions, timed apart from the checks that admitted nothing and prefilled nothing
                began, started = time.perf_counter(), prefills
                admitted = admit()
                spent = time.perf_counter() - began
                if admitted or prefills != started:
                    run.admission_s += spent
                else:
                    run.admission_check_s += spent
                if not admitted:
                    break
            if steady:  # a steady start's first admission is over: the requests it did not take are plain again
                plain = [r.plain or r for r in queue]
                queue.clear()
                queue.extend(plain)
                staged, steady = None, False
            if not running:
                continue
            wanted = bucket_for(len(running), max_seqs)
            if wanted != batch:
                batch = wanted
                cache.set_batch(batch)
            in_use = pool.pages_in_use
            try:
                cache.prepare_step()  # page hand-out for the step (host only); may run out
            except PagesExhausted:
                if not trimmed:  # the spare pages of earlier hand-outs first: a read-back now returns them
                    trimmed = True
                    run.exhausted_trims += 1
                    pool.trim()
                    continue
                if len(running) == 1:
                    raise  # one request alone outgrows the pool: no stream can complete
                # The request with the least progress (a finished one's slot takes the last, so slot order
                # is not admission order): queued again with the tokens it generated, its pages returned.
                slot = min(range(len(running)), key=made.__getitem__)
                victim = running[slot]
                victim.preempted += 1
                run.preemptions += 1
                victim.resumed = history[slot : slot + 1, : made[slot]].clone()
                vacate(slot)
                queue.appendleft(victim)
                continue
            trimmed = False
            grown += pool.pages_in_use - in_use
            sequence_steps += len(running)
            counting = bool(run.before) or not warmup_s
            if counting:
                schedule = cache.layers[0].schedule
                run.schedule_steps[schedule] = run.schedule_steps.get(schedule, 0) + 1
                spans.begin()
            out = model(input_ids=tokens[:batch], past_key_values=cache, position_ids=positions[:batch],
                        use_cache=True)
            tokens[:batch] = out.logits[:, -1:].argmax(-1)
            positions[:batch] += 1
            # the new token's index: at most its output length less one (a request finishing now stops here)
            index = (positions[:batch] - prompt_lengths[:batch]).clamp(max=history.shape[1] - 1)
            history[:batch].scatter_(1, index, tokens[:batch])
            if counting:
                spans.end()
            if keep_tokens:
                for slot, request in enumerate(running):
                    request.tokens.append(tokens[slot, 0].clone())
            run.steps += 1
            now = time.perf_counter() - start
            for slot in range(len(running)):
                made[slot] += 1
            for slot in reversed(range(len(running))):  # from the top, so that moves fill finished slots
                if made[slot] >= running[slot].output_length:
                    finish(slot, now)
            run.peak_pages = max(run.peak_pages, pool.pages_in_use)
            run.max_running = max(run.max_running, len(running))
            if run.steps % trace_every == 0:
                run.record(now, len(running), pool.pages_in_use)
                if on_progress is not None:
                    on_progress(f"{run.completed}/{run.requests} requests done, {len(running)} running, "
                                f"{pool.pages_in_use}/{pool.num_pages} pages")
    synchronize()
    run.wall_s = time.perf_counter() - start
    run.device_step_ms = spans.elapsed_ms()
    if running:
        run.end_census = census(pool, running, positions)
    run.generated_tokens += unfinished_tokens()  # a window's unfinished requests (none otherwise)
    run.running_at_end, run.queued_at_end = len(running), len(queue)
    run.record(run.wall_s, len(running), pool.pages_in_use)  # the end, so that even a short stream draws a line
    run.peak_pages = max(run.peak_pages, pool.peak_pages_in_use)
    return run


# --- `dms-perf bench --requests N`: one stream per method, stream.json / stream.md / running_vs_time.png ---

JSON_NAME, MD_NAME, PLOT_NAME = "stream.json", "stream.md", "running_vs_time.png"
# Without a GPU the pool's budget is small and fixed (not the host's RAM), as in ``dms-perf capacity``.
CPU_POOL_GIB = 0.002
CPU_MAX_RUNNING, GPU_MAX_RUNNING = 8, 256


def stream_budget(memory_budget_gib: float | None) -> tuple[int, str]:
    """The paged pool's bytes: ``--memory-budget`` (GiB), else on a GPU the free memory less
    ``SIZING_HEADROOM`` of it, else ``CPU_POOL_GIB``; with where it came from."""
    from dms_perf._runtime import HAS_CUDA
    from dms_perf.bench.generation import SIZING_HEADROOM

    if memory_budget_gib is not None:
        return round(memory_budget_gib * 2**30), "--memory-budget"
    if HAS_CUDA:
        free = torch.cuda.mem_get_info()[0]
        return int(free * (1 - SIZING_HEADROOM)), f"the card's free memory less {SIZING_HEADROOM:.0%} for activations"
    return round(CPU_POOL_GIB * 2**30), f"CPU default, {CPU_POOL_GIB} GiB (--memory-budget sets another)"


def fit_problem(config, dtype: torch.dtype, budget_gib: float, prompt_length: int,
                page_rows: int | None = None) -> str | None:
    """Why a pool of ``budget_gib`` (pages of ``page_rows`` rows, default ``DEFAULT_PAGE_ROWS``) cannot hold one
    request (one line), or None: the least any method keeps of a prompt is each head's window + 1 rows (DMS
    never evicts inside the window), in whole pages, plus one slot's per-head state."""
    from dms_perf.model.paged import DEFAULT_PAGE_ROWS, PagedKVPool

    page_rows = DEFAULT_PAGE_ROWS if page_rows is None else page_rows
    window = getattr(config, "dms_window_size", prompt_length)
    rows = min(prompt_length, window + 1)
    pages = config.num_hidden_layers * config.num_key_value_heads * -(-rows // page_rows)
    need = PagedKVPool.budget_for_pages(config, pages, max_seqs=1, dtype=dtype, page_rows=page_rows)
    if round(budget_gib * 2**30) >= need:
        return None
    return (f"--memory-budget {budget_gib} GiB cannot hold one request: its prompt's {rows} rows per KV head at the "
            f"least (the window) take {need / 2**30:.4g} GiB of pages and per-head state")


def stream_method(model, method, requests: list[Request], *, budget_gib: float | None, max_running: int,
                  on_progress: Callable[[str], None] | None = None, duration_s: float | None = None,
                  warmup_s: float | None = None, capacity_step: int | None = None,
                  overlap_prefill: bool = False, page_rows: int | None = None) -> dict[str, Any]:
    """One method's stream: its pool (``engine_pool``, the budget's pages), the run, and its row. Never
    raises for an expected failure: an exhausted pool or a bad budget becomes the row's status.
    ``capacity_step``: rows per KV head a page hand-out gives ahead (``--capacity-step``; default the
    method's); ``overlap_prefill``: ``run_stream``'s (``--overlap-prefill``); ``page_rows``: the pool's rows a
    page (``--page-rows``; default ``DEFAULT_PAGE_ROWS``)."""
    from dms_perf.bench.generation import engine_pool, failure_status, prefill_for_the_engine, release_memory

    row: dict[str, Any] = {"method": method.name}
    # run_stream marks the requests it runs (admitted, preempted, their tokens): each method runs copies
    requests = [replace(r) for r in requests]
    try:
        method.prepare(model)
        if capacity_step is not None:
            model.dms_capacity_step = capacity_step
        budget, source = stream_budget(budget_gib)
        row.update(pool_budget_bytes=budget, pool_budget_source=source)
        pool = engine_pool(model, max_seqs=max_running, budget_bytes=budget, page_rows=page_rows)
        prefill = None
        if method.family.press_on_engine:
            press = method.press_for(model, requests[0].prompt.to(next(model.parameters()).device))

            def prefill(model, prompt):
                out, cache = prefill_for_the_engine(model, prompt, press)
                return cache, out.logits[0, -1:].argmax(-1)

        row.update(run_stream(model, requests, prefill=prefill, on_progress=on_progress,
                              duration_s=duration_s, warmup_s=warmup_s, overlap_prefill=overlap_prefill).as_row(),
                   capacity_step=model.dms_capacity_step, page_rows=pool.page_rows)
        row["status"] = "ok"
    except Exception as exc:  # one failing method must not stop the others
        row["status"] = failure_status(exc)
    finally:
        model.use_kv_pool(None)
        model.release_decode_graph()
        release_memory()
    return row


def render_stream_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from dms_perf.bench.report import _num, card_name

    lines = [
        "# Request stream: sequences that end at different lengths", "",
        f"- card: {card_name(meta)}, model {meta['model']} ({meta['dtype']}), {meta['date']}",
        f"- {meta['requests']} requests, prompt {meta['prompt_length']} tokens, output lengths uniform in "
        f"{meta['output_lengths'][0]}-{meta['output_lengths'][1]} (seed {meta['seed']}), at most "
        f"{meta['max_running']} running",
        *([f"- measured over a window of {meta['duration_s']:g} s per method: requests completed and tokens "
           "generated in it; running and queued are the requests left when it closed"]
          if meta.get("duration_s") else []),
        *([f"- after a warm-up of {_warmups(meta, rows)} (the cold start, not counted: admissions, compiles, "
           "graph captures)"] if meta.get("warmup_s") else []),
        *(["- steady start: the requests of the first admission began part-way through their outputs, drawn as a "
           "steady stream's running ones are (lengths in proportion to length, progress uniform)"]
          if meta.get("steady_start") else []),
        *(["- overlapped prefills: each admission's prefill ran on a second CUDA stream beside the decode steps"]
          if meta.get("overlap_prefill") else []),
        *([f"- KV pool pages of {meta['page_rows']} rows (--page-rows)"] if meta.get("page_rows") else []),
        f"- command: `{meta['command']}`", "",
        "| method | status | req/min | req/min by tokens | total tok/s | completed | mean running "
        "| running at the start → end (queued at the end) | max running | peak KV pages | peak KV GiB | pool GiB "
        "| preemptions (their generated tokens) | admitting (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def gib(row, key):
        return _num(row[key] / 2**30) if row.get(key) is not None else "-"

    for r in rows:
        lines.append(f"| {r['method']} | {r['status']} | {_num(r.get('requests_per_min'))} | "
                     f"{_num(r.get('requests_per_min_by_tokens'))} | "
                     f"{_num(r.get('total_tok_s'))} | {r.get('completed', '-')} | {_num(r.get('mean_running'))} | "
                     f"{r.get('running_at_start', '-')} → {r.get('running_at_end', '-')} "
                     f"({r.get('queued_at_end', '-')}) | "
                     f"{r.get('max_running', '-')} | {r.get('peak_pages', '-')} | "
                     f"{gib(r, 'peak_kv_bytes')} | {gib(r, 'kv_pool_bytes')} | {r.get('preemptions', '-')} "
                     f"({_preempted_tokens(r)}) | "
                     f"{_admitting(r)} |")
    notes = [note for r in rows for note in (transient_note(meta, r), _step_and_census(r)) if note]
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"


def _step_and_census(row: dict[str, Any]) -> str | None:
    """A method's decode step on the device and what its running sequences held at the end, where measured."""
    from dms_perf.bench.report import _num

    parts = []
    if row.get("admission_check_s"):
        parts.append(f"the admission checks that admitted nothing took {_num(row['admission_check_s'])} s of host "
                     f"time beside the queued decode steps (not in the admitting column)")
    if row.get("device_step_ms") is not None:
        parts.append(f"a decode step took {_num(row['device_step_ms'])} ms on the device (median of the window's "
                     f"{row.get('decode_steps', '-')}; {_num(row['device_decode_s'])} s of decoding in all)")
    if row.get("schedule_steps"):
        parts.append("decode attention's steps by scheduler: " + ", ".join(
            f"{name} {steps}" for name, steps in sorted(row["schedule_steps"].items())))

    def held(c):
        return (f"{c['running']} at a mean position of {_num(c['mean_position'])} tokens, a head keeping "
                f"{_num(c['kept_rows_per_head'])} rows and its pages holding {_num(c['held_rows_per_head'])}")

    census = row.get("end_census")
    if census:
        plain = census["plain"]
        parts.append(f"at the end {held(census)}" + (
            f" (of them, the requests that did not start part-way: {held(plain)})"
            if plain["running"] and plain["running"] != census["running"] else ""))
    return f"{row['method']}: {'; '.join(parts)}" if parts else None


# A window whose running sequences changed by more than this fraction between its start and its end measured a
# transient (a cold start's admissions thinning out), not the steady state.
STEADY_TOLERANCE = 0.2


def transient_note(meta: dict[str, Any], row: dict[str, Any]) -> str | None:
    """One line when a window's running sequences moved by more than ``STEADY_TOLERANCE`` between its start and
    its end (the figures are then a transient's), else None; None for a stream run to its end."""
    start, end = row.get("running_at_start"), row.get("running_at_end")
    if not meta.get("duration_s") or row.get("status") != "ok" or start is None or end is None:
        return None
    if abs(end - start) <= STEADY_TOLERANCE * max(start, end):
        return None
    return (f"{row['method']}: not a steady state: {start} sequences ran when the window opened and {end} when "
            f"it closed (a longer --warmup-seconds, or --steady-start, measures the steady state)")


def _warmups(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The warm-up: one for all methods, or each method's (joined runs whose methods took different times to
    reach their steady state)."""
    each = {r["method"]: r["warmup_s"] for r in rows if r.get("warmup_s") is not None}  # a failed row has none
    if len(set(each.values())) <= 1:
        return f"{meta['warmup_s']:g} s per method"
    return ", ".join(f"{seconds:g} s for {method}" for method, seconds in each.items())


def _admitting(row: dict[str, Any]) -> str:
    """The admitting seconds, with the waits for queued decode steps and the prefills in them where measured."""
    from dms_perf.bench.report import _num

    if row.get("prefill_s") is None:
        return _num(row.get("admission_s"))
    if row.get("overlapped_prefill"):
        return f"{_num(row['admission_s'])} ({_num(row['prefill_s'])} launching prefills beside the decode steps)"
    return (f"{_num(row['admission_s'])} ({_num(row['admission_wait_s'])} waiting for queued steps, "
            f"{_num(row['prefill_s'])} prefilling)")


def _preempted_tokens(row: dict[str, Any]) -> str:
    """The generated tokens preemptions cost: prefilled again, or (rows from before they were kept) dropped."""
    if row.get("recomputed_tokens") is not None:
        return f"{row['recomputed_tokens']} recomputed"
    if row.get("dropped_tokens") is not None:
        return f"{row['dropped_tokens']} dropped"
    return "-"


def stream_figure(meta: dict[str, Any], rows: list[dict[str, Any]]):
    """Sequences running against time, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dms_perf.bench.report import card_name

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        trace = r.get("stream_trace")
        if trace and trace["time_s"]:
            ax.step(trace["time_s"], trace["running"], where="post", label=r["method"])
    ax.set_xlabel("seconds since the stream began")
    ax.set_ylabel("sequences running")
    ax.set_title(f"{meta['requests']} requests, outputs {meta['output_lengths'][0]}-{meta['output_lengths'][1]} "
                 f"tokens — {card_name(meta)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


# What two streams must share to stand side by side in one table (meta keys; the pool's budget is per row). Not
# the warm-up: it is how long a method takes to reach its steady state (a steady start's first admission takes
# DMS, with ~4x the requests in flight, ~4x dense's time); each row keeps its own, and the window is shared.
STREAM_JOIN_KEYS = ("model", "dtype", "requests", "prompt_length", "output_lengths", "seed", "max_running",
                    "duration_s", "steady_start", "overlap_prefill", "page_rows")


def merge_streams(paths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join streams run in parts (``report.join_outputs``): they join when their card and everything in
    ``STREAM_JOIN_KEYS`` agree and their rows' pools had the same budget. A method present twice keeps the
    later row; the rows follow the joined methods' order."""
    from dms_perf.bench.report import join_outputs

    def one_budget(have, new):
        budgets = {row.get("pool_budget_bytes") for row in [*have, *new]} - {None}
        return ("pool budget (bytes)", sorted(budgets), "one budget") if len(budgets) > 1 else None

    meta, rows = join_outputs(paths, json_name=JSON_NAME, rows_key="results", join_keys=STREAM_JOIN_KEYS,
                              row_id=lambda row: row["method"], what=f"a stream's {JSON_NAME}", check=one_budget)
    by_method = {row["method"]: row for row in rows}
    return meta, [by_method[name] for name in meta["methods"] if name in by_method]


def write_stream_outputs(out_dir, meta: dict[str, Any], rows: list[dict[str, Any]]) -> list:
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / MD_NAME).write_text(render_stream_markdown(meta, rows))
    figure = stream_figure(meta, rows)
    figure.savefig(out / PLOT_NAME, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return [out / JSON_NAME, out / MD_NAME, out / PLOT_NAME]
