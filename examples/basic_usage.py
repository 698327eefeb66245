"""The original sketch's Basic Example, unchanged except for the base model.

``MultimodalQwen3Pipeline(model_name=..., modality_configs=..., device=...)`` with a plain base
LM attaches fresh projectors for m1 (768-d) and m2 (512-d) once, under ``$MMFUSE_CACHE``
(default ``~/.cache/mmfuse``; here a temporary directory, as the base is new on every run). The base here is a tiny random Qwen3-style LM made offline by
``mmfuse.tiny`` (use a hub id such as "Qwen/Qwen3-0.6B" or a local directory instead), so the
output is gibberish: nothing is trained. Prints (the ``...`` vary):

    output: '...'
    ok
"""
import os
import tempfile

import torch

from mmfuse.tiny import make_base
from multimodal_qwen3 import MultimodalQwen3Pipeline   # or: from mmfuse import MultimodalQwen3Pipeline

work = tempfile.mkdtemp()
base = make_base(os.path.join(work, "base"))   # a tiny random base LM with its tokenizer, no hub access needed
os.environ["MMFUSE_CACHE"] = os.path.join(work, "cache")   # projectors for a base go here (default ~/.cache/mmfuse)

pipeline = MultimodalQwen3Pipeline(
    model_name=str(base),
    modality_configs={"m1": {"input_dim": 768, "hidden_dim": 4096},   # hidden_dim: the projector MLP's inner size
                      "m2": {"input_dim": 512, "hidden_dim": 4096}},
    device="cuda" if torch.cuda.is_available() else "cpu",           # used by the transformers backend
)
input_data = {"text": "Compare these: ",   # no placeholders: the items go before the text, m1 then m2
              "multimodal_data": {"multimodal_embeddings": {"m1": torch.randn(768), "m2": torch.randn(512)}}}
output = pipeline.generate(input_data, max_tokens=64)
pipeline.close()
print("output:", repr(output))
assert isinstance(output, str)
print("ok")
