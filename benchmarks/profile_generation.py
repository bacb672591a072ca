"""Where a long generation's decode step spends its time, for one method at one batch.

    PYTHONPATH=. python3 benchmarks/profile_generation.py --method dms-triton --batch 142 --new-tokens 16k \
        --out profile.json

Runs what a ``dms-perf capacity --new-tokens`` try runs (``dms_perf.bench.batch_search``): one prompt prefilled,
its cache copied into every slot of a paged pool sized from the budget, then greedy decode steps. Prints, per
chunk of ``--chunk`` steps, the ms per step and its floor fraction (the weights and the KV the pool holds at the
chunk's end, read once at the measured copy bandwidth: a step's floor grows with its KV), and whether the decode
kernel ran ``per_head`` or ``balanced``. After ``--profile-at`` steps (default: the last chunk), torch.profiler's
table over ``--profile-steps`` steps, then the step under each decode scheduler (``--ab-steps`` steps each, after
a warm-up that captures their graphs). Used for benchmarks/NOTES.md; not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dms_perf.model.cache as cache_module
from dms_perf._runtime import HAS_CUDA
from dms_perf.bench.batch_search import Prompt, _decode, generation_pool_budget
from dms_perf.bench.floors import bandwidth_floor, weight_bytes
from dms_perf.bench.generation import engine_pool
from dms_perf.bench.methods import load_model_for, resolve_method
from dms_perf.bench.options import DEFAULT_TARGET_CR, parse_token_count
from dms_perf.bench.timing import copy_bandwidth_bytes_per_s, synchronize
from dms_perf.model.cache import DMSCache
from dms_perf.ops.decode.kernel import SCHEDULES


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b" if HAS_CUDA else "tiny")
    parser.add_argument("--method", default="dms-triton")
    parser.add_argument("--batch", type=int, default=142)
    parser.add_argument("--context", type=parse_token_count, default=1024)
    parser.add_argument("--new-tokens", type=parse_token_count, default=16384)
    parser.add_argument("--chunk", type=int, default=1000, help="decode steps per timed chunk")
    parser.add_argument("--profile-at", type=int, default=None, help="steps decoded before the profile")
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--ab-steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    steps = args.new_tokens - 1
    extra = args.profile_steps + 2 * (args.ab_steps + 8)
    profile_at = steps - extra if args.profile_at is None else args.profile_at
    if not 0 <= profile_at <= steps - extra:
        parser.error(f"--profile-at {profile_at}: the profile and the A/B take {extra} of the {steps} steps")

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    method = resolve_method(args.method)
    model, _ = load_model_for(args.model, method, dtype=dtype, device=device, seed=args.seed,
                              target_cr=DEFAULT_TARGET_CR)
    method.prepare(model)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 2**31 - 1, (1, args.context), generator=generator) % model.config.vocab_size
    prompt = Prompt(model, ids.to(device), method=method)
    template, first = prompt.prefill()
    budget = torch.cuda.mem_get_info()[0] if HAS_CUDA else 8 << 30
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth_bytes_per_s() if HAS_CUDA else None
    report = {"device": torch.cuda.get_device_name() if HAS_CUDA else "cpu", "args": vars(args),
              "weights_bytes": weights, "copy_bytes_per_s": bandwidth, "chunks": [], "schedulers": {}}

    with torch.inference_mode():
        token = first.repeat(args.batch, 1)
        _, pool_budget = generation_pool_budget(prompt, template, args.batch, new_tokens=args.new_tokens, budget=budget)
        pool = engine_pool(model, max_seqs=args.batch, budget_bytes=pool_budget)
        cache = DMSCache.repeated(template, args.batch, pool=pool, consume=not prompt.reuse)
        del template
        position = torch.full((args.batch, 1), args.context, device=device)

        def timed(n: int) -> float:
            synchronize()
            begun = time.perf_counter()
            _decode(model, cache, token, position, n)
            synchronize()
            return (time.perf_counter() - begun) / n * 1e3

        done = 0
        while done < profile_at:
            n = min(args.chunk, profile_at - done)
            ms = timed(n)
            done += n
            kv = pool.bytes_in_use
            row = {"steps": done, "ms_per_step": ms, "kv_bytes": kv, "schedule": cache.layers[0].schedule,
                   "spread": pool.bound_spread(args.batch)}
            if bandwidth:
                floor = bandwidth_floor(weights + kv, ms / 1e3)
                row.update(floor_ms=floor["floor_ms"], floor_fraction=floor["floor_fraction"])
            report["chunks"].append(row)
            print(json.dumps(row), flush=True)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if HAS_CUDA:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            _decode(model, cache, token, position, args.profile_steps)
            synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total" if HAS_CUDA else "cpu_time_total", row_limit=30)
        report["profile_table"] = table
        print(table, flush=True)

        rule = cache_module.decode_schedule  # the rule the cache's layers apply, replaced by each scheduler
        try:
            for name in SCHEDULES:
                cache_module.decode_schedule = lambda spread, heads, name=name: name
                timed(8)  # captures this scheduler's graphs
                report["schedulers"][name] = {"ms_per_step": timed(args.ab_steps), "ran": cache.layers[0].schedule,
                                              "kv_bytes": pool.bytes_in_use}
                print(name, json.dumps(report["schedulers"][name]), flush=True)
        finally:
            cache_module.decode_schedule = rule
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
