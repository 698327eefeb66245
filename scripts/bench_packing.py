"""Packing vs padding for one training micro-batch: positions computed, forward + backward time, loss.

A tiny random LM (hidden 256, 4 layers, eager attention, fp32, CPU) and 32 rows whose lengths follow
a long-tailed (log-normal) mix, as SFT data often does. Each layout runs ``--repeats`` times, alternating;
the loss sums must agree (packing changes only the layout, docs/training.md "Long rows and packing").

    python scripts/bench_packing.py --out /tmp/bench_packing --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mmfuse import init_checkpoint, load
from mmfuse.tiny import make_base
from mmfuse.training.encode import RowEncoder
from mmfuse.training.evaluation import token_loss_sum

WORDS = "red green blue one two three circle square hello world".split()


def rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = int(min(900, rng.lognormal(3.5, 1.0)))  # median ~33 words, a few hundred at the tail
        out.append({"prompt": "describe <|m1|> " + " ".join(rng.choice(WORDS, words)),
                    "response": " ".join(rng.choice(WORDS, 8)), "mm_m1": [rng.normal(size=(1, 32)).tolist()]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/bench_packing", help="where the tiny checkpoint is written")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    if not (root / "ckpt").exists():
        base = make_base(root / "base", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, max_len=2048)
        init_checkpoint(base, root / "ckpt", {"m1": {"input_dim": 32}})
    model = load(root / "ckpt").train()
    enc = RowEncoder(model.checkpoint, max_length=args.max_length)
    examples = [enc.encode(r, i) for i, r in enumerate(rows(args.rows, 0))]
    lengths = [len(e.input_ids) for e in examples]
    print(f"{len(examples)} rows, tokens median {int(np.median(lengths))}, max {max(lengths)}, sum {sum(lengths)}")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for packing in (False, True):
            batch = enc.collate(examples, packing)
            start = time.perf_counter()
            loss = token_loss_sum(model, batch)
            loss.backward()
            times[packing].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            print(f"packing={packing}: batch {tuple(batch.input_ids.shape)} = {batch.input_ids.numel()} positions; "
                  f"fwd+bwd {times[packing][-1]:.2f} s; loss sum {float(loss.detach()):.4f}")
    print(f"median fwd+bwd: padded {statistics.median(times[False]):.2f} s, packed "
          f"{statistics.median(times[True]):.2f} s")


if __name__ == "__main__":
    main()
