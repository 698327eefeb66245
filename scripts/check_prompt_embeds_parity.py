"""The prompt_embeds peer computes what the mmfuse plugin computes: same greedy tokens, same logprobs.

On the tests' tiny Qwen3 checkpoint (hidden 128, head_dim 64; m1 32-d mlp2x_gelu, m2 16-d linear with 2 rows
per vector, built under --work), 8 prompts with 3 items each, greedy, 16 tokens: once through the plugin
(``VLLMBackend``) and once as client-built ``inputs_embeds`` into vLLM's ``enable_prompt_embeds`` engine on the
base LM (``mmfuse.bench.sides``), each in its own process. Exits 1 unless every token matches.

    python scripts/check_prompt_embeds_parity.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_side(side: str, work: Path, out: Path) -> None:
    import numpy as np
    from vllm import SamplingParams

    from mmfuse.bench.serve_load import _tiny_checkpoint
    from mmfuse.bench.sides import SIDES, time_requests
    from mmfuse.inputs import prepare

    ckpt = _tiny_checkpoint(work)
    runner = SIDES[side](ckpt, work / "base", "float32", 1024, 1.0)
    rng, specs = np.random.default_rng(0), runner.checkpoint.specs
    prompts = [prepare(f"request {i}: compare <|m1|> with <|sensor|> and <|m1|>",
                       {"m1": [rng.standard_normal((1 + i % 3, 32), dtype=np.float32),
                               rng.standard_normal(32, dtype=np.float32)],
                        "m2": [rng.standard_normal((2, 16), dtype=np.float32)]}, specs) for i in range(8)]
    res = time_requests(runner, [runner.checkpoint.encode(p) for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0, logprobs=0))
    out.write_text(json.dumps([[r["token_ids"], r["logprobs"]] for r in res]))
    runner.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmfuse-prompt-embeds-parity"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.side:
        run_side(args.side, args.work, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for side in ("mmfuse", "prompt_embeds"):  # one engine per process
            out = Path(tmp) / f"{side}.json"
            subprocess.run([sys.executable, __file__, "--work", str(args.work), "--side", side, "--out", str(out)],
                           check=True)
            got[side] = json.loads(out.read_text())
    a, b = got["mmfuse"], got["prompt_embeds"]
    same = [x[0] == y[0] for x, y in zip(a, b)]
    gap = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x[1], y[1]))
    print(f"identical greedy tokens: {sum(same)}/{len(same)} prompts; largest logprob difference {gap:.2e}; "
          f"distinct outputs {len({tuple(x[0]) for x in a})}")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
