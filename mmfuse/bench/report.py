"""Markdown tables from a benchmark's result JSON: ``python -m mmfuse.bench.report docs/bench_throughput.json``
(also the JSON of ``mmfuse bench peer``, ``prefix`` and ``server``: each module's own ``table``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .machine import bounds_text


def _load(pair: dict) -> str:
    return (f"load average {', '.join(f'{x:.1f}' for x in pair['before'])} before, "
            f"{', '.join(f'{x:.1f}' for x in pair['after'])} after")


def run_bounds_text(r: dict) -> str:
    """The bounds paragraph of a result; JSONs from before ``Bounds`` hold one ``machine`` sample and no peak."""
    return bounds_text(r.get("bounds") or {"best": r["machine"], "samples": [r["machine"]]})


def _frac(value: float, error: bool | None) -> str:
    return f"{value:.2f}" + (" **(measurement error: above the bound)**" if error else "")


def render(r: dict) -> str:
    m, fr = r["machine"], r["fractions"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {r['torch']} ({m['threads']} threads). "
             f"{run_bounds_text(r)} Load average before/after: "
             f"{', '.join(f'{x:.1f}' for x in r['loadavg']['before'])} / "
             f"{', '.join(f'{x:.1f}' for x in r['loadavg']['after'])}. Wall time {r['wall_s'] / 60:.1f} min."]
    if "probes" in r["hf"]:
        c = r["hf"]["config"]
        lines += ["", f"transformers options, each timed on the same probe (batch {r['hf']['probes'][0]['batch']}, "
                  f"{r['config']['out_tokens']} new tokens); chosen: **{c['attn']}, {c['threads']} thread(s)**", "",
                  "| attention | torch threads | output tok/s |", "|---|---:|---:|"]
        lines += [f"| {p['attn']} | {p['threads']} | {p['out_tok_s']:.2f} |" for p in r["hf"]["probes"]]
    if "loadavg" in r["hf"]:
        lines += ["", f"Load: transformers part {_load(r['hf']['loadavg'])}; vLLM part {_load(r['vllm']['loadavg'])}. "
                  f"transformers peak RSS {r['hf']['peak_rss_mb']:.0f} MB (one model loaded at a time)."]
    lines += ["", f"(a) 4 items per prompt, {r['config']['out_tokens']} new tokens (prefill: max_tokens=1 on fresh "
              "same-length prompts)", "",
              "| batch | backend | prompt tokens | prefill tok/s | decode tok/s | end-to-end output tok/s |",
              "|---:|---|---:|---:|---:|---:|"]
    for b in r["config"]["batches"]:
        for name in ("vllm", "hf"):
            row = next(x for x in r[name]["batches"] if x["batch"] == b)
            lines.append(f"| {b} | {name} | {sum(row['prompt_lens'])} | {row['prefill_tok_s']:.1f} | "
                         f"{row['decode_tok_s']:.1f} | {row['out_tok_s']:.2f} |")
    v, h = r["vllm"]["mixed"], r["hf"]["mixed"]
    lines += ["", f"(b) mixed workload, {r['config']['mixed']} requests, output 8..{r['config']['max_out']} tokens", "",
              "| backend | output tokens | seconds | output tok/s |", "|---|---:|---:|---:|",
              f"| vllm (all submitted at once) | {v['out_tokens']} | {v['seconds']:.1f} | {v['tok_s']:.2f} |",
              f"| transformers (static batches of {h['hf_batch']}) | {h['out_tokens']} | {h['seconds']:.1f} | "
              f"{h['tok_s']:.2f} |",
              f"| **vllm / transformers** | | | **{r['mixed_speedup']:.2f}x** |"]
    iv = r["vllm"]["items_vs_text"]
    lines += ["", f"(c) vLLM, batch {r['config']['items_batch']}, {r['config']['out_tokens']} new tokens: "
              f"with items {', '.join(f'{x:.2f}' for x in iv['items_tok_s'])} tok/s, same length as plain tokens "
              f"{', '.join(f'{x:.2f}' for x in iv['text_tok_s'])} tok/s: ratio **{iv['ratio']:.3f}**",
              "", "(d) fractions of the machine's bounds", "",
              "| backend | prefill batch | prefill GFLOP/s | of GEMM | decode batch | decode tok/s | bound tok/s | of bound |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("vllm", "hf"):
        f = fr[name]
        lines.append(f"| {name} | {f['prefill_batch']} | {f['prefill_gflops']:.1f} | "
                     f"{_frac(f['prefill_fraction'], f.get('prefill_error'))} | {f['decode_batch']} | "
                     f"{f['decode_tok_s']:.2f} | {f['decode_bound_tok_s']:.2f} | "
                     f"{_frac(f['decode_fraction'], f.get('decode_error'))} |")
    return "\n".join(lines)


def render_any(r: dict) -> str:
    """The tables of whichever benchmark wrote ``r`` (told apart by their top-level keys)."""
    if "sides" in r:
        from .prefix import table
    elif "prompt_embeds" in r:
        from .peer import table
    elif "wire" in r:
        from .server import table
    else:
        return render(r)
    return table(r) + (f"\n\n{bounds_text(r['bounds'])}" if "bounds" in r else "")


if __name__ == "__main__":
    print(render_any(json.loads(Path(sys.argv[1]).read_text())))
