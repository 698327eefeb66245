"""Markdown tables from a throughput result JSON: ``python -m mmfuse.bench.report docs/bench_throughput.json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def render(r: dict) -> str:
    m, fr = r["machine"], r["fractions"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {r['torch']} ({m['threads']} threads); "
             f"measured in the same run: fp32 GEMM {m['gemm_gflops']:.1f} GFLOP/s, copy {m['copy_gbps']:.1f} GB/s, "
             f"read {m['read_gbps']:.1f} GB/s. Load average before/after: "
             f"{', '.join(f'{x:.1f}' for x in r['loadavg']['before'])} / "
             f"{', '.join(f'{x:.1f}' for x in r['loadavg']['after'])}. Wall time {r['wall_s'] / 60:.1f} min.",
             "", f"(a) 4 items per prompt, {r['config']['out_tokens']} new tokens (prefill: max_tokens=1 on fresh same-length prompts)", "",
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
        lines.append(f"| {name} | {f['prefill_batch']} | {f['prefill_gflops']:.1f} | {f['prefill_fraction']:.2f} | "
                     f"{f['decode_batch']} | {f['decode_tok_s']:.2f} | {f['decode_bound_tok_s']:.2f} | "
                     f"{f['decode_fraction']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
