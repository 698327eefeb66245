"""``mmfuse bench throughput``: vLLM vs transformers on a Qwen3-0.6B-shaped model, fp32 on CPU.

Measures, in one run and one process (plus vLLM's engine processes):

  (a) batch 1 / 8 / 32, 4 items per prompt: prefill tok/s (max_tokens=1) and end-to-end
      output tok/s (max_tokens=32), both backends, through mmfuse's own backends;
  (b) a mixed workload (64 requests, output lengths spread 8..128, 0-4 items each):
      vLLM gets every request at once, transformers static batches of ``--hf-batch``;
      transformers runs at its best measured configuration: each attention kernel of ``--hf-attn``
      (eager, sdpa) x each torch thread count of ``--hf-threads`` is timed on the same probe batch
      first, and the fastest is used for (a) and (b); every probe is in the output;
  (c) vLLM with items vs the same prompts as plain tokens of the same length;
  (d) the machine's fp32 GEMM (fastest kernel of either backend) and bandwidth, sampled before
      and after each backend's part, the maximum kept (``machine.Bounds``), the CPU's theoretical
      peak beside it, and each figure as a fraction of the bound they imply (prefill vs FLOPs,
      batch-1 decode vs bytes read per token); a fraction above 1 is flagged as a measurement error.

Every timed run uses fresh prompts and vectors, so no figure comes from a prefix-cache hit.
Run with ``python -m mmfuse.bench.throughput [--quick]``; results go to JSON and a PNG.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .device import add_device_arg, check_device
from .machine import Bounds, MachineLimits, ModelCost, fraction, fraction_text, loadavg_text
from .workload import build_checkpoint, make_mixed, make_prompts

PROMPT_WORDS = 24  # ~30 text tokens + 14 soft rows from 4 items: a short, item-heavy prompt


def _env_defaults() -> None:
    # vLLM's CPU settings come from mmfuse.backends.vllm_defaults, the KV cache size from --kv-cache-gb
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _timed(fn: Callable[[], list]) -> tuple[float, list]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _out_tokens(results) -> int:
    return sum(len(c.token_ids) for cs in results for c in cs)


class Bench:
    """One backend under test; timed calls include encoding (tokenize + expand), as a request would."""

    def __init__(self, backend):
        self.name, self.backend = backend.name, backend

    def generate(self, prompts, sampling):
        return self.backend.generate([self.backend.encode(p) for p in prompts], sampling)

    def prompt_len(self, prompt) -> int:
        return self.backend.encode(prompt).num_tokens

    def batches(self, specs, sizes, out_tokens: int, seed: int) -> list[dict]:
        """(a): per batch size, a prefill-only run and an end-to-end run on fresh prompts."""
        from ..sampling import SamplingConfig

        rows = []
        for i, b in enumerate(sizes):
            p1 = make_prompts(specs, b, seed + 100 * i, items=4, words=PROMPT_WORDS)
            t_pre, _ = _timed(lambda: self.generate(p1, SamplingConfig(max_tokens=1)))
            p2 = make_prompts(specs, b, seed + 100 * i + 1, items=4, words=PROMPT_WORDS)
            t_all, res = _timed(lambda: self.generate(p2, SamplingConfig(max_tokens=out_tokens)))
            n_out = _out_tokens(res)
            lens = [self.prompt_len(p) for p in p1]
            # decode time: the end-to-end run minus its prefill (measured on same-length prompts)
            t_dec = max(t_all - t_pre, 1e-9)
            rows.append(dict(backend=self.name, batch=b, prompt_lens=lens, prefill_s=t_pre,
                             prefill_tok_s=sum(lens) / t_pre, total_s=t_all, out_tokens=n_out,
                             out_tok_s=n_out / t_all, decode_tok_s=(n_out - b) / t_dec))
            print(f"  {self.name:5s} batch {b:2d}: prefill {sum(lens) / t_pre:7.1f} tok/s, "
                  f"end-to-end {n_out / t_all:6.1f} out tok/s, decode {(n_out - b) / t_dec:6.1f} tok/s", flush=True)
        return rows


def choose_hf_config(ckpt: Path, cfg: argparse.Namespace) -> tuple[Bench, dict, list[dict]]:
    """Time every (attention kernel, torch threads) option on the same probe and keep the fastest.

    The probe: ``cfg.probe_batch`` fresh prompts (4 items each), ``cfg.out_tokens`` new tokens, so both
    prefill and decode count. Each option gets its own fresh prompts (no cache is involved in transformers,
    but equal lengths keep the work equal). Each model is freed after its probes and the chosen one loaded
    again, so one model is in memory at a time (the peak RSS is one backend's). Returns the chosen backend
    (threads left set), the choice, and every probe."""
    import torch

    from ..backends.hf import HFBackend
    from ..sampling import SamplingConfig

    def load(attn: str) -> Bench:
        bench = Bench(HFBackend(ckpt, device=cfg.device, dtype=cfg.dtype, attn_implementation=attn))
        bench.generate(make_prompts(bench.backend.specs, 2, 1, items=4, words=8), SamplingConfig(max_tokens=2))
        return bench

    probes: list[dict] = []
    best: tuple[float, dict] = (0.0, {})
    for attn in cfg.hf_attn:
        bench = load(attn)
        for threads in cfg.hf_threads:
            torch.set_num_threads(threads)
            ps = make_prompts(bench.backend.specs, cfg.probe_batch, 900 + len(probes), items=4, words=PROMPT_WORDS)
            t, res = _timed(lambda: bench.generate(ps, SamplingConfig(max_tokens=cfg.out_tokens)))
            probe = dict(attn=attn, threads=threads, batch=cfg.probe_batch, seconds=t, out_tok_s=_out_tokens(res) / t)
            probes.append(probe)
            print(f"  hf    probe {attn:5s} {threads} thread(s): {probe['out_tok_s']:.1f} out tok/s", flush=True)
            if probe["out_tok_s"] > best[0]:
                best = (probe["out_tok_s"], dict(attn=attn, threads=threads))
        del bench
        gc.collect()
    choice = best[1]
    torch.set_num_threads(choice["threads"])
    bench = load(choice["attn"])
    print(f"  hf    chosen: {choice['attn']} attention, {choice['threads']} thread(s)", flush=True)
    return bench, choice, probes


def run_hf(ckpt: Path, cfg: argparse.Namespace, mixed) -> dict:
    import torch

    from ..sampling import SamplingConfig

    default_threads = torch.get_num_threads()
    bench, choice, probes = choose_hf_config(ckpt, cfg)
    specs = bench.backend.specs
    rows = bench.batches(specs, cfg.batches, cfg.out_tokens, seed=10)
    # (b) static batches in arrival order, each run to its longest request; count only requested tokens
    t = time.perf_counter()
    useful = 0
    for i in range(0, len(mixed), cfg.hf_batch):
        chunk = mixed[i:i + cfg.hf_batch]
        res = bench.generate([p for p, _ in chunk], SamplingConfig(max_tokens=max(m for _, m in chunk)))
        useful += sum(min(len(cs[0].token_ids), m) for cs, (_, m) in zip(res, chunk))
    t_mixed = time.perf_counter() - t
    print(f"  hf    mixed: {useful} tokens in {t_mixed:.1f} s = {useful / t_mixed:.1f} tok/s", flush=True)
    del bench
    gc.collect()
    torch.set_num_threads(default_threads)  # vLLM's part runs with the process default
    # the process's peak so far: transformers runs first, so this is its peak (vLLM's: mmfuse bench server)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(config=choice, probes=probes, batches=rows, peak_rss_mb=peak_rss_mb,
                mixed=dict(seconds=t_mixed, out_tokens=useful, tok_s=useful / t_mixed, hf_batch=cfg.hf_batch))


def run_vllm(ckpt: Path, cfg: argparse.Namespace, mixed) -> dict:
    from vllm import SamplingParams

    from ..backends.vllm import VLLMBackend, to_request, to_sampling_params
    from ..sampling import SamplingConfig

    t0 = time.perf_counter()
    be = VLLMBackend(ckpt, dtype=cfg.dtype, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb)
    startup = time.perf_counter() - t0
    print(f"  vllm engine up in {startup:.0f} s", flush=True)

    bench = Bench(be)
    bench.generate(make_prompts(be.specs, 2, 1, items=4, words=8), SamplingConfig(max_tokens=2))  # warm up
    rows = bench.batches(be.specs, cfg.batches, cfg.out_tokens, seed=10)

    # (b) everything submitted at once; each request with its own length
    t_mixed, outs = _timed(lambda: be.llm.generate(
        [to_request(be.encode(p)) for p, _ in mixed],
        [to_sampling_params(SamplingConfig(max_tokens=m)) for _, m in mixed], use_tqdm=False))
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"  vllm  mixed: {useful} tokens in {t_mixed:.1f} s = {useful / t_mixed:.1f} tok/s", flush=True)

    # (c) items vs plain tokens of the same length, alternating, fresh prompts every run
    params = SamplingParams(max_tokens=cfg.out_tokens, temperature=0, ignore_eos=True)
    runs: dict[str, list[float]] = {"items": [], "text": []}
    for rep in range(2):
        for kind in ("text", "items"):
            ps = make_prompts(be.specs, cfg.items_batch, 500 + 10 * rep + (kind == "items"), items=4, words=PROMPT_WORDS)
            if kind == "items":
                t, _ = _timed(lambda: be.llm.generate([to_request(be.encode(p)) for p in ps], params, use_tqdm=False))
            else:  # each soft row becomes an ordinary token: same length, no multimodal path
                pids = set(be.checkpoint.placeholder_ids.values())
                reqs = [{"prompt_token_ids": [t if t not in pids else 300 + j % 100
                                              for j, t in enumerate(be.encode(p).expanded_ids)]} for p in ps]
                t, _ = _timed(lambda: be.llm.generate(reqs, params, use_tqdm=False))
            runs[kind].append(cfg.items_batch * cfg.out_tokens / t)
    items_vs_text = dict(items_tok_s=runs["items"], text_tok_s=runs["text"],
                         ratio=(sum(runs["items"]) / len(runs["items"])) / (sum(runs["text"]) / len(runs["text"])))
    print(f"  vllm  items/text: {items_vs_text['ratio']:.3f}", flush=True)
    be.close()
    return dict(startup_s=startup, batches=rows, items_vs_text=items_vs_text,
                mixed=dict(seconds=t_mixed, out_tokens=useful, tok_s=useful / t_mixed))


def fractions(result: dict, cost: ModelCost, limits: MachineLimits) -> dict:
    """Each backend's largest-batch prefill and batch-1 decode as a fraction of the machine's bound
    (``limits``: the maximum over the run's samples); ``*_error`` is set for a fraction above 1."""
    out = {}
    for name in ("vllm", "hf"):
        rows = {r["batch"]: r for r in result[name]["batches"]}
        big, one = rows[max(rows)], rows[min(rows)]
        gflops = cost.prefill_flops(big["prompt_lens"]) / big["prefill_s"] / 1e9
        pre, dec = fraction(gflops, limits.gemm_gflops), fraction(one["decode_tok_s"], cost.decode_bound_tok_s(limits))
        out[name] = dict(prefill_batch=big["batch"], prefill_gflops=gflops, prefill_fraction=pre["fraction"],
                         prefill_error=pre["measurement_error"], decode_batch=one["batch"],
                         decode_tok_s=one["decode_tok_s"], decode_bound_tok_s=cost.decode_bound_tok_s(limits),
                         decode_fraction=dec["fraction"], decode_error=dec["measurement_error"])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 5, figsize=(21, 4))
    for name, color in (("vllm", "tab:blue"), ("hf", "tab:orange")):
        rows = result[name]["batches"]
        ax[0].plot([r["batch"] for r in rows], [r["out_tok_s"] for r in rows], "o-", color=color, label=name)
    ax[0].set(xscale="log", yscale="log", xlabel="batch (4 items/prompt)", ylabel=f"output tok/s ({result['config']['out_tokens']} tokens)",
              title="(a) end-to-end by batch size")
    ax[0].set_xticks(result["config"]["batches"], [str(b) for b in result["config"]["batches"]])
    ax[0].legend()
    mixed = [result["vllm"]["mixed"]["tok_s"], result["hf"]["mixed"]["tok_s"]]
    hc = result["hf"]["config"]
    ax[1].bar(["vllm", f"hf {hc['attn']}, {hc['threads']} thr\n(batches of {result['hf']['mixed']['hf_batch']})"],
              mixed, color=["tab:blue", "tab:orange"])
    ax[1].set(ylabel="output tok/s", title=f"(b) mixed workload: {mixed[0] / mixed[1]:.2f}x")
    iv = result["vllm"]["items_vs_text"]
    ax[2].bar(["text only", "with items"], [sum(iv["text_tok_s"]) / 2, sum(iv["items_tok_s"]) / 2],
              color=["tab:gray", "tab:blue"])
    ax[2].set(ylabel="output tok/s", title=f"(c) vllm items / text = {iv['ratio']:.3f}")
    fr = result["fractions"]
    labels = [f"prefill b{fr['vllm']['prefill_batch']}\nvs GEMM", "decode b1\nvs read bandwidth"]
    for k, (name, color) in enumerate((("vllm", "tab:blue"), ("hf", "tab:orange"))):
        ax[3].bar([x + 0.4 * k for x in range(2)], [fr[name]["prefill_fraction"], fr[name]["decode_fraction"]],
                  0.4, color=color, label=name)
    ax[3].axhline(0.6, color="k", ls="--", lw=1)
    ax[3].set_xticks([0.2, 1.2], labels)
    ax[3].set(ylabel="fraction of machine bound", title="(d) vs the machine's limits")
    ax[3].legend()
    probes = result["hf"]["probes"]
    ax[4].bar([f"{p['attn']}\n{p['threads']} thr" for p in probes], [p["out_tok_s"] for p in probes], color="tab:orange")
    ax[4].set(ylabel="output tok/s", title=f"transformers options (probe batch {probes[0]['batch']})")
    fig.suptitle(f"load average at the end {', '.join(f'{x:.2f}' for x in result['loadavg']['after'])}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mmfuse bench throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 layers, fewer and shorter requests")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("MMFUSE_BENCH_DIR", "/tmp/mmfuse-bench")),
                    help="where the random model is built (once) and kept")
    ap.add_argument("--json", type=Path, default=Path("docs/bench_throughput.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/bench_throughput.png"))
    ap.add_argument("--hf-batch", type=int, default=16, help="transformers static batch size in (b)")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="vLLM KV cache (default 4, --quick 2)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, --quick 4)")
    ap.add_argument("--hf-attn", default="eager,sdpa", help="transformers attention kernels to try (comma list)")
    ap.add_argument("--hf-threads", default=None,
                    help="torch thread counts to try for transformers (comma list; default 1 up to the cores, "
                         "doubling)")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    args.dtype = check_device(args.device)
    args.hf_attn = args.hf_attn.split(",")
    cores = os.cpu_count() or 1
    if args.hf_threads:
        args.hf_threads = [int(t) for t in args.hf_threads.split(",")]
    else:  # on a GPU the host threads only feed the launches: no choice worth timing
        args.hf_threads = ([cores] if args.device == "cuda"
                           else sorted({min(2 ** i, cores) for i in range(cores.bit_length() + 1)}))
    q = args.quick
    args.layers = args.layers or (4 if q else 28)
    args.batches = [1, 4, 8] if q else [1, 8, 32]
    args.out_tokens = 16 if q else 32
    args.mixed = 16 if q else 64
    args.max_out = 32 if q else 128
    args.items_batch = 8 if q else 16
    args.probe_batch = 4 if q else 8
    args.max_model_len = 1024
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a summary, write JSON and a plot; return the results."""
    cfg = parse_args(argv)
    _env_defaults()
    cfg.kv_cache_gb = cfg.kv_cache_gb or (2 if cfg.quick else 4)
    import torch
    from transformers import AutoConfig

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    print(f"building/reusing the model in {cfg.workdir} ({cfg.layers} layers)", flush=True)
    ckpt = build_checkpoint(cfg.workdir, cfg.layers)
    cost = ModelCost.of(AutoConfig.from_pretrained(ckpt))
    bounds = Bounds(quick=cfg.quick, device=cfg.device)
    bounds.sample("start")
    from ..checkpoint import open_checkpoint
    specs = open_checkpoint(ckpt).specs
    mixed = make_mixed(specs, cfg.mixed, seed=7, min_out=8, max_out=cfg.max_out)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
              "command": "mmfuse bench throughput " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "cost": vars(cost)}
    for name, run in (("hf", run_hf), ("vllm", run_vllm)):
        print(f"{name}: {loadavg_text()}", flush=True)
        before = os.getloadavg()
        result[name] = run(ckpt, cfg, mixed)
        result[name]["loadavg"] = {"before": before, "after": os.getloadavg()}
        bounds.sample(f"after {name}")
    limits = bounds.best
    result["machine"], result["bounds"] = limits.to_dict(), bounds.to_dict()
    print(bounds.text(), flush=True)
    result["fractions"] = fractions(result, cost, limits)
    result["mixed_speedup"] = result["vllm"]["mixed"]["tok_s"] / result["hf"]["mixed"]["tok_s"]
    result["wall_s"] = time.perf_counter() - t0
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps(result, indent=1))
    plot(result, cfg.plot)
    fr = result["fractions"]["vllm"]
    pre = fraction_text(dict(fraction=fr["prefill_fraction"], measurement_error=fr["prefill_error"]))
    dec = fraction_text(dict(fraction=fr["decode_fraction"], measurement_error=fr["decode_error"]))
    print(f"(b) mixed: vllm {result['mixed_speedup']:.2f}x transformers; (c) items/text "
          f"{result['vllm']['items_vs_text']['ratio']:.3f}; (d) vllm prefill {pre} of GEMM bound, decode {dec} of "
          f"bandwidth bound; {loadavg_text()}; wall {result['wall_s']:.0f} s -> {cfg.json}, {cfg.plot}", flush=True)
    return result


if __name__ == "__main__":
    main()
