"""``mmfuse bench prefix``: TTFT of a long shared prefix with items, cold vs warm, against the uncached suffix.

The prompt is ``items + a long document`` (the shared prefix) followed by a short question. Per
round, with fresh items and an empty prefix cache:

  cold    prefix + question 1: everything is computed;
  warm    prefix + question 2: vLLM serves whole cached blocks (``num_cached_tokens``), computes the rest;
  suffix  a prompt made of only the warm prompt's uncached tokens (the same token ids, from position 0),
          cold: the time to prefill just that much, what a perfect cache would cost.

Target: warm TTFT within 1.5x of the suffix-only TTFT (the rest is the cost of attending over the
cached prefix and of finding it). Both the mmfuse plugin and vLLM's ``prompt_embeds`` peer (whose
requests carry the whole embedded prompt every time) run the same rounds, each in its own process.
Writes JSON and a PNG; ``--quick`` is a smoke run.
"""
from __future__ import annotations

import argparse
import os
import statistics

from .sides import add_side_args, parse_with_quick_defaults, subplots
from .workload import WORDS, base_dir, build_checkpoint, long_text, make_items

TARGET = 1.5  # warm TTFT / suffix-only TTFT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mmfuse bench prefix", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, a shorter document, 2 rounds")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, --quick 2)")
    ap.add_argument("--doc-words", type=int, default=None, help="document length (default 1200 words, --quick 300)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, fresh items each (default 5, --quick 2)")
    ap.add_argument("--sides", default="mmfuse,prompt_embeds", help="which sides to run (comma list)")
    add_side_args(ap, "prefix", ["mmfuse", "prompt_embeds"], max_model_len=2048)
    return parse_with_quick_defaults(ap, argv, (("layers", 28, 2), ("doc_words", 1200, 300), ("rounds", 5, 2)))


def question(seed: int) -> str:
    import numpy as np

    return "question: " + " ".join(np.random.default_rng(seed).choice(WORDS, 12))


def one_round(side, cfg, r: int) -> dict:
    from vllm import SamplingParams

    from ..inputs import EncodedPrompt, prepare
    from .sides import time_requests

    specs = side.checkpoint.specs
    prefix = f"{specs['vision'].placeholder} {specs['audio'].placeholder} {long_text(cfg.doc_words, seed=1000 + r)}"
    items = make_items(specs, 2000 + r)
    first = side.checkpoint.encode(prepare(f"{prefix} {question(3000 + r)}", items, specs))
    second = side.checkpoint.encode(prepare(f"{prefix} {question(4000 + r)}", items, specs))
    params = SamplingParams(max_tokens=1, temperature=0)
    side.llm.reset_prefix_cache()
    cold = time_requests(side, [first], params)[0]
    warm = time_requests(side, [second], params)[0]
    # the uncached tail of the warm prompt as a prompt of its own; the items sit at the start of the prefix,
    # so the tail is plain text (checked: a placeholder here would need its item)
    tail = second.expanded_ids[warm["num_cached_tokens"]:]
    if set(tail) & set(side.checkpoint.placeholder_ids.values()):
        raise RuntimeError("the uncached suffix holds an item's rows: lengthen the document")
    side.llm.reset_prefix_cache()
    suffix = time_requests(side, [EncodedPrompt(token_ids=tail, expanded_ids=tail, items={})], params)[0]
    return dict(prompt_tokens=second.num_tokens, cached_tokens=warm["num_cached_tokens"], suffix_tokens=len(tail),
                cold_s=cold["ttft_s"], warm_s=warm["ttft_s"], suffix_s=suffix["ttft_s"],
                warm_over_suffix=warm["ttft_s"] / suffix["ttft_s"], cold_over_warm=cold["ttft_s"] / warm["ttft_s"])


def worker(cfg: argparse.Namespace) -> dict:
    from .sides import SIDES, peak_rss_mb, profiled

    before = os.getloadavg()
    ckpt = build_checkpoint(cfg.workdir, cfg.layers)
    side = SIDES[cfg.worker](ckpt, base_dir(cfg.workdir, cfg.layers), cfg.dtype, cfg.max_model_len, cfg.kv_cache_gb)
    one_round(side, cfg, -1)  # warm-up: the first requests of an engine pay one-off costs
    rounds = profiled(lambda: [one_round(side, cfg, r) for r in range(cfg.rounds)], cfg.profile, f"prefix-{side.name}")
    med = {k: statistics.median(x[k] for x in rounds) for k in ("cold_s", "warm_s", "suffix_s", "warm_over_suffix",
                                                                 "cold_over_warm")}
    rss = peak_rss_mb()
    side.close()
    return dict(side=side.name, rounds=rounds, median=med, target_met=med["warm_over_suffix"] <= TARGET,
                peak_rss_mb=rss, loadavg={"before": before, "after": os.getloadavg()})


def table(r: dict) -> str:
    lines = ["| side | prompt tokens | cached | suffix tokens | cold TTFT ms | warm TTFT ms | suffix-only TTFT ms | "
             "cold / warm | warm / suffix (target <= 1.5) | load average at end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for side in r["sides"]:
        x, m = r[side], r[side]["median"]
        one = x["rounds"][-1]
        lines.append(f"| {side} | {one['prompt_tokens']} | {one['cached_tokens']} | {one['suffix_tokens']} | "
                     f"{1000 * m['cold_s']:.1f} | {1000 * m['warm_s']:.1f} | {1000 * m['suffix_s']:.1f} | "
                     f"{m['cold_over_warm']:.1f}x | {m['warm_over_suffix']:.2f} "
                     f"({'met' if x['target_met'] else 'not met'}) | "
                     f"{', '.join(f'{v:.2f}' for v in x['loadavg']['after'])} |")
    return "\n".join(lines)


def plot(r: dict):
    fig, ax = subplots(figsize=(7, 4))
    kinds = (("cold_s", "cold"), ("warm_s", "warm"), ("suffix_s", "suffix only"))
    for k, side in enumerate(r["sides"]):
        ax.bar([i + 0.4 * k for i in range(3)], [1000 * r[side]["median"][key] for key, _ in kinds], 0.4, label=side)
    ax.set_xticks([0.2, 1.2, 2.2], [label for _, label in kinds])
    ax.set(ylabel="TTFT ms (median)",
           title=f"shared prefix with items ({r[r['sides'][0]]['rounds'][0]['prompt_tokens']} tokens)")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> dict | None:
    """Run each side in its own process; print the table, write JSON and a plot."""
    from .sides import bench_finish, bench_start, run_sides

    cfg = bench_start(argv, parse_args, worker)
    if cfg is None:  # this process was one side's worker
        return None
    sides = cfg.sides.split(",")
    result = {"command": "mmfuse bench prefix " + " ".join(cfg.argv), "sides": sides, "target": TARGET,
              "loadavg": {"before": os.getloadavg()}}
    result |= run_sides("mmfuse.bench.prefix", sides, cfg)
    return bench_finish(result, cfg, plot, table)


if __name__ == "__main__":
    main()
