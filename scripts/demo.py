"""The shipped demo (``make demo``): sentences in, MiniLM's vectors of them read by the LM, the sentence written back.

Sends scene descriptions that are in neither the training data nor the held-out split
(``mmfuse.demo.DEMO_SENTENCES``, or your own: ``a SIZE COLOR SHAPE POSITION``) as raw text to
the shipped checkpoint ``demo/ckpt``, whose modalities declare MiniLM as their encoder: the
backend encodes each sentence (``sent``: the pooled vector, ``tok``: the token states), only
those vectors reach the LM, and the script prints a table of what it writes back. The task
itself (grammar, encoder, prompt) is ``mmfuse/demo.py``; ``scripts/build_demo.py`` trains the
checkpoint.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mmfuse.demo import CKPT_DIR, DEMO_SENTENCES, EMBED_DIM, PROMPT, REPO, raw_items, request


def _build_on_the_fly(ckpt: Path) -> None:
    script = REPO / "scripts" / "build_demo.py"
    if not script.exists():
        sys.exit(f"no demo checkpoint at {ckpt}, and no {script} to build one (run from a source checkout)")
    print(f"No trained demo checkpoint at {ckpt}.\nBuilding one now with {script} "
          f"(tiny LM + projectors from scratch, about 3-5 minutes on 2 CPU cores)...", flush=True)
    subprocess.run([sys.executable, str(script), "--out", str(ckpt.parent)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", nargs="*", help="descriptions to send (default: five new ones); "
                        "the grammar is 'a SIZE COLOR SHAPE POSITION'")
    parser.add_argument("--ckpt", default=str(CKPT_DIR), help="mmfuse checkpoint (default: the shipped demo/ckpt)")
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                        help="auto: vLLM when importable, else transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's and transformers' logs")
    args = parser.parse_args(argv)
    from mmfuse.logs import configure, status

    configure("INFO" if args.verbose else None)  # one status line per stage; library chatter behind -v
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        _build_on_the_fly(ckpt)
    sentences = args.sentences or list(DEMO_SENTENCES)

    from mmfuse.pipeline import MultimodalPipeline

    with MultimodalPipeline(ckpt, backend=args.backend) as pipe:
        status(f"generating ({pipe.backend.name}) from {len(sentences)} raw sentence{'s' * (len(sentences) != 1)}, "
               f"encoded inside the backend by MiniLM (sent: 1 x {EMBED_DIM}, tok: n x {EMBED_DIM})")
        outputs = pipe.generate([request(raw_items(s)) for s in sentences], max_tokens=24)
    print(f"\nbackend: {pipe.backend.name}    prompt: {PROMPT!r}  (the text is the same for every input)\n")
    width = max(len(s) for s in sentences)
    print(f"{'input sentence'.ljust(width)}  | {'model output'}")
    print(f"{'-' * width}--+-{'-' * width}")
    for s, out in zip(sentences, outputs):
        print(f"{s.ljust(width)}  | {out.strip()}   [{'ok' if out.strip() == s.strip() else 'differs'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
