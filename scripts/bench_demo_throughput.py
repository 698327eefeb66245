"""vLLM throughput of demo checkpoints on the held-out rows: the projector comparison of docs/projectors.md.

Each checkpoint (the shipped mlp2x_gelu demo/ckpt, a resampler rebuild from scripts/build_demo.py)
gets its own engine; all held-out rows (their stored MiniLM vectors) are submitted together, greedy,
to the end of each answer; the median of ``--repeats`` timed runs after a warm-up, prefix cache
emptied before each run. Prints soft tokens per prompt, exact match, requests/s and generated tokens/s.

    python scripts/bench_demo_throughput.py demo/ckpt /tmp/demo_res4d/ckpt --out demo_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from mmfuse import SamplingConfig
from mmfuse import demo as task
from mmfuse.inputs import prepare


def measure(ckpt: str, rows: list[dict], repeats: int) -> dict:
    from mmfuse.backends.vllm import VLLMBackend

    be = VLLMBackend(ckpt)
    try:
        encoded = [be.encode(prepare(task.PROMPT, r["items"], be.specs)) for r in rows]
        sampling = SamplingConfig(max_tokens=24)
        be.generate(encoded[:4], sampling)  # warm-up
        times, outs = [], None
        for _ in range(repeats):
            assert be.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = be.generate(encoded, sampling)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tokens = sum(len(o[0].token_ids) for o in outs)
        exact = sum(o[0].text.strip() == r["response"] for o, r in zip(outs, rows)) / len(rows)
        return {"ckpt": ckpt, "tok_projector": be.specs["tok"].projector,
                "soft_tokens_per_prompt": statistics.mean(e.num_tokens for e in encoded),
                "exact_match": exact, "seconds": dt, "requests_per_s": len(rows) / dt, "tokens_per_s": tokens / dt}
    finally:
        be.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="demo checkpoints to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    rows = task.heldout_rows(task.HELDOUT)
    results = {"load_average": os.getloadavg(), "rows": len(rows), "runs": []}
    for ckpt in args.ckpts:
        r = measure(ckpt, rows, args.repeats)
        results["runs"].append(r)
        print(f"{ckpt}: tok {r['tok_projector']}, {r['soft_tokens_per_prompt']:.1f} prompt tokens, exact match "
              f"{r['exact_match']:.3f}, {r['requests_per_s']:.1f} req/s, {r['tokens_per_s']:.0f} tok/s", flush=True)
    results["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
