"""Measure the shipped demo on its held-out split: the three numbers of docs/demo.md.

    .venv/bin/python scripts/eval_demo.py                  # hf backend
    .venv/bin/python scripts/eval_demo.py --backend vllm   # the vLLM plugin
    .venv/bin/python scripts/eval_demo.py --backend both
    .venv/bin/python scripts/eval_demo.py --backend both --raw   # sentences in, encoded inside the backend

Items are the held-out file's MiniLM vectors, or with ``--raw`` the sentences themselves (the
rows' responses), which the checkpoint's MiniLM encoder turns into the same vectors inside the
backend. For each backend, greedy exact match (generated text == reference sentence) of:

- ``trained``: the shipped checkpoint ``demo/ckpt``;
- ``untrained_projectors``: the same LM with freshly initialised projectors
  (``mmfuse.init_checkpoint``'s initialisation, seed 0), i.e. without what
  stage 1/2 taught the projectors;
- ``swapped``: the shipped checkpoint, each example given another example's
  items (row i gets row i+1's ``sent`` and ``tok``; all combinations differ),
  scored against its *own* sentence. ``swapped_follows_vectors`` is the share
  that wrote the donor's sentence instead: the text is the same for every row,
  so the vectors decide the output.

Prints one JSON object; ``--json PATH`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmfuse import demo as task  # noqa: E402


def swap(rows: list[dict]) -> list[dict]:
    """Row i keeps its prompt and response but gets row i+1's items."""
    return [{**r, "items": rows[(i + 1) % len(rows)]["items"]} for i, r in enumerate(rows)]


def untrained_copy(ckpt: Path, out: Path, seed: int = 0) -> Path:
    """``ckpt`` with its projectors re-initialised as ``init_checkpoint`` does (the LM is unchanged)."""
    import torch

    from mmfuse.checkpoint import read_config, save_projectors
    from mmfuse.config import MMFuseConfig
    from mmfuse.projectors import build_projectors

    shutil.copytree(ckpt, out)
    config = read_config(out)
    torch.manual_seed(seed)
    save_projectors(build_projectors(MMFuseConfig.from_dict(config["mmfuse"]).modalities, config["hidden_size"]), out)
    return out


def generate(pipe, rows: list[dict], batch_size: int = 64) -> list[str]:
    out: list[str] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        out += pipe.generate([{"text": r["prompt"], "multimodal_data": {"multimodal_embeddings": r["items"]}}
                              for r in chunk], max_tokens=24)
    return out


def exact(outputs: list[str], targets: list[str]) -> float:
    return sum(o.strip() == t.strip() for o, t in zip(outputs, targets)) / len(targets)


def _pipeline(ckpt: Path, backend: str):
    from mmfuse import MultimodalPipeline

    return MultimodalPipeline(ckpt, backend=backend)


def _close(pipe) -> None:
    close = getattr(pipe.backend, "close", None)
    if close:
        close()


def evaluate_backend(ckpt: Path, rows: list[dict], backend: str) -> dict:
    """The three exact-match numbers (and the donor share) for one backend."""
    started = time.time()
    refs = [r["response"] for r in rows]
    swapped = swap(rows)
    pipe = _pipeline(ckpt, backend)
    trained_out = generate(pipe, rows)
    swapped_out = generate(pipe, swapped)
    _close(pipe)
    with tempfile.TemporaryDirectory(prefix="mmfuse-untrained-") as tmp:
        pipe = _pipeline(untrained_copy(ckpt, Path(tmp) / "ckpt"), backend)
        untrained_out = generate(pipe, rows)
        _close(pipe)
    donors = [rows[(i + 1) % len(rows)]["response"] for i in range(len(rows))]
    return {"backend": backend, "n": len(rows), "trained": exact(trained_out, refs),
            "untrained_projectors": exact(untrained_out, refs), "swapped": exact(swapped_out, refs),
            "swapped_follows_vectors": exact(swapped_out, donors), "seconds": round(time.time() - started, 1),
            "examples": [{"reference": r, "trained": t, "untrained_projectors": u, "swapped": s}
                         for r, t, u, s in list(zip(refs, trained_out, untrained_out, swapped_out))[:3]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=str(task.CKPT_DIR))
    parser.add_argument("--data", default=str(task.HELDOUT))
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm", "both"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out rows")
    parser.add_argument("--raw", action="store_true", help="send each row's sentence as raw text (the "
                        "checkpoint's encoder makes the vectors) instead of the file's vectors")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    rows = task.heldout_rows(args.data, args.limit)
    if args.raw:
        rows = [{**r, "items": task.raw_items(r["response"])} for r in rows]
    backends = ("hf", "vllm") if args.backend == "both" else (args.backend,)
    result = {b: {"inputs": "raw sentences" if args.raw else "vectors", **evaluate_backend(Path(args.ckpt), rows, b)}
              for b in backends}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
