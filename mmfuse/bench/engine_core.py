"""``mmfuse bench engine-core``: vLLM's engine core in-process vs in its own process, same work.

On CPU mmfuse runs the offline engine core (one rank) in-process
(``backends/vllm_defaults.py``): vLLM's spawned engine process would re-import an
unguarded script. This measures what that costs or saves: each round starts one
fresh Python process per mode (alternating, so machine drift hits both), which
loads the same checkpoint with ``VLLMBackend`` and times, after a warm-up,

  batch: ``--batch`` requests with 4 items each, ``--tokens`` tokens each, submitted together;
  single: one such request (decode-bound, where per-step IPC would show most).

Prompts are fresh per run (no prefix-cache hits). Results go to JSON and a bar plot.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {"multiprocess": "1", "inprocess": "0"}  # VLLM_ENABLE_V1_MULTIPROCESSING


def worker(ckpt: str, batch: int, tokens: int, seed: int) -> dict:
    """One mode, in this process: start the engine, warm up, time the two runs."""
    from vllm import SamplingParams

    from ..backends.vllm import VLLMBackend, to_request
    from .workload import make_prompts

    t0 = time.perf_counter()
    be = VLLMBackend(ckpt, max_model_len=1024, kv_cache_gb=1)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)  # random weights: fixed lengths

    def run(n: int, s: int) -> float:
        t = time.perf_counter()
        requests = [to_request(be.encode(p)) for p in make_prompts(be.specs, n, s, items=4, words=24)]
        out = be.llm.generate(requests, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t)

    run(2, seed)  # warm-up
    result = dict(startup_s=startup, batch_tok_s=run(batch, seed + 1), single_tok_s=run(1, seed + 2))
    be.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="mmfuse bench engine-core", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the Qwen3-0.6B-shaped model")
    ap.add_argument("--rounds", type=int, default=3, help="engine starts per mode (alternating)")
    ap.add_argument("--batch", type=int, default=16, help="requests in the batch run")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("MMFUSE_BENCH_DIR", "/tmp/mmfuse-bench")))
    ap.add_argument("--json", type=Path, default=Path("docs/bench_engine_core.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/bench_engine_core.png"))
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.ckpt, args.batch, args.tokens, args.seed)), flush=True)
        return {}

    from .machine import measure
    from .workload import build_checkpoint

    ckpt = build_checkpoint(args.workdir, args.layers)
    limits = measure(quick=True)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else reversed(list(MODES))):
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING=MODES[mode], VLLM_LOGGING_LEVEL="WARNING")
            cmd = [sys.executable, "-m", "mmfuse.bench.engine_core", "--worker", mode, "--ckpt", str(ckpt),
                   "--batch", str(args.batch), "--tokens", str(args.tokens), "--seed", str(100 * r)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {r} {mode:12s} {runs[mode][-1]}", flush=True)
    summary = {m: {k: statistics.mean(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}
    ratio = {k: summary["inprocess"][k] / summary["multiprocess"][k] for k in ("batch_tok_s", "single_tok_s")}
    result = dict(command="mmfuse bench engine-core " + " ".join(sys.argv[1:] if argv is None else argv),
                  config={k: str(v) for k, v in vars(args).items()}, machine=limits.to_dict(), runs=runs,
                  summary=summary, inprocess_over_multiprocess=ratio,
                  loadavg={"before": load_before, "after": os.getloadavg()})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    _plot(result, args.plot)
    print(f"in-process / multi-process: batch {ratio['batch_tok_s']:.3f}, single {ratio['single_tok_s']:.3f} "
          f"-> {args.json}, {args.plot}", flush=True)
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in zip(axes, ("batch_tok_s", "single_tok_s"), ("batch", "single request")):
        for i, (mode, rs) in enumerate(result["runs"].items()):
            values = [r[key] for r in rs]
            ax.bar(i, statistics.mean(values), color=("tab:blue", "tab:orange")[i], label=mode)
            ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(result["runs"])), list(result["runs"]))
        ax.set_title(f"{title}: output tok/s")
    fig.suptitle("vLLM engine core: in-process vs its own process (same work, alternating runs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
