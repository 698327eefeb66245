"""``mmfuse bench projectors``: what a projector kind costs, as an item's row count n grows.

For each kind (default: ``mlp2x_gelu`` with 1 token per row, and a ``resampler`` with K
queries) one checkpoint is made on a tiny random Qwen3 base (offline, seconds), and for each n
one request carries one ``(n, --input-dim)`` item:

- ``--backend hf``: transformers prefill time of that prompt (median of ``--repeats`` after a
  warm-up), and its length in tokens;
- ``--backend vllm``: ``--batch`` such requests submitted together, ``--max-tokens`` generated
  each (``ignore_eos``), tokens per second; fresh vectors per run (no prefix-cache hits).

Also printed per kind: projector parameters and soft tokens per item. Results go to JSON
(``--out``) and, with ``--plot``, a PNG of the rate against n per kind.

    mmfuse bench projectors --backend hf --ns 16,64,256,1024,2048 --out proj.json --plot proj.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _specs(args) -> dict:
    from ..config import ModalitySpec
    return {"mlp2x_gelu": ModalitySpec("x", args.input_dim),
            f"resampler_k{args.k}": ModalitySpec("x", args.input_dim, "resampler", tokens_per_item=args.k)}


def _hf_rates(ckpt: Path, ns: list[int], args) -> list[dict]:
    import torch

    from ..backends.hf import load
    from ..inputs import prepare

    model = load(ckpt)
    rows = []
    for n in ns:
        p = prepare("describe <|x|> please", {"x": [torch.randn(n, args.input_dim)]}, model.specs)
        enc = model.encode(p)
        ids = torch.tensor([enc.expanded_ids])
        with torch.inference_mode():
            model(ids, p.items)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(ids, p.items)
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)  # the median: a shared machine's stalls hit single runs
        rows.append({"n": n, "prompt_tokens": enc.num_tokens, "prefill_s": dt, "prefills_per_s": 1 / dt})
        print(f"  n={n:>5} prompt {enc.num_tokens:>5} tokens  prefill {dt * 1e3:8.1f} ms", flush=True)
    return rows


def _vllm_rates(ckpt: Path, ns: list[int], args) -> list[dict]:
    import torch
    from vllm import SamplingParams

    from ..backends.vllm import VLLMBackend
    from ..inputs import prepare

    be = VLLMBackend(ckpt, max_model_len=max(ns) + 64)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rows = []
    try:
        for n in ns:
            def requests():
                return [{"prompt": "describe <|x|> please",
                         "multi_modal_data": {"x": torch.randn(n, args.input_dim)}} for _ in range(args.batch)]
            be.llm.generate(requests()[:1], params, use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            outs = be.llm.generate(requests(), params, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            plen = len(outs[0].prompt_token_ids)
            assert plen == be.encode(prepare("describe <|x|> please", {"x": [torch.zeros(n, args.input_dim)]},
                                             be.specs)).num_tokens
            rows.append({"n": n, "prompt_tokens": plen, "seconds": dt, "tokens_per_s": toks / dt})
            print(f"  n={n:>5} prompt {plen:>5} tokens  {toks / dt:8.1f} generated tok/s", flush=True)
    finally:
        be.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmfuse bench projectors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="what to time (default: hf)")
    p.add_argument("--ns", default="16,64,256,1024,2048", help="rows per item, comma-separated")
    p.add_argument("--input-dim", type=int, default=1024, help="size of one input vector (default: 1024)")
    p.add_argument("--k", type=int, default=64, help="resampler queries = soft tokens per item (default: 64)")
    p.add_argument("--hidden", type=int, default=128, help="tiny base LM hidden size (default: 128)")
    p.add_argument("--layers", type=int, default=2, help="tiny base LM layers (default: 2)")
    p.add_argument("--repeats", type=int, default=7, help="hf: timed prefills per n (default: 7)")
    p.add_argument("--batch", type=int, default=8, help="vllm: requests per run (default: 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="vllm: tokens generated per request (default: 16)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]

    import torch

    from ..checkpoint import init_checkpoint
    from ..projectors import build_projector, resolve_spec
    from ..tiny import make_base

    results = {"backend": args.backend, "input_dim": args.input_dim, "hidden": args.hidden, "layers": args.layers,
               "load_average": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                         max_len=max(4096, max(ns) + 64))
        for label, spec in _specs(args).items():
            resolve_spec(spec, args.hidden)
            params = sum(t.numel() for t in build_projector(spec, args.hidden).parameters())
            print(f"{label}: {params:,} projector parameters", flush=True)
            ckpt = init_checkpoint(base, Path(tmp) / label, [spec])
            rates = (_hf_rates if args.backend == "hf" else _vllm_rates)(ckpt, ns, args)
            results["kinds"][label] = {"projector": spec.projector, "tokens_per_item": spec.tokens_per_item,
                                       "params": params, "runs": rates}
    results["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = (("prefills_per_s", "prefills / s (transformers)") if results["backend"] == "hf"
                  else ("tokens_per_s", "generated tokens / s (vLLM)"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, kind in results["kinds"].items():
        runs = kind["runs"]
        ax.plot([r["n"] for r in runs], [r[key] for r in runs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"rows n of one (n, {results['input_dim']}) item")
    ax.set_ylabel(label)
    ax.set_title(f"tiny Qwen3 (hidden {results['hidden']}, {results['layers']} layers), CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
