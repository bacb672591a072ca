"""The request stream (dms_perf.bench.stream, ``dms-perf bench --requests``): every request generates what it
generates alone, whatever ran beside it, through admissions, slot moves, batch buckets and preemptions; the
pool's pages all come back; bad input is one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dms_perf.bench import cli, stream
from dms_perf.model.cache import DMSCache
from dms_perf.model.paged import PagedKVPool
from dms_perf.model.qwen3_dms import build_model, tiny_config
from tests.bench.joins import assert_report_refuses, tiny_cells


def test_buckets_and_output_lengths():
    assert [stream.bucket_for(n, 64) for n in (1, 2, 3, 5, 8, 9, 17, 64)] == [1, 2, 4, 8, 8, 16, 24, 64]
    assert stream.bucket_for(30, 20) == 20
    assert stream.parse_output_lengths("2k-16k") == (2048, 16384)
    assert stream.parse_output_lengths("40") == (40, 40)
    for bad in ("9-3", "1", "a-b", "1-2-3", "-4"):
        with pytest.raises(ValueError, match="output-lengths|token count"):
            stream.parse_output_lengths(bad)


def test_requests_are_seeded_and_within_their_range():
    one = stream.make_requests(20, 16, (5, 9), vocab_size=100, seed=3)
    two = stream.make_requests(20, 16, (5, 9), vocab_size=100, seed=3)
    assert [r.output_length for r in one] == [r.output_length for r in two]
    assert all(torch.equal(a.prompt, b.prompt) for a, b in zip(one, two, strict=True))
    assert {r.output_length for r in one} <= set(range(5, 10)) and len({r.output_length for r in one}) > 1
    assert one[0].prompt.shape == (1, 16)


def _tiny_model(**config):
    """The tiny model marking most tokens (heads differ), handing out pages every 4 steps (``config``: its
    config's other fields)."""
    model = build_model(tiny_config(dms_initial_alpha_offset=-40.0, **config), backend="triton", dtype=torch.float32)
    model.dms_capacity_step = 4
    return model


def _use_pool(model, pages: int, seqs: int = 2) -> PagedKVPool:
    """A pool of ``pages`` pages of 4 rows and ``seqs`` sequence slots, for ``model``."""
    pool = PagedKVPool.for_budget(model, PagedKVPool.budget_for_pages(model, pages, max_seqs=seqs, page_rows=4),
                                  max_seqs=seqs, page_rows=4)
    model.use_kv_pool(pool)
    return pool


def _fake_clock(monkeypatch) -> None:
    """The stream's clock advances one second a read."""
    clock = iter(range(10**6))
    monkeypatch.setattr(stream.time, "perf_counter", lambda: float(next(clock)))


def _solo(model, request, ids=None, count=None) -> list[int]:
    """The request generated alone, on a cache of its own buffers (``ids`` then ``count`` tokens: its prompt and
    output length unless given)."""
    cache = model.make_dms_cache(pooled=False)
    ids = request.prompt if ids is None else ids
    count = request.output_length if count is None else count
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token, made = out.logits[:, -1:].argmax(-1), []
    for i in range(count):
        made.append(int(token))
        if i + 1 == count:
            break
        position = torch.tensor([[ids.shape[1] + i]])
        token = model(input_ids=token, past_key_values=cache, position_ids=position,
                      use_cache=True).logits[:, -1:].argmax(-1)
    return made


def _solo_rows(model, prompt, fed: list[int]) -> float:
    """A head's rows, averaged over the layers and KV heads, of a cache of its own buffers after ``prompt``'s
    prefill and decode steps of the ids ``fed``."""
    cache = model.make_dms_cache(pooled=False)
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for i, token in enumerate(fed):
        model(input_ids=torch.tensor([[token]]), past_key_values=cache,
              position_ids=torch.tensor([[prompt.shape[1] + i]]), use_cache=True)
    return float(torch.stack([cache.head_lengths(i) for i in range(len(cache.layers))]).double().mean())


@pytest.mark.parametrize("pages", [400, 24], ids=["roomy", "preempting"])
def test_every_request_generates_what_it_generates_alone(pages):
    """Four requests of different output lengths through two slots; with 24 pages of 4 rows the running
    sequences outgrow the pool and the least advanced is preempted and recomputed: still every request's tokens are
    its solo tokens, and every page comes back."""
    model = _tiny_model()
    requests = stream.make_requests(4, 8, (3, 10), vocab_size=model.config.vocab_size, seed=1)
    with torch.no_grad():
        want = [_solo(model, r) for r in requests]
        pool = _use_pool(model, pages)
        prefilled = []  # every admission's prefill length

        def prefill(model, ids):
            prefilled.append(ids.shape[1])
            return stream.plain_prefill(model, ids)

        run = stream.run_stream(model, requests, prefill=prefill, keep_tokens=True, trace_every=1, admit_horizon=0)
    got = [[int(t) for t in r.tokens] for r in requests]
    assert got == want
    assert run.completed == 4 and run.generated_tokens == sum(r.output_length for r in requests)
    assert run.max_running == 2 and pool.pages_in_use == 0 and pool.live_slots == []
    if pages == 24:  # a preempted request kept its tokens: prefilled again with its prompt, not generated again
        assert run.preemptions > 0 and any(r.preempted for r in requests) and run.recomputed_tokens > 0
        assert len(prefilled) == 4 + run.preemptions and sum(n - 8 for n in prefilled) == run.recomputed_tokens
    else:
        assert run.preemptions == 0 and run.recomputed_tokens == 0 and prefilled == [8] * 4
    row = run.as_row()
    assert row["requests_per_min"] > 0 and row["peak_pages"] <= pool.num_pages
    # the admitting time holds the prefills and the waits before them (none without a GPU's queue)
    assert 0 < row["prefill_s"] and 0 <= row["admission_wait_s"]
    assert row["prefill_s"] + row["admission_wait_s"] <= row["admission_s"]
    cell = stream._admitting(row)
    assert cell.endswith(" prefilling)") and "waiting for queued steps" in cell
    assert row["stream_trace"]["running"] and max(row["stream_trace"]["running"]) <= 2


def _without_trim_first(pool) -> None:
    """The stream's trim before a preemption made a no-op (a hand-out's own trims stay): the pool runs out as it
    did before that trim, for tests of what preemption keeps."""
    trim = pool.trim
    pool.trim = lambda **wait: trim(**wait) if wait else False


def test_a_request_preempted_twice_keeps_its_tokens():
    """Three slots, 42 pages, no trim before a preemption: one request is preempted, admitted again with its
    tokens, and preempted again; what it keeps the second time includes what it kept the first (its slot's
    history is restored), and every request still generates its solo tokens."""
    model = _tiny_model()
    requests = stream.make_requests(6, 8, (4, 24), vocab_size=model.config.vocab_size, seed=2)
    with torch.no_grad():
        want = [_solo(model, r) for r in requests]
        pool = _use_pool(model, 42, seqs=3)
        _without_trim_first(pool)
        run = stream.run_stream(model, requests, keep_tokens=True, trace_every=1, admit_horizon=0)
    assert max(r.preempted for r in requests) == 2 and run.recomputed_tokens > 0
    assert [[int(t) for t in r.tokens] for r in requests] == want
    assert pool.pages_in_use == 0 and pool.live_slots == []


def test_a_hand_out_that_runs_out_trims_before_it_preempts():
    """The pool above: without the trim a request is preempted twice; with it, a hand-out that runs out first
    returns the spare pages of earlier hand-outs, some run-outs end there, and no request is preempted twice;
    every request still generates its solo tokens and every page comes back."""
    model = _tiny_model()
    runs = {}
    for trim_first in (False, True):
        requests = stream.make_requests(6, 8, (4, 24), vocab_size=model.config.vocab_size, seed=2)
        with torch.no_grad():
            want = [_solo(model, r) for r in requests]
            pool = _use_pool(model, 42, seqs=3)
            if not trim_first:
                _without_trim_first(pool)
            runs[trim_first] = stream.run_stream(model, requests, keep_tokens=True, admit_horizon=0)
            runs[trim_first].most_preempted = max(r.preempted for r in requests)
        assert [[int(t) for t in r.tokens] for r in requests] == want
        assert pool.pages_in_use == 0 and pool.live_slots == []
    model.use_kv_pool(None)
    assert runs[True].exhausted_trims > runs[True].preemptions >= 0
    assert runs[True].most_preempted == 1 < runs[False].most_preempted == 2
    assert runs[True].as_row()["exhausted_trims"] == runs[True].exhausted_trims


def test_a_request_waits_without_a_prefill_while_not_a_page_a_head_fits():
    """Three slots, 32 pages: requests are preempted, and each goes back to the head of the queue. The queue's
    head is prefilled only when its pages could fit beside the running sequences' reserve, so no prefill is
    thrown away: one prefill an admission (the requests and the readmissions of the preempted); every request
    still generates its solo tokens."""
    model = _tiny_model()
    requests = stream.make_requests(6, 8, (4, 24), vocab_size=model.config.vocab_size, seed=2)
    prefilled = []

    def prefill(model, ids):
        prefilled.append(ids.shape[1])
        return stream.plain_prefill(model, ids)

    with torch.no_grad():
        want = [_solo(model, r) for r in requests]
        pool = _use_pool(model, 32, seqs=3)
        run = stream.run_stream(model, requests, prefill=prefill, keep_tokens=True, admit_horizon=0)
    assert run.preemptions >= 2 and len(prefilled) == len(requests) + run.preemptions
    assert [[int(t) for t in r.tokens] for r in requests] == want
    assert pool.pages_in_use == 0 and pool.live_slots == []


def _lands_at_the_fourth_poll(staged) -> bool:
    """A stand-in for ``Staged.landed``: an overlapped prefill still on its way at its first three polls."""
    staged.polls = getattr(staged, "polls", 0) + 1
    return staged.polls > 3


@pytest.mark.parametrize("pages", [400, 32], ids=["roomy", "preempting"])
def test_an_overlapped_prefill_is_admitted_once_it_lands(monkeypatch, pages):
    """With overlap_prefill a staged prefill that has not landed yet lets the loop go on (decoding the running
    sequences) and is admitted at a later step; here each lands at its fourth poll. With nothing running it is
    waited for (the first request). Every prefill leaves its packing to its admission (``pack_later``). Every
    request still generates its solo tokens, preempted or not, and every page comes back. Without CUDA nothing
    ran beside the decode, and the row says so."""
    staged, admitted = [], []  # every staged prefill; (polls, waited) of each admitted one
    packed_late = []  # whether each admitted prefill's K/V were still unpacked (its launch waited for nothing)

    def landed(self):
        staged.append(self)
        return _lands_at_the_fourth_poll(self)

    def wait(self):
        self.waited = True

    def admit(cache, slot, single, **kwargs):
        mine = next(s for s in staged if s.single is single)
        admitted.append((mine.polls, getattr(mine, "waited", False)))
        packed_late.append(all(layer.pending for layer in single.layers))
        return real_admit(cache, slot, single, **kwargs)

    real_admit = DMSCache.admit
    monkeypatch.setattr(stream.Staged, "landed", landed)
    monkeypatch.setattr(stream.Staged, "wait", wait)
    monkeypatch.setattr(DMSCache, "admit", admit)
    model = _tiny_model()
    requests = stream.make_requests(6, 8, (4, 24), vocab_size=model.config.vocab_size, seed=2)
    with torch.no_grad():
        want = [_solo(model, r) for r in requests]
        pool = _use_pool(model, pages, seqs=3)
        run = stream.run_stream(model, requests, keep_tokens=True, admit_horizon=0, overlap_prefill=True)
    assert [[int(t) for t in r.tokens] for r in requests] == want
    assert run.completed == 6 and pool.pages_in_use == 0 and pool.live_slots == []
    assert (run.preemptions > 0) == (pages == 32)
    assert len(admitted) == 6 + run.preemptions
    # none went in before it landed unless waited for (the first, with nothing running); most waited 3 polls
    assert all(polls >= 4 or waited for polls, waited in admitted) and admitted[0] == (1, True)
    assert sum(polls >= 4 and not waited for polls, waited in admitted) >= 4
    assert len(packed_late) == len(admitted) and all(packed_late)
    row = run.as_row()
    assert row["overlapped_prefill"] is False
    assert "launching" not in stream._admitting(row)


@pytest.mark.gpu
def test_overlapped_prefills_change_no_token_gpu():
    """On a GPU, prefills run on a side stream beside the decode steps (prompts of 256 tokens, long enough to
    overlap several steps): every request generates the tokens of the same stream with serial admissions."""
    model = build_model(tiny_config(dms_initial_alpha_offset=-40.0), backend="triton", dtype=torch.float32,
                        device="cuda")
    model.dms_capacity_step = 4
    requests = stream.make_requests(8, 256, (16, 64), vocab_size=model.config.vocab_size, seed=4)
    tokens = {}
    with torch.no_grad():
        for overlap in (False, True):
            _use_pool(model, 2048, seqs=3)
            mine = [dataclasses.replace(r) for r in requests]
            run = stream.run_stream(model, mine, keep_tokens=True, overlap_prefill=overlap)
            assert run.completed == 8 and run.overlapped_prefill == overlap
            tokens[overlap] = [[int(t) for t in r.tokens] for r in mine]
    assert tokens[True] == tokens[False]


def test_the_admitting_time_leaves_out_the_checks_that_admitted_nothing(monkeypatch):
    """Two slots, six requests, a roomy pool, a fake clock (one second a read): each step's admissions end with
    one check that admits nothing and prefills nothing (the slots are full, or the queue empty), which counts
    apart from the admitting time, one second a step; the admissions themselves (prefills in them) count in it."""
    model = _tiny_model()
    requests = stream.make_requests(6, 8, (3, 12), vocab_size=model.config.vocab_size, seed=3)
    _fake_clock(monkeypatch)
    with torch.no_grad():
        _use_pool(model, 400, seqs=2)
        run = stream.run_stream(model, requests, admit_horizon=0)
    assert run.completed == 6 and run.preemptions == 0 and run.exhausted_trims == 0
    assert run.admission_check_s == run.steps
    assert run.admission_s >= run.prefill_s + run.admission_wait_s and run.prefill_s >= 6
    row = run.as_row()
    assert row["admission_check_s"] == run.steps
    assert f"admitted nothing took {run.steps} s" in stream._step_and_census(dict(row, method="dms-triton"))


def test_a_window_counts_what_it_finished_and_generated(monkeypatch):
    """``duration_s`` stops the stream at the first step past the window (a fake clock, one second a read):
    completed requests are those that finished in it, the generated tokens are every token of the window (the
    running requests' so far too), and each request's tokens are still a prefix of its solo tokens. What the
    running ones hold at the end (a window of 4, so that they evict) is their solo caches'."""
    model = _tiny_model(dms_window_size=4)
    requests = stream.make_requests(5, 8, (3, 24), vocab_size=model.config.vocab_size, seed=2)
    _fake_clock(monkeypatch)
    with torch.no_grad():
        want = [_solo(model, r) for r in requests]
        _use_pool(model, 400)
        with pytest.raises(ValueError, match="duration_s must be a positive"):
            stream.run_stream(model, requests, duration_s=0)
        run = stream.run_stream(model, requests, keep_tokens=True, duration_s=100, admit_horizon=0)
    model.use_kv_pool(None)
    started = [r for r in requests if r.tokens is not None]
    assert run.wall_s >= 100 and run.preemptions == 0
    assert 0 < run.completed < 5 and run.running_at_end > 0
    assert run.completed + run.running_at_end + run.queued_at_end == 5
    assert run.generated_tokens == sum(len(r.tokens) for r in started)
    assert sum(len(r.tokens) == r.output_length for r in started) == run.completed
    for request in started:
        made = [int(t) for t in request.tokens]
        assert made == want[request.index][: len(made)]
    row = run.as_row()
    assert row["duration_s"] == 100 and row["requests_per_min"] == 60 * run.completed / run.wall_s
    # What the running ones held when the window closed: their positions, and per head the rows their solo
    # caches keep after the same tokens (no device here: no step's device time)
    running = [r for r in started if len(r.tokens) < r.output_length]
    seen = [r.prompt.shape[1] + len(r.tokens) - 1 for r in running]  # the last token is not fed yet
    with torch.no_grad():
        kept = [_solo_rows(model, r.prompt, [int(t) for t in r.tokens[:-1]]) for r in running]
    census = row["end_census"]
    assert census["running"] == run.running_at_end == len(running)
    assert census["mean_position"] == pytest.approx(sum(seen) / len(seen))
    assert census["kept_rows_per_head"] == pytest.approx(sum(kept) / len(kept))
    assert census["kept_rows_per_head"] < census["mean_position"]  # the tiny model evicts
    step = model.dms_capacity_step
    assert census["kept_rows_per_head"] <= census["held_rows_per_head"] <= census["kept_rows_per_head"] + 3 * step + 4
    assert census["plain"] == {k: v for k, v in census.items() if k != "plain"}  # no stand-ins
    assert row["device_step_ms"] is None and row["device_decode_s"] is None
    # every counted step under the scheduler its graph was keyed by
    assert set(row["schedule_steps"]) <= {"per_head", "balanced"}
    assert sum(row["schedule_steps"].values()) == row["decode_steps"] > 0


def test_admission_keeps_pages_for_growth():
    """The pool that made requests preempted above (24 pages of 4 rows, two slots): with pages kept
    for 4 steps of growth at the most a sequence grows, admission waits instead, nothing is preempted, and
    every request still generates its solo tokens."""
    model = _tiny_model()
    runs = {}
    for horizon in (0, 4):
        requests = stream.make_requests(4, 8, (3, 10), vocab_size=model.config.vocab_size, seed=1)
        with torch.no_grad():
            pool = _use_pool(model, 24)
            runs[horizon] = stream.run_stream(model, requests, keep_tokens=True, admit_horizon=horizon)
            want = [_solo(model, r) for r in requests]
        assert [[int(t) for t in r.tokens] for r in requests] == want
        assert runs[horizon].completed == 4 and pool.pages_in_use == 0
    model.use_kv_pool(None)
    assert runs[0].preemptions > 0 and runs[4].preemptions == 0


def test_a_warm_up_is_not_counted(monkeypatch):
    """``warmup_s``: the row counts from the first step past the warm-up: completed requests, tokens, steps
    and the wall time are differences from that step's (a fake clock, one second a read)."""
    model = _tiny_model()
    requests = stream.make_requests(30, 8, (3, 12), vocab_size=model.config.vocab_size, seed=4)
    _fake_clock(monkeypatch)
    with torch.no_grad():
        _use_pool(model, 400)
        with pytest.raises(ValueError, match="warmup_s must be"):
            stream.run_stream(model, requests, warmup_s=5)
        run = stream.run_stream(model, requests, keep_tokens=True, duration_s=40, warmup_s=30, admit_horizon=0,
                                trace_every=1)
    model.use_kv_pool(None)
    before = run.before
    # running when the window opened: the trace's last point before it (one a step, nothing admitted between)
    times = run.trace["time_s"]
    last = max(i for i, t in enumerate(times) if t < run.counted_from_s)
    assert run.as_row()["running_at_start"] == run.trace["running"][last] > 0
    assert run.counted_from_s >= 30 and run.wall_s >= run.counted_from_s + 40  # the window is 40 s after it
    assert 0 < before["completed"] < run.completed and 0 < before["steps"] < run.steps
    row = run.as_row()
    started = [r for r in requests if r.tokens is not None]
    assert row["completed"] == run.completed - before["completed"]
    assert row["generated_tokens"] == sum(len(r.tokens) for r in started) - before["tokens"]
    assert row["wall_s"] == run.wall_s - run.counted_from_s and row["warmup_wall_s"] == run.counted_from_s
    assert row["requests_per_min"] == 60 * row["completed"] / row["wall_s"]


def test_a_window_that_caught_a_transient_says_so():
    """stream.md adds a line for a window whose running sequences moved by more than a fifth between its start
    and its end (the H100's cold start in the card's memory: 282 to 61), none for a steady one or a stream run
    to its end."""
    meta = {"model": "m", "dtype": "bfloat16", "date": "d", "requests": 8, "prompt_length": 4,
            "output_lengths": [2, 4], "seed": 0, "max_running": 4, "duration_s": 150.0, "warmup_s": 60.0,
            "command": "c"}
    rows = [{"method": "dense-triton", "status": "ok", "running_at_start": 282, "running_at_end": 61},
            {"method": "dms-triton", "status": "ok", "running_at_start": 300, "running_at_end": 250}]
    md = stream.render_stream_markdown(meta, rows)
    assert "| 282 → 61 (-) |" in md
    assert "- dense-triton: not a steady state: 282 sequences ran when the window opened and 61 when" in md
    assert "dms-triton: not a steady state" not in md  # 250 of 300: within a fifth
    assert stream.transient_note({**meta, "duration_s": None}, rows[0]) is None
    assert stream.transient_note(meta, {**rows[0], "status": "OOM"}) is None
    # the device's decode step and the end's census, where measured: a line each method
    census = {"running": 250, "mean_position": 6400.0, "kept_rows_per_head": 1300.0, "held_rows_per_head": 1400.0}
    rows[1] |= {"device_step_ms": 23.4, "device_decode_s": 46.0, "decode_steps": 1968,
                "schedule_steps": {"per_head": 968, "balanced": 1000},
                "end_census": census | {"plain": census | {"running": 100, "kept_rows_per_head": 1250.0}}}
    md = stream.render_stream_markdown(meta, rows)
    assert ("- dms-triton: a decode step took 23.4 ms on the device (median of the window's 1968; 46 s of "
            "decoding in all); decode attention's steps by scheduler: balanced 1000, per_head 968; at the end "
            "250 at a mean position of 6,400 tokens, a head keeping 1,300 rows and "
            "its pages holding 1,400 (of them, the requests that did not start part-way: 100 at a mean position "
            "of 6,400 tokens, a head keeping 1,250 rows") in md
    assert "- dense-triton: a decode step" not in md


def test_mean_running_and_the_rate_by_tokens():
    """A hand-made run: 4 sequences for 10 s before counting starts at 10 s, then 6 for 20 s and 2 for 10 s,
    so 14/3 on average over the counted 30 s; 9,000 tokens kept in them at a mean output length of 1,500 is
    300 tok/s, a steady stream's 12 requests a minute, whatever the window's own completions were (1)."""
    run = stream.StreamRun(8, 3, 40.0, 10_000, 0, 1, 1, 6, 0, 0, duration_s=30, warmup_s=10,
                           counted_from_s=10.0, mean_output_length=1500.0,
                           before={"completed": 2, "tokens": 1_000})
    for t, n in ((0.0, 4), (10.0, 6), (30.0, 2), (40.0, 2)):
        run.record(t, n, 0)
    row = run.as_row()
    assert row["mean_running"] == pytest.approx((6 * 20 + 2 * 10) / 30)
    assert row["total_tok_s"] == pytest.approx(300.0)
    assert row["requests_per_min_by_tokens"] == pytest.approx(12.0)
    assert row["requests_per_min"] == pytest.approx(2.0)
    run.mean_output_length = 0.0
    assert run.as_row()["requests_per_min_by_tokens"] is None


def test_a_steady_start_draws_requests_in_flight():
    """``steady_start``: the first ``count`` requests stand in for a steady stream's running ones (seeded): output
    lengths within the range, drawn in proportion to length (their mean is E[L^2] / E[L] of the plain range's, not
    E[L]); progress 0 .. L - 2 ids, about half the length on average; the rest of the queue is the plain
    requests, and each stand-in keeps its plain request."""
    plain = stream.make_requests(4000, 4, (2, 2000), vocab_size=50, seed=5)
    started = stream.steady_start(plain, 3000, (2, 2000), vocab_size=50, seed=5)
    again = stream.steady_start(plain, 3000, (2, 2000), vocab_size=50, seed=5)
    assert [r.output_length for r in started] == [r.output_length for r in again]
    assert all(a is b for a, b in zip(started[3000:], plain[3000:], strict=True))
    started = started[:3000]
    assert all(r.plain is p for r, p in zip(started, plain, strict=False))
    assert all(2 <= r.output_length <= 2000 for r in started)
    done = [0 if r.resumed is None else r.resumed.shape[1] for r in started]
    assert all(0 <= k <= r.output_length - 2 for k, r in zip(done, started, strict=True))
    assert all(int(r.resumed.max()) < 50 for r in started if r.resumed is not None)
    lengths = range(2, 2001)
    biased_mean = sum(n * n for n in lengths) / sum(lengths)  # 1334.3; the plain mean is 1001
    assert sum(r.output_length for r in started) / 3000 == pytest.approx(biased_mean, rel=0.02)
    assert sum(k / r.output_length for k, r in zip(done, started, strict=True)) / 3000 == pytest.approx(0.5, abs=0.02)
    assert len(stream.steady_start(plain[:3], 10, (2, 2000), vocab_size=50, seed=5)) == 3


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_a_steady_start_runs_its_requests_from_where_they_were(monkeypatch, overlap):
    """Six requests, the first four standing in for requests in flight, two slots: the first admission takes
    two of them, which prefill their prompt and progress and generate the rest as they would alone; the two it
    did not take queue as their plain requests again; every request ends, every page comes back, and the
    window's tokens leave out the progress the stand-ins came with. Without a warm-up, refused. Overlapped
    prefills that land at their fourth poll change none of it: the first admission waits for them."""
    if overlap:
        monkeypatch.setattr(stream.Staged, "landed", _lands_at_the_fourth_poll)
        monkeypatch.setattr(stream.Staged, "wait", lambda self: None)
    model = _tiny_model()
    plain = stream.make_requests(6, 8, (6, 14), vocab_size=model.config.vocab_size, seed=3)
    requests = stream.steady_start(plain, 4, (6, 14), vocab_size=model.config.vocab_size, seed=3)
    assert all(r.resumed is not None for r in requests[:2])  # the two admitted first come part-way

    def progress(r):
        return [] if r.resumed is None else [int(t) for t in r.resumed[0]]

    with torch.no_grad():
        want = [progress(r) + _solo(model, r, r.prefill_ids(), r.output_length - len(progress(r)))
                for r in requests[:2]]
        want += [_solo(model, r) for r in plain[2:]]
        came_with = sum(len(progress(r)) for r in requests[:2])
        pool = _use_pool(model, 400)
        with pytest.raises(ValueError, match="steady start"):
            stream.run_stream(model, requests, duration_s=100)
        _fake_clock(monkeypatch)
        run = stream.run_stream(model, requests, keep_tokens=True, duration_s=10**5, warmup_s=3, admit_horizon=0,
                                overlap_prefill=overlap)
    model.use_kv_pool(None)
    ran = [*requests[:2], *plain[2:]]
    assert [[int(t) for t in r.tokens] for r in ran] == want
    assert requests[2].tokens is None and requests[3].tokens is None  # not in flight: their plain ones ran
    assert run.completed == 6 and pool.pages_in_use == 0 and pool.live_slots == []
    assert run.mean_output_length == sum(r.output_length for r in plain) / 6
    row = run.as_row()
    assert run.before["tokens"] >= came_with  # counting began after the first admission
    assert row["end_census"] is None  # every request ended: none running
    assert row["generated_tokens"] == sum(len(r.tokens) for r in ran) - run.before["tokens"]


def test_each_method_streams_its_own_copy_of_the_requests():
    """stream_method runs copies: a stand-in's progress and a request's marks (admission, tokens) stay as they
    were for the next method."""
    from dms_perf.bench.methods import load_model_for, resolve_method

    method = resolve_method("dense-triton")
    model, _ = load_model_for("tiny", method, dtype=torch.float32, device="cpu")
    plain = stream.make_requests(3, 8, (3, 6), vocab_size=model.config.vocab_size, seed=0)
    requests = stream.steady_start(plain, 1, (3, 6), vocab_size=model.config.vocab_size, seed=0)
    progress = requests[0].resumed
    row = stream.stream_method(model, method, requests, budget_gib=0.002, max_running=2, duration_s=600,
                               warmup_s=1e-6)
    assert row["status"] == "ok"
    assert requests[0].resumed is progress and all(r.admitted_at is None and r.tokens is None for r in requests)


def test_a_request_that_cannot_run_alone_is_an_oom_error():
    """A pool of one 4-row page a head cannot take a 12-token prompt: run_stream raises the pool's
    out-of-memory error (no request can ever run), which a bench row reports as OOM."""
    from dms_perf.bench.methods import load_model_for, resolve_method

    method = resolve_method("dense-triton")
    model, _ = load_model_for("tiny", method, dtype=torch.float32, device="cpu")
    requests = stream.make_requests(1, 12, (3, 3), vocab_size=model.config.vocab_size, seed=0)
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    budget = PagedKVPool.budget_for_pages(model, heads, max_seqs=1, page_rows=4)
    model.use_kv_pool(PagedKVPool.for_budget(model, budget, max_seqs=1, page_rows=4))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="exhausted"):
        stream.run_stream(model, requests)
    model.use_kv_pool(None)
    row = stream.stream_method(model, method, requests, budget_gib=budget / 2**30, max_running=1)
    assert row["status"] == "OOM"


def test_the_cli_writes_the_stream_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["bench", "--requests", "3", "--contexts", "16", "--methods", "dms-triton,dense-triton", "--model", "tiny",
            "--dtype", "float32", "--output-lengths", "2-6", "--max-running", "2", "--page-rows", "8",
            "--out", str(out)]
    assert cli.main(args) == 0
    data = json.loads((out / "stream.json").read_text())
    assert [r["method"] for r in data["results"]] == ["dms-triton", "dense-triton"]
    assert all(r["status"] == "ok" and r["completed"] == 3 and r["page_rows"] == 8 for r in data["results"])
    assert data["meta"]["output_lengths"] == [2, 6] and data["meta"]["max_running"] == 2
    assert data["meta"]["page_rows"] == 8
    assert "| dms-triton | ok |" in (out / "stream.md").read_text()
    assert "- KV pool pages of 8 rows (--page-rows)" in (out / "stream.md").read_text()
    assert (out / "running_vs_time.png").stat().st_size > 0
    capsys.readouterr()
    bad = {
        ("--methods", "dms-hub"): "paged KV pool",
        ("--output-lengths", "9-3"): "LOW <= HIGH",
        ("--contexts", "16,32"): "one context length",
        ("--memory-budget", "0.000001"): "cannot hold one request",
        ("--requests", "0"): "--requests must be >= 1",
        ("--max-running", "-1"): "--max-running must be >= 1",
        ("--duration", "0"): "--duration must be a positive",
        ("--warmup-seconds", "5"): "beside --duration",
        ("--steady-start", ""): "--steady-start needs --warmup-seconds",
        ("--capacity-step", "0"): "--capacity-step must be >= 1",
        ("--page-rows", "48"): "--page-rows must be a power of two",
        ("--page-rows", "0"): "--page-rows must be a power of two",
        ("--requests", None): "add --requests N",
    }
    for (option, value), message in bad.items():
        argv = list(args)
        if value is None:  # the stream's own options without a stream
            del argv[argv.index(option) : argv.index(option) + 2]
        elif value == "":  # a flag
            argv.append(option)
        elif option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    cells = ["bench", "--contexts", "16", "--methods", "dms-triton", "--model", "tiny", "--overlap-prefill"]
    assert cli.main(cells) == 2
    assert "--overlap-prefill set(s) a request stream" in capsys.readouterr().err
    assert cli.main([*cells[:-1], "--page-rows", "16"]) == 2
    assert "--page-rows set(s) a request stream" in capsys.readouterr().err


def test_report_joins_streams_run_one_method_at_a_time(tmp_path, capsys):
    """Streams run in parts (one method per device call) join through ``dms-perf report`` when their
    options, card and pool budget agree; any difference, or a stream beside bench cells, is one line."""
    common = ["bench", "--requests", "2", "--contexts", "16", "--model", "tiny", "--dtype", "float32",
              "--output-lengths", "2-4", "--max-running", "2"]
    for method in ("dms-triton", "dense-triton"):
        assert cli.main([*common, "--methods", method, "--out", str(tmp_path / method)]) == 0
    joined = tmp_path / "joined"
    assert cli.main(["report", str(tmp_path / "dms-triton"), str(tmp_path / "dense-triton" / "stream.json"),
                     "--out", str(joined)]) == 0
    data = json.loads((joined / "stream.json").read_text())
    assert [r["method"] for r in data["results"]] == ["dms-triton", "dense-triton"]
    assert data["meta"]["methods"] == ["dms-triton", "dense-triton"] and data["meta"]["command"].count("dms-perf") == 2
    assert "| dense-triton | ok |" in (joined / "stream.md").read_text()
    assert (joined / "running_vs_time.png").stat().st_size > 0
    capsys.readouterr()

    other = tmp_path / "other-seed"
    assert cli.main([*common, "--methods", "dense-triton", "--seed", "1", "--out", str(other)]) == 0
    window = ["--duration", "600", "--warmup-seconds", "1e-6"]
    steady = tmp_path / "steady"  # both methods of one process, each from the same steady start
    assert cli.main([*common, "--methods", "dms-triton,dense-triton", *window, "--steady-start",
                     "--out", str(steady)]) == 0
    assert cli.main([*common, "--methods", "dense-triton", *window, "--out", str(cold := tmp_path / "cold")]) == 0
    later = tmp_path / "later"  # the same window after another warm-up: joins, each row with its own
    assert cli.main([*common, "--methods", "dense-triton", "--duration", "600", "--warmup-seconds", "2e-6",
                     "--steady-start", "--out", str(later)]) == 0
    assert cli.main(["report", str(steady), str(later), "--out", str(tmp_path / "j2")]) == 0
    assert "after a warm-up of 1e-06 s for dms-triton, 2e-06 s for dense-triton (" in (
        tmp_path / "j2" / "stream.md").read_text()
    data = json.loads((steady / "stream.json").read_text())
    assert data["meta"]["steady_start"] is True and [r["status"] for r in data["results"]] == ["ok", "ok"]
    assert "- steady start: the requests of the first admission began part-way" in (steady / "stream.md").read_text()
    budget = tmp_path / "other-budget"
    assert cli.main([*common, "--methods", "dense-triton", "--memory-budget", "0.01", "--out", str(budget)]) == 0
    pages = tmp_path / "other-pages"
    assert cli.main([*common, "--methods", "dense-triton", "--page-rows", "8", "--out", str(pages)]) == 0
    tiny_cells(cells := tmp_path / "cells")
    assert_report_refuses(capsys, tmp_path / "dms-triton", (
        ((other,), "its seed 1 differs from 0"), ((budget,), "pool budget"),
        ((pages,), "its page_rows 8 differs from None"),
        ((steady,), "its duration_s 600.0 differs from None"),
        ((cells,), "join only with request streams (stream.json)")), tmp_path / "x")
    assert_report_refuses(capsys, steady, (((cold,), "its steady_start None differs from True"),), tmp_path / "y")
