"""How far the decode engine's logits drift from the model's, against an fp32 reference, on this card.

    python -m benchmarks.engine_drift [--prompt 4096] [--steps 32] [--seed 0]

The GPU test ``tests/model/test_fused.py::test_engine_matches_the_plain_model_at_the_8b_shape_gpu``
compares the engine with the plain bf16 model over teacher-forced steps at the Qwen3-8B shape (random
weights, eviction calibrated to 8x). This script measures every variant that test could be confused by,
on the same prompt and tokens, against the same model run in fp32 (the bf16 weights cast up, transformers'
modules, its own cache): the plain model on transformers' modules and on Liger's kernels, and the engine
with its decode steps replayed from CUDA graphs or run eagerly, with each projection on ``skinny_linear``
or on cuBLAS. Per variant: the logits' relative error against fp32, the steps whose argmax differs from
fp32's, and the top-2 gap (of fp32's logits) at those steps. A variant that composes its kernels wrongly
shows up as a larger error than the plain model's and as graphs != eager; a card where bf16 rounding alone
flips argmax at gaps above the test's threshold shows up as the plain model flipping there too.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from dms_perf.bench.generation import engine_pool
from dms_perf.model.calibrate import calibrate_dms
from dms_perf.model.fused import apply_engine_fusions, apply_fused_kernels
from dms_perf.model.qwen3_dms import build_model, qwen3_8b_config, tiny_config
from dms_perf.ops.linear import kernel as linear
from dms_perf.testing import rel_error, teacher_forced_logits


@contextlib.contextmanager
def skinny_on(projections: set[str]):
    """decode_linear takes skinny_linear only for the named projections (``linear.PROJECTIONS``; the rest:
    cuBLAS)."""
    saved = linear.SKINNY_PROJECTIONS
    linear.SKINNY_PROJECTIONS = frozenset(projections)
    try:
        yield
    finally:
        linear.SKINNY_PROJECTIONS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-evict", action="store_true", help="decide no eviction (dense-triton's computation)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config (a dry run of this script on the CPU)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = tiny_config() if args.tiny else qwen3_8b_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    evict = not args.no_evict
    print(f"card: {card}; prompt {args.prompt}, {args.steps} teacher-forced steps, eviction {'on' if evict else 'off'}")

    plain = build_model(config, backend="triton", dtype=torch.bfloat16, device=device, seed=args.seed)
    offset = calibrate_dms(plain, target_cr=8, num_tokens=min(2048, args.prompt)).alpha_offset
    plain.set_dms_eviction(evict)
    plain.config.dms_initial_alpha_offset = offset
    ids = torch.randint(0, config.vocab_size, (1, args.prompt), device=device)
    with torch.inference_mode():
        tokens = plain.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps,
                                do_sample=False)[:, ids.shape[1]:]
    runs = {"plain bf16 (transformers modules)": teacher_forced_logits(plain, ids, tokens, plain.make_dms_cache())}
    assert apply_fused_kernels(plain) or device == "cpu"
    runs["plain bf16 + Liger (the test's want)"] = teacher_forced_logits(plain, ids, tokens, plain.make_dms_cache())
    del plain
    torch.cuda.empty_cache()
    # The same bf16 weights (same seed), cast up: fp32 arithmetic on transformers' modules.
    exact = build_model(config, backend="triton", dtype=torch.bfloat16, device=device, seed=args.seed).float()
    exact.config.dms_initial_alpha_offset = offset
    exact.set_dms_eviction(evict)
    reference = teacher_forced_logits(exact, ids, tokens, exact.make_dms_cache())
    del exact
    torch.cuda.empty_cache()

    engine = build_model(config, backend="triton", dtype=torch.bfloat16, device=device, seed=args.seed)
    engine.config.dms_initial_alpha_offset = offset
    engine.set_dms_eviction(evict)
    apply_engine_fusions(engine)
    variants = {
        "engine, graphs, skinny on all four": (True, {"qkv", "o", "gate_up", "down"}),
        "engine, eager, skinny on all four": (False, {"qkv", "o", "gate_up", "down"}),
        "engine, graphs, cuBLAS on all four": (True, set()),
        "engine, eager, cuBLAS on all four": (False, set()),
        "engine, graphs, skinny on gate/up + down": (True, {"gate_up", "down"}),
        "engine, graphs, skinny on q/k/v + o": (True, {"qkv", "o"}),
    }
    for name, (graphs, projections) in variants.items():
        engine.dms_cuda_graphs = graphs
        engine_pool(engine, max_seqs=1, budget_bytes=20 * 2**30 if device == "cuda" else 2**27)
        with skinny_on(projections):
            for _ in range(2):  # the second generation replays the graphs the first captured
                runs[name] = teacher_forced_logits(engine, ids, tokens, engine.make_dms_cache(capacity_step=64))
        engine.use_kv_pool(None)
        torch.cuda.empty_cache()

    top = reference.topk(2, dim=-1).values
    gap = (top[:, 0] - top[:, 1]) / top[:, 0].abs()
    want = runs["plain bf16 + Liger (the test's want)"]
    print(f"steps whose fp32 top-2 gap exceeds 2 %: {int((gap > 0.02).sum())} of {len(gap)}")
    print(f"{'variant':44} {'err vs fp32':>11} {'err vs want':>11}  argmax != fp32 at steps (fp32 gap %)")
    for name, logits in runs.items():
        differ = (logits.argmax(-1) != reference.argmax(-1)).nonzero().flatten().tolist()
        gaps = ", ".join(f"{s}({100 * float(gap[s]):.2f})" for s in differ)
        print(f"{name:44} {rel_error(logits, reference):11.4f} {rel_error(logits, want):11.4f}  [{gaps}]")
    top = want.topk(2, dim=-1).values
    want_gap = (top[:, 0] - top[:, 1]) / top[:, 0].abs()
    print(f"the test's view: steps whose argmax differs from the Liger model's, with its top-2 gap % "
          f"({int((want_gap > 0.02).sum())} steps above 2 %)")
    for name, logits in runs.items():
        differ = (logits.argmax(-1) != want.argmax(-1)).nonzero().flatten().tolist()
        print(f"{name:44} [{', '.join(f'{s}({100 * float(want_gap[s]):.2f})' for s in differ)}]")
    graphs_vs_eager = rel_error(runs["engine, graphs, skinny on all four"], runs["engine, eager, skinny on all four"])
    print(f"graphs vs eager (skinny on all four): rel. error {graphs_vs_eager:.3g}")
    cublas = rel_error(runs["engine, graphs, cuBLAS on all four"], runs["engine, eager, cuBLAS on all four"])
    print(f"graphs vs eager (cuBLAS on all four): rel. error {cublas:.3g}")


if __name__ == "__main__":
    main()
