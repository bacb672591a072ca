"""What ``dms-perf capacity`` writes: capacity.json (after every (context, method)), capacity.md (the
largest batch per method, then every tried batch) and throughput_vs_batch.png (``dms_perf.bench.report``'s
batch figure, each method's largest batch marked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dms_perf.bench.batch_search import gib
from dms_perf.bench.report import BATCH_PLOT, ResultsWriter, _batch_figure, _num, card_name, method_styles, no_gpu

JSON_NAME = "capacity.json"
MD_NAME = "capacity.md"
PLOT_NAME = BATCH_PLOT


class CapacityWriter(ResultsWriter):
    """capacity.json, rewritten after every (context, method), then capacity.md and the plot."""

    json_name = JSON_NAME
    rows_key = "results"

    def ordered(self) -> list[dict[str, Any]]:
        methods = self.meta["methods"]
        return sorted(self.rows, key=lambda r: (r["context"], methods.index(r["method"])))

    def finish(self) -> list[Path]:
        results = self.ordered()
        md = self.out_dir / MD_NAME
        md.write_text(render_markdown(self.meta, results))
        plot = self.out_dir / PLOT_NAME
        build_figure(self.meta, results).savefig(plot, dpi=120, bbox_inches="tight")
        self._write_json()
        return [self.json_path, md, plot]


# What two capacity runs must share to stand side by side in one table (meta keys).
CAPACITY_JOIN_KEYS = ("model", "dtype", "memory_budget_bytes", "new_tokens", "steps", "warmup_steps", "seed",
                      "target_cr", "max_batch", "batch_fill")


def merge_capacity(paths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join capacity runs made in parts (one method per device call: a 16K-token generation at each tried
    batch takes minutes) through ``report.join_outputs``: they join when their card and everything in
    ``CAPACITY_JOIN_KEYS`` agree (the budget to the byte: a budget of the card's free memory joins when fresh
    processes on one card model found the same, as the H100's did). A (context, method) present twice keeps the
    later result. Meta is the first run's, with every run's date and the weights' note of the joined methods
    (a checkpoint's runs: each run's note, which may need its files to be made again)."""
    from dms_perf.bench.methods import is_model_path, resolve_methods, weights_note
    from dms_perf.bench.report import join_outputs

    notes = []

    def absorb(meta, other):
        meta["date"] = " / ".join(dict.fromkeys([*str(meta.get("date")).split(" / "), str(other.get("date"))]))
        notes.append(other.get("weights"))

    meta, rows = join_outputs(paths, json_name=JSON_NAME, rows_key=CapacityWriter.rows_key,
                              join_keys=CAPACITY_JOIN_KEYS, row_id=lambda r: (r["context"], r["method"]),
                              what=f"a capacity run's {JSON_NAME}", absorb=absorb)
    meta["contexts"] = sorted({r["context"] for r in rows})
    if is_model_path(meta["model"]):
        meta["weights"] = "; ".join(dict.fromkeys(str(n) for n in [meta.get("weights"), *notes]))
    else:
        meta["weights"] = weights_note(meta["model"], resolve_methods(meta["methods"]), meta.get("target_cr"))
    return meta, rows


def write_capacity_outputs(out_dir, meta: dict[str, Any], results: list[dict[str, Any]]) -> list[Path]:
    """capacity.json, capacity.md and the plot of ``results`` (a joined run); returns the files written."""
    writer = CapacityWriter(out_dir, meta)
    for result in results:
        writer.add(result)
    return writer.finish()


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


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| context | method | largest batch | tok/s at it | ms/step | peak GiB |",
             "|---:|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['context']} | {r['method']} | {_largest(r)} | {_num(r['tok_s'])} | "
                     f"{_num(r['step_ms'])} | {gib(r['peak_bytes'])} |")
    return "\n".join(lines)


def _caveats(meta: dict[str, Any]) -> list[str]:
    notes = [meta["weights"]]
    if no_gpu(meta) and any("triton" in m for m in meta["methods"]):
        notes.append("Triton kernels ran in Triton's interpreter on the CPU: the times are not speeds")
    return notes


def _throughput_note(meta: dict[str, Any]) -> str:
    if meta.get("new_tokens"):
        return (f"every decode step of a {meta['new_tokens']}-token generation per tried batch, timed as one span "
                "(CUDA-graph capture included, no untimed steps); tok/s = batch / mean step time")
    return (f"{meta['steps']} timed greedy decode steps per tried batch after {meta['warmup_steps']} untimed; "
            "tok/s = batch / step time")


def render_summary(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The console's view: what was measured, then the table."""
    return "\n".join([
        f"capacity: {meta['model']} {meta['dtype']} on {card_name(meta)}, "
        f"budget {gib(meta['memory_budget_bytes'])} GiB ({meta['memory_budget_source']})",
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
        f"- card: {card_name(meta)}",
        f"- memory budget: {gib(meta['memory_budget_bytes'])} GiB ({meta['memory_budget_source']})",
        f"- memory measured: {meta['memory']}",
        f"- batch fill: {meta['batch_fill']} (prefilling B long prompts would take minutes; every slot holds "
        "as many bytes as a distinct prompt of that length)",
        f"- search: {meta['search']} (ceiling {meta['max_batch']})",
        f"- throughput: {_throughput_note(meta)}",
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
            out += [f"One sequence's KV cache after its prefill: {r['sequence_kv_bytes']:,} bytes allocated "
                    f"({r['sequence_kept_kv_bytes']:,} of them kept K/V); weights {r['weights_bytes']:,} bytes.", ""]
        pages = bool(meta.get("new_tokens"))  # long generations: the KV the paged pool held, per try
        out += ["| try | batch | fits | reason | peak GiB | ms/step | tok/s |" + (" KV pages (most held) | KV GiB |"
                                                                                if pages else ""),
                "|---:|---:|---|---|---:|---:|---:|" + ("---:|---:|" if pages else "")]
        for i, t in enumerate(r["tries"], 1):
            row = (f"| {i} | {t['batch']} | {'yes' if t['fits'] else 'no'} | {t['reason']} | "
                   f"{gib(t['peak_bytes'])} | {_num(t['step_ms'])} | {_num(t['tok_s'])} |")
            if pages:
                row += f" {_num(t.get('kv_pages'))} | {gib(t.get('kv_bytes'))} |"
            out.append(row)
        out.append("")
    return "\n".join(out)


def build_figure(meta: dict[str, Any], results: list[dict[str, Any]]):
    """tok/s against batch (log2 axis) for every batch that fit, one panel per context, each method's largest
    batch marked (``dms_perf.bench.report``'s batch figure); the batches that did not fit are named in the
    legend."""
    rows = []
    for r in results:
        tries = r["tries"] or [{"batch": 1, "fits": False, "reason": r["stopped"] or "error", "tok_s": None}]
        rows += [{"context": r["context"], "method": r["method"], "batch": t["batch"], "decode_tok_s": t["tok_s"],
                  "status": "ok" if t["fits"] else t["reason"]} for t in tries]
    largest = {(r["context"], r["method"]): r["largest_batch"] for r in results if r["largest_batch"]}
    what = f"Decode throughput vs batch within {gib(meta['memory_budget_bytes'])} GiB"
    return _batch_figure(rows, meta, method_styles(meta["methods"]), what=what, largest=largest)
