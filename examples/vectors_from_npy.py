"""Vectors from .npy files into the shipped demo checkpoint, which writes back the sentence they encode.

``demo/ckpt`` reads two modalities from the MiniLM sentence encoder: ``sent`` (the pooled 384-d
vector, a (1, 384) item) and ``tok`` (MiniLM's token states, an (n, 384) item). The vectors
here are those of three held-out descriptions in ``demo/heldout.parquet`` (never seen in
training), saved as .npy files as an encoder pipeline might leave them and loaded with
``allow_pickle=False``. Run from the repository root. Prints:

    'a huge purple sphere at the top' -> 'a huge purple sphere at the top'
    'a large white cone on the left' -> 'a large white cone on the left'
    'a huge pink ring at the bottom' -> 'a huge pink ring at the bottom'
"""
import tempfile
from pathlib import Path

import numpy as np

from mmfuse import MultimodalPipeline
from mmfuse.demo import heldout_rows

# vectors as your encoder might leave them: one .npy file per item
rows = heldout_rows("demo/heldout.parquet", limit=3)   # {"prompt", "response", "items": {name: [array]}}
folder = Path(tempfile.mkdtemp())
for i, row in enumerate(rows):
    np.save(folder / f"{i}_sent.npy", row["items"]["sent"][0])   # (1, 384)
    np.save(folder / f"{i}_tok.npy", row["items"]["tok"][0])     # (9, 384): one row per word piece

# the prompt is the same for every input: everything the model writes comes from the vectors
requests = [{"text": "Describe <|sent|><|tok|>:", "multimodal_data": {"multimodal_embeddings": {
                "sent": [np.load(folder / f"{i}_sent.npy", allow_pickle=False)],
                "tok": [np.load(folder / f"{i}_tok.npy", allow_pickle=False)]}}}
            for i in range(len(rows))]
with MultimodalPipeline("demo/ckpt", backend="auto") as pipe:   # "vllm" when importable, else "hf"
    outputs = pipe.generate(requests, max_tokens=24)           # a list in, a list of str out
for row, out in zip(rows, outputs):
    print(f"{row['response']!r} -> {out.strip()!r}")
