"""``mmfuse bench training-memory``: peak memory of training with and without ``--gradient-checkpointing``.

A random base LM (``mmfuse.tiny.make_base``: ``--layers`` x ``--hidden``, eager attention) gets one
modality ``x`` of ``--input-dim`` vectors; each training row carries one item of ``--rows`` vectors
(one soft token each), so a row is ~``--rows`` tokens long and activations dominate memory: they
grow with batch x layers x length (attention probabilities with length squared), the weights do
not. The same ``mmfuse train`` command (stage 2 LoRA by default, ``--full`` for every LM weight)
runs ``--steps`` steps in a fresh process per setting; the number is that process's peak resident
memory (``VmHWM`` of ``/proc/PID/status``, read every 20 ms until it exits), which includes the
interpreter, torch and the model, the same in both settings. Not ``ru_maxrss``: Linux carries the
parent's resident size at fork into the child's, so a large parent (a test run) would hide the child's. The losses of the two runs are printed too: checkpointing recomputes, it changes
no number.

    mmfuse bench training-memory --layers 8 --hidden 256 --rows 1000 --batch-size 4 --out mem.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _setup(root: Path, args) -> tuple[Path, Path]:
    import numpy as np

    from ..checkpoint import init_checkpoint
    from ..config import ModalitySpec
    from ..tiny import make_base
    from ..training import write_parquet

    base = make_base(root / "base", hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
                     intermediate=4 * args.hidden, max_len=args.rows + 64, seed=0)
    ckpt = init_checkpoint(base, root / "ckpt", [ModalitySpec(name="x", input_dim=args.input_dim)], seed=0)
    rng = np.random.default_rng(0)
    rows = [{"prompt": "describe <|x|>", "response": "a red cube",
             "items": {"x": [rng.normal(size=(args.rows, args.input_dim)).astype(np.float32)]}}
            for _ in range(args.batch_size * args.steps)]
    write_parquet(rows, root / "data.parquet")
    return Path(ckpt), root / "data.parquet"


def _vm_hwm_kib(pid: int) -> int:
    """A live process's peak resident memory in KiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _run(ckpt: Path, data: Path, out: Path, checkpointing: bool, args) -> dict:
    cmd = [sys.executable, "-m", "mmfuse.training", "train", str(ckpt), str(data), "--out", str(out), "--stage", "2",
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--no-shuffle", "--dtype", args.dtype,
           *(["--full"] if args.full else ["--lora-r", "8"]), *(["--gradient-checkpointing"] if checkpointing else [])]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"TQDM_DISABLE": "1"})
        peak_kib = 0
        while proc.poll() is None:  # the high-water mark only grows: a read misses at most the last 20 ms
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"gradient_checkpointing": checkpointing, "peak_rss_mib": round(peak_kib / 1024, 1),
            "seconds_per_step": round(metrics["train_seconds_this_session"] / metrics["steps"], 2),
            "losses": [r["loss"] for r in metrics["history"]]}


def run(args) -> dict:
    import torch

    from .machine import _cpu_name as cpu_name  # the same CPU name the other benchmarks report

    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-mem-") as tmp:
        ckpt, data = _setup(Path(tmp), args)
        results = [_run(ckpt, data, Path(tmp) / f"out{int(c)}", c, args) for c in (False, True)]
    off, on = results
    return {"config": vars(args), "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                                              "threads": torch.get_num_threads()},
            "runs": results, "peak_saved_mib": round(off["peak_rss_mib"] - on["peak_rss_mib"], 1),
            "max_loss_difference": max(abs(a - b) for a, b in zip(off["losses"], on["losses"]))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmfuse bench training-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--input-dim", type=int, default=32)
    p.add_argument("--rows", type=int, default=1000, help="vectors in each row's item: its soft tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--full", action="store_true", help="train every LM weight (default: LoRA r=8)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    print(f"{'checkpointing':>14} {'peak RSS MiB':>13} {'s/step':>7}  losses")
    for r in result["runs"]:
        print(f"{'on' if r['gradient_checkpointing'] else 'off':>14} {r['peak_rss_mib']:>13.1f} "
              f"{r['seconds_per_step']:>7.2f}  {', '.join(f'{x:.6f}' for x in r['losses'])}")
    print(f"saved {result['peak_saved_mib']} MiB; largest loss difference {result['max_loss_difference']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
