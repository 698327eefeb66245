"""``mmfuse bench peer``: the mmfuse plugin vs vLLM's own ``prompt_embeds``, same prompts and vectors.

The peer is what a vLLM user would do without mmfuse: project the vectors with the checkpoint's
projectors and embed the text with the LM's embedding table on the client, then send the whole
``inputs_embeds`` to a vLLM engine started with ``enable_prompt_embeds=True`` on the base LM
(``sides.EmbedsSide``). Each side runs in its own process (``--worker``) with the same engine
settings, on the same Qwen3-0.6B-shaped random model as ``mmfuse bench throughput``:

  parity      greedy tokens of the same prompts: they must be identical (same rows in, same LM);
  throughput  ``--batch`` fresh prompts (4 items each), ``--out-tokens`` each, ``ignore_eos``,
              all at once; output tok/s, median of ``--repeats``. The peer's client-side
              projection and embedding are inside the timed region (a request costs that);
  ttft        one fresh request at a time, ``max_tokens=1``: median time to the first token;
  bytes       per request: offline, the data handed to the engine (mmfuse: token ids + item
              floats; peer: the [S, H] tensor); over HTTP, the JSON body (mmfuse: base64 items in
              ``/v1/completions``; peer: vLLM's base64 ``torch.save`` ``prompt_embeds``);
  cache       a long document followed by items: TTFT cold, of the same request again (same
              vectors), then of the document with different vectors; then the same sequence with
              ``--out-tokens`` tokens and logprobs, each output checked against the same request
              computed with an empty prefix cache (a cache shared across different vectors would
              give the first vectors' answer).

Writes JSON and a PNG; ``--quick`` is a smoke run (1-2 layers, few requests).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from .sides import add_side_args, parse_with_quick_defaults, subplots
from .workload import base_dir, build_checkpoint, long_text, make_items, make_prompts

PROMPT_WORDS = 24
LOGPROB_TOL = 1e-4  # a cached prefix and a recomputed one agree to ~1e-6 in fp32; different vectors differ far more


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mmfuse bench peer", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, few and short requests")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, --quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="requests per throughput run (default 32, --quick 4)")
    ap.add_argument("--out-tokens", type=int, default=None, help="tokens per request (default 32, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="throughput runs (default 3, --quick 1)")
    ap.add_argument("--ttft-runs", type=int, default=None, help="single requests for TTFT (default 8, --quick 2)")
    ap.add_argument("--doc-words", type=int, default=None, help="document length for the cache part "
                    "(default 1200 words, --quick 300)")
    add_side_args(ap, "peer", ["mmfuse", "prompt_embeds"], max_model_len=2048)
    return parse_with_quick_defaults(ap, argv, (("layers", 28, 2), ("batch", 32, 4), ("out_tokens", 32, 8),
                                                ("repeats", 3, 1), ("ttft_runs", 8, 2), ("doc_words", 1200, 300)))


# -- one side, in its own process ---------------------------------------------------------------------------

def cache_behaviour(side, cfg) -> dict:
    """Items then a document: cold, same vectors again, different vectors; outputs checked against cold runs.

    The items come first so that every cached block after them depends on them: with different vectors a
    correct cache reuses nothing, a cache keyed by token ids alone would reuse the document and answer wrongly."""
    from vllm import SamplingParams

    from ..inputs import prepare
    from .sides import time_requests

    specs = side.checkpoint.specs
    text = (f"compare {specs['vision'].placeholder} with {specs['audio'].placeholder} given "
            f"{long_text(cfg.doc_words, seed=3)}")
    a = side.checkpoint.encode(prepare(text, make_items(specs, 41), specs))
    b = side.checkpoint.encode(prepare(text, make_items(specs, 42), specs))
    timing = SamplingParams(max_tokens=1, temperature=0)
    # the outputs are checked with logprobs too: on a random model different vectors may well give the same greedy
    # tokens, but never the same logprobs, so a cache reused across vectors shows even when the text does not.
    # Timed apart: vLLM compiles its logprobs gather per shape, which would land in the TTFTs
    checking = SamplingParams(max_tokens=cfg.out_tokens, temperature=0, logprobs=0)

    def run(p, reset: bool, params) -> dict:
        if reset:
            side.llm.reset_prefix_cache()
        return time_requests(side, [p], params)[0]

    def same(x: dict, y: dict) -> bool:
        gap = max(abs(u - v) for u, v in zip(x["logprobs"], y["logprobs"]))
        return x["token_ids"] == y["token_ids"] and gap < LOGPROB_TOL

    t_cold, t_same, t_diff = run(a, True, timing), run(a, False, timing), run(b, False, timing)
    cold_a, warm_a = run(a, True, checking), run(a, False, checking)
    diff_b, cold_b = run(b, False, checking), run(b, True, checking)
    return dict(prompt_tokens=a.num_tokens, cold=t_cold, same_vectors=t_same, different_vectors=t_diff,
                same_vectors_correct=same(warm_a, cold_a), different_vectors_correct=same(diff_b, cold_b),
                vectors_change_output=not same(cold_a, cold_b), different_vectors_cached_tokens=diff_b["num_cached_tokens"])


def measure(side, cfg: argparse.Namespace) -> dict:
    """Parity tokens, throughput, TTFT, bytes and cache behaviour of one side (its engine started)."""
    from vllm import SamplingParams

    from .sides import time_requests

    out: dict = {}
    specs, encode = side.checkpoint.specs, side.checkpoint.encode

    def prompts(n: int, seed: int):
        return make_prompts(specs, n, seed, items=4, words=PROMPT_WORDS)

    greedy = SamplingParams(max_tokens=cfg.out_tokens, temperature=0)
    parity = time_requests(side, [encode(p) for p in prompts(4, 1)], greedy)  # also the warm-up
    out["parity_tokens"] = [r["token_ids"] for r in parity]

    fixed = SamplingParams(max_tokens=cfg.out_tokens, temperature=0, ignore_eos=True)  # random weights: fixed lengths
    runs = []
    for rep in range(cfg.repeats):
        batch = [encode(p) for p in prompts(cfg.batch, 100 + rep)]
        t = time.perf_counter()
        res = time_requests(side, batch, fixed)
        runs.append(dict(seconds=time.perf_counter() - t, out_tokens=sum(len(r["token_ids"]) for r in res),
                         ttft_p50_s=statistics.median(r["ttft_s"] for r in res)))
    out["throughput"] = dict(runs=runs, out_tok_s=statistics.median(r["out_tokens"] / r["seconds"] for r in runs))

    one = SamplingParams(max_tokens=1, temperature=0)
    ttfts = [time_requests(side, [encode(p)], one)[0]["ttft_s"] for p in prompts(cfg.ttft_runs, 200)]
    out["ttft"] = dict(runs_s=ttfts, median_s=statistics.median(ttfts))

    sample = prompts(8, 300)
    out["bytes"] = dict(offline=statistics.mean(side.offline_bytes(encode(p)) for p in sample),
                        server=statistics.mean(side.server_bytes(p, cfg.out_tokens) for p in sample),
                        prompt_tokens=statistics.mean(encode(p).num_tokens for p in sample))
    out["cache"] = cache_behaviour(side, cfg)
    return out


def worker(cfg: argparse.Namespace) -> dict:
    """One side in this process: start its engine, measure, close; the result for the parent."""
    from .sides import SIDES, peak_rss_mb, profiled

    load_before = os.getloadavg()
    ckpt = build_checkpoint(cfg.workdir, cfg.layers)
    t0 = time.perf_counter()
    side = SIDES[cfg.worker](ckpt, base_dir(cfg.workdir, cfg.layers), cfg.dtype, cfg.max_model_len, cfg.kv_cache_gb)
    out = dict(side=side.name, startup_s=time.perf_counter() - t0)
    out |= profiled(lambda: measure(side, cfg), cfg.profile, f"peer-{side.name}")
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    side.close()
    return out


# -- the parent: both sides, compared ------------------------------------------------------------------------

def summarize(m: dict, p: dict) -> dict:
    """Ratios mmfuse / prompt_embeds (throughput: higher is better; TTFT and bytes: lower is better)."""
    cm, cp = m["cache"], p["cache"]
    return dict(
        parity_identical=m["parity_tokens"] == p["parity_tokens"],
        throughput_ratio=m["throughput"]["out_tok_s"] / p["throughput"]["out_tok_s"],
        ttft_ratio=m["ttft"]["median_s"] / p["ttft"]["median_s"],
        offline_bytes_ratio=m["bytes"]["offline"] / p["bytes"]["offline"],
        server_bytes_ratio=m["bytes"]["server"] / p["bytes"]["server"],
        cache_correct={"mmfuse": cm["same_vectors_correct"] and cm["different_vectors_correct"],
                       "prompt_embeds": cp["same_vectors_correct"] and cp["different_vectors_correct"]})


def _cached(run: dict) -> str:
    return f"{1000 * run['ttft_s']:.1f} ({run['num_cached_tokens']})"


def table(r: dict) -> str:
    m, p, s = r["mmfuse"], r["prompt_embeds"], r["summary"]
    rows = [("end-to-end output tok/s", lambda x: f"{x['throughput']['out_tok_s']:.1f}", f"{s['throughput_ratio']:.2f}x"),
            ("TTFT, one request (median ms)", lambda x: f"{1000 * x['ttft']['median_s']:.1f}", f"{s['ttft_ratio']:.2f}x"),
            ("bytes per request, offline", lambda x: f"{x['bytes']['offline']:,.0f}", f"{s['offline_bytes_ratio']:.3f}x"),
            ("bytes per request, HTTP JSON body", lambda x: f"{x['bytes']['server']:,.0f}", f"{s['server_bytes_ratio']:.3f}x"),
            ("cache: cold TTFT ms", lambda x: f"{1000 * x['cache']['cold']['ttft_s']:.1f}", ""),
            ("cache: same vectors, TTFT ms (cached tokens)", lambda x: _cached(x["cache"]["same_vectors"]), ""),
            ("cache: different vectors, TTFT ms (cached tokens)", lambda x: _cached(x["cache"]["different_vectors"]), ""),
            ("cache: outputs equal to cold runs (same / different vectors)",
             lambda x: f"{x['cache']['same_vectors_correct']} / {x['cache']['different_vectors_correct']}", ""),
            ("cache: the two vectors' outputs differ (so the check can fail)",
             lambda x: f"{x['cache']['vectors_change_output']}", ""),
            ("peak RSS MB (engine in-process)", lambda x: f"{x['peak_rss_mb']:.0f}", "")]
    lines = [f"| | mmfuse | prompt_embeds | mmfuse / prompt_embeds |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {f(m)} | {f(p)} | {ratio} |" for name, f, ratio in rows]
    lines += ["", f"Greedy tokens identical on the parity prompts: **{s['parity_identical']}**. "
              f"Load average: mmfuse part {', '.join(f'{x:.2f}' for x in m['loadavg']['after'])}, prompt_embeds part "
              f"{', '.join(f'{x:.2f}' for x in p['loadavg']['after'])} (1/5/15 min, at the end of each)."]
    return "\n".join(lines)


def plot(r: dict):
    sides, colors = ("mmfuse", "prompt_embeds"), ["tab:blue", "tab:gray"]
    fig, ax = subplots(1, 4, figsize=(17, 4))
    ax[0].bar(sides, [r[s]["throughput"]["out_tok_s"] for s in sides], color=colors)
    ax[0].set(ylabel="output tok/s", title=f"throughput, batch {r['config']['batch']}")
    ax[1].bar(sides, [1000 * r[s]["ttft"]["median_s"] for s in sides], color=colors)
    ax[1].set(ylabel="ms", title="TTFT, one request")
    x = range(2)
    for k, s in enumerate(sides):
        ax[2].bar([i + 0.4 * k for i in x], [r[s]["bytes"]["offline"], r[s]["bytes"]["server"]], 0.4,
                  color=colors[k], label=s)
    ax[2].set_xticks([0.2, 1.2], ["offline", "HTTP body"])
    ax[2].set(yscale="log", ylabel="bytes per request", title="request size")
    ax[2].legend()
    cases = ("cold", "same_vectors", "different_vectors")
    for k, s in enumerate(sides):
        ax[3].bar([i + 0.4 * k for i in range(3)], [1000 * r[s]["cache"][c]["ttft_s"] for c in cases], 0.4,
                  color=colors[k], label=s)
    ax[3].set_xticks([0.2, 1.2, 2.2], ["cold", "same vectors", "different vectors"])
    ax[3].set(ylabel="TTFT ms", title=f"repeated document ({r['mmfuse']['cache']['prompt_tokens']} tokens)")
    ax[3].legend()
    return fig


def main(argv: list[str] | None = None) -> dict | None:
    """Run both sides (each in its own process), compare, print a table, write JSON and a plot."""
    from .sides import bench_finish, bench_start, run_sides

    cfg = bench_start(argv, parse_args, worker)
    if cfg is None:  # this process was one side's worker
        return None
    result = {"command": "mmfuse bench peer " + " ".join(cfg.argv),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items() if k != "bounds"},
              "loadavg": {"before": os.getloadavg()}}
    result |= run_sides("mmfuse.bench.peer", ["mmfuse", "prompt_embeds"], cfg)
    result["summary"] = summarize(result["mmfuse"], result["prompt_embeds"])
    return bench_finish(result, cfg, plot, table)


if __name__ == "__main__":
    main()
