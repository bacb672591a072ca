"""Sweep launch configs of the fused DMS prefill kernel on this GPU (how its autotune list was chosen).

    PYTHONPATH=. python3 benchmarks/tune_prefill.py --context-lengths 8192,32768

Runs the kernel directly (bypassing the autotuner) at the Qwen3-8B shape of the prefill benchmark
(B=1, Hq=32, Hkv=8, D=128, bf16, window 512, 7/8 marked) for each (ROWS, BLOCK_N, warps, stages) and
prints do_bench medians and each output's largest difference from the first config's; configs that do
not fit the card print their error. Results: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton

from dms_perf.bench.timing import do_bench_ms
from dms_perf.ops.prefill.fused import dms_prep, launch_prefill_kernel
from dms_perf.rule import count_visible_pairs

CANDIDATES = [
    # (ROWS, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3),
    (64, 64, 4, 3), (64, 128, 4, 3), (256, 64, 8, 3), (256, 64, 16, 3), (256, 128, 16, 2),
    (256, 128, 16, 3), (256, 64, 16, 4), (128, 32, 8, 4),
]


def _launch(q, k, v, k_kept, v_kept, kept_upto, decisions, out, rows, block_n, warps, stages):
    config = dict(ROWS=rows, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    launch_prefill_kernel(q, k, v, k_kept, v_kept, kept_upto, decisions, out, out, 512, q.shape[-1] ** -0.5, False,
                          config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-lengths", default="8192,32768")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    for n in (int(x) for x in args.context_lengths.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
        decisions = torch.rand(1, 8, n, device="cuda", generator=gen) < 7 / 8
        flops = 4 * 128 * 4 * count_visible_pairs(decisions, 512)
        k_kept, v_kept, kept_upto = dms_prep(k, v, decisions)
        out = torch.empty_like(q)
        expected = None
        for rows, block_n, warps, stages in CANDIDATES:
            call = functools.partial(
                _launch, q, k, v, k_kept, v_kept, kept_upto, decisions, out, rows, block_n, warps, stages
            )
            label = f"N={n} ROWS={rows} BLOCK_N={block_n} warps={warps} stages={stages}"
            try:
                out.fill_(float("nan"))
                call()
                # Every config must give the first one's output (bf16 rounding apart), else its time is void.
                expected = out.clone() if expected is None else expected
                diff = (out.float() - expected.float()).abs().max().item()
                ms = do_bench_ms(call)
                print(f"{label}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s (visible), "
                      f"max |diff| vs first config {diff:.2e}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result here
                print(f"{label}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)


if __name__ == "__main__":
    main()
