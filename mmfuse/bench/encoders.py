"""``mmfuse bench encoders``: raw images through the in-engine encoder vs the same prompts with vectors.

One checkpoint on a small random Qwen3 base with an ``image`` modality whose encoder is a
CLIP ViT-B/32-shaped vision tower (random weights, 224x224 images, 49 patches; ``--encoder-source``
takes a real one). For each batch size B, B fresh random images (no cache hits), each in one
prompt, ``--max-tokens`` generated per request (``ignore_eos``), on the vLLM backend:

- ``raw``: PIL images in; the CLIP image processor runs where inputs are checked, the tower
  inside vLLM's ``embed_multimodal``;
- ``vectors``: the vectors that encoder makes, computed beforehand (not timed), sent instead.

Where the time goes: the HF image processor alone (``preprocess``, same images, median of
``--repeats``), and the in-engine tower as what the raw run costs beyond the vector run and the
preprocessing (the two runs differ by nothing else); the rest is the LM.

    mmfuse bench encoders --batches 1,32 --out enc.json --plot enc.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _clip_b32(out: Path, seed: int = 0) -> Path:
    """A CLIP ViT-B/32 vision tower's shape (openai/clip-vit-base-patch32) with random weights."""
    import torch
    import transformers as tf

    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)).save_pretrained(out)
    tf.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def _images(count: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(count)]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(ckpt: Path, args) -> list[dict]:
    import torch

    from vllm import SamplingParams

    from ..backends.vllm import VLLMBackend, to_request
    from ..encoders import encode_items
    from ..inputs import coerce_items, prepare

    be = VLLMBackend(ckpt, max_model_len=256)
    spec = be.specs["image"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    text = "describe <|image|> please"

    def generate(prompts: list[dict]) -> None:
        encoded = [be.encode(prepare(text, items, be.specs)) for items in prompts]
        outs = be.llm.generate([to_request(e) for e in encoded], params, use_tqdm=False)
        assert sum(len(o.outputs[0].token_ids) for o in outs) == len(prompts) * args.max_tokens

    rows, seed = [], 1
    try:
        generate([{"image": _images(1, 0)}])  # warm-up
        for batch in args.batches:
            timed = {}
            for mode in ("raw", "vectors"):
                runs = []
                for _ in range(args.repeats):
                    images, seed = _images(batch, seed), seed + 1  # fresh content: no encoder or prefix cache hit
                    if mode == "vectors":  # what the encoder makes of the same images, computed beforehand
                        prompts = [{"image": encode_items(spec, coerce_items(be.specs, {"image": [im]})["image"],
                                                          "cpu", torch.float32)} for im in images]
                    else:  # preprocessing is timed: it is part of taking raw images
                        prompts = [{"image": [im]} for im in images]
                    t0 = time.perf_counter()
                    generate(prompts)
                    runs.append(time.perf_counter() - t0)
                timed[mode] = statistics.median(runs)
            images = _images(batch, 10_000 + batch)
            pre = _median_time(lambda: [coerce_items(be.specs, {"image": [im]}) for im in images], args.repeats)
            tokens = batch * args.max_tokens
            # the runs differ only by the raw path: preprocessing (timed alone) and the in-engine tower
            row = {"batch": batch, "raw_s": timed["raw"], "vectors_s": timed["vectors"],
                   "raw_tokens_per_s": tokens / timed["raw"], "vectors_tokens_per_s": tokens / timed["vectors"],
                   "raw_over_vectors": timed["vectors"] / timed["raw"], "preprocess_s": pre,
                   "encoder_s": max(0.0, timed["raw"] - timed["vectors"] - pre)}
            rows.append(row)
            print(f"  batch {batch:>3}: raw {row['raw_tokens_per_s']:7.1f} tok/s, vectors "
                  f"{row['vectors_tokens_per_s']:7.1f} tok/s (raw/vectors {row['raw_over_vectors']:.2f}); "
                  f"of raw's {timed['raw'] * 1e3:.0f} ms: preprocess {pre * 1e3:.0f} ms, encoder tower in the engine "
                  f"{row['encoder_s'] * 1e3:.0f} ms",
                  flush=True)
    finally:
        be.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmfuse bench encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32", help="requests per run, comma-separated (default: 1,32)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, median taken (default: 3)")
    p.add_argument("--hidden", type=int, default=256, help="base LM hidden size (default: 256)")
    p.add_argument("--layers", type=int, default=4, help="base LM layers (default: 4)")
    p.add_argument("--encoder-source", default=None,
                   help="a CLIP model (hub id or directory) instead of the random ViT-B/32-shaped one")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]

    import torch

    from ..checkpoint import init_checkpoint
    from ..tiny import make_base
    from .machine import measure

    results = {"machine": measure(quick=True).to_dict(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "hidden": args.hidden, "layers": args.layers, "max_tokens": args.max_tokens,
               "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.encoder_source or str(_clip_b32(Path(tmp) / "clip"))
        results["encoder"] = args.encoder_source or "CLIP ViT-B/32 shape, random weights"
        base = make_base(Path(tmp) / "base", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64)
        ckpt = init_checkpoint(base, Path(tmp) / "ckpt",
                               {"image": {"encoder": {"source": source, "kind": "clip_vision"}}})
        results["runs"] = _run(ckpt, args)
    results["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"batch {r['batch']}\n{m}" for r in runs for m in ("raw", "vectors")]
    pre = [r["preprocess_s"] if m == "raw" else 0 for r in runs for m in ("raw", "vectors")]
    enc = [r["encoder_s"] if m == "raw" else 0 for r in runs for m in ("raw", "vectors")]
    rest = [r[f"{m}_s"] - p - e for r in runs for m, p, e in zip(("raw", "vectors"), (r["preprocess_s"], 0),
                                                                    (r["encoder_s"], 0))]
    ax.bar(labels, pre, label="HF image processor")
    ax.bar(labels, enc, bottom=pre, label="encoder tower")
    ax.bar(labels, rest, bottom=[a + b for a, b in zip(pre, enc)], label="LM (vLLM) + the rest")
    ax.set_ylabel("seconds per run")
    ax.set_title(f"raw images vs vectors, {results['max_tokens']} tokens each (vLLM, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
