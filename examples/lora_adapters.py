"""The README's "LoRA adapters": two adapters over one checkpoint, picked per request or per call.

Runs offline: a tiny random base LM (``mmfuse.tiny``) and two peft LoRA adapters with random
weights (``make_lora_adapter``; yours come from ``mmfuse train --stage 2 --save-adapter``), so
the text is gibberish. Prints (the ``...`` differ from machine to machine):

    adapters: ['a', 'b']
    base: '...'
    a: '...'
    b: '...'
    ok
"""
import tempfile
from pathlib import Path

import numpy as np

from mmfuse import ModalitySpec, MultimodalPipeline, init_checkpoint
from mmfuse.lora import merge_adapter
from mmfuse.tiny import make_base, make_lora_adapter

work = Path(tempfile.mkdtemp())
base = make_base(work / "base")
ckpt = init_checkpoint(base, work / "ckpt", [ModalitySpec("m1", input_dim=32)])
adapters = {name: make_lora_adapter(base, work / name, seed=i) for i, name in enumerate("ab", 1)}  # peft dirs

vec = np.random.default_rng(0).random(32, dtype=np.float32)
request = {"text": "Describe <|m1|>.", "multimodal_data": {"multimodal_embeddings": {"m1": [vec]}}}
with MultimodalPipeline(ckpt, backend="auto", lora=adapters) as pipe:   # {name: adapter directory}
    print("adapters:", pipe.adapters)
    # one batch, three LMs: a request's "lora" field picks its adapter; none = the checkpoint's own LM
    bare, a, b = pipe.generate([request, dict(request, lora="a"), dict(request, lora="b")], max_tokens=8)
    assert pipe.generate(request, max_tokens=8, lora="a") == a   # or per call, for requests that name none
for name, text in (("base", bare), ("a", a), ("b", b)):
    print(f"{name}: {text!r}")

# served unmerged, an adapter gives what the checkpoint with the adapter merged into its LM gives
merged_ckpt = merge_adapter(ckpt, adapters["a"], work / "merged_a")   # a plain checkpoint, LoRA in its weights
with MultimodalPipeline(merged_ckpt, backend="hf") as merged:
    assert merged.generate(request, max_tokens=8) == a
assert len({bare, a, b}) == 3
print("ok")
