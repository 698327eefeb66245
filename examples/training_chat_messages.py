"""docs/training.md, "Chat data: the `messages` column": chat rows trained and queried the same way.

Makes a tiny offline checkpoint with a ``vision`` modality, writes 16 one-turn conversations whose user
turn holds an ``input_embedding`` part, checks them, trains stage 1 for 2 steps (loss on the assistant
answers only) and sends the first conversation's user turn as a chat request. Prints:

    []
    2 steps, then a chat request: ...
"""
import tempfile
from pathlib import Path

import numpy as np

from mmfuse import MultimodalPipeline, ModalitySpec, init_checkpoint
from mmfuse.tiny import make_base
from mmfuse.training import TrainConfig, check_dataset, train, write_parquet

# your checkpoint; here a tiny offline one (the same as `mmfuse tiny-base` + `mmfuse init`)
work = Path(tempfile.mkdtemp())
ckpt = init_checkpoint(make_base(work / "base"), work / "ckpt", [ModalitySpec("vision", input_dim=32)])

rng = np.random.default_rng(0)
rows = []
for answer in ["red", "green", "blue", "black"] * 4:
    question = [{"type": "text", "text": "What colour is "},
                {"type": "input_embedding", "modality": "vision", "embedding": rng.normal(size=(1, 32))},
                {"type": "text", "text": "?"}]
    rows.append({"messages": [{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}]})
write_parquet(rows, work / "chat.parquet")
print(check_dataset(str(ckpt), str(work / "chat.parquet")))  # [] when every row is fine
run = train(TrainConfig(ckpt=str(ckpt), data=str(work / "chat.parquet"), out=str(work / "run"), stage=1,
                        max_steps=2, batch_size=8))
pipe = MultimodalPipeline(run.out, backend="hf")
answer = pipe.generate({"messages": rows[0]["messages"][:1]}, max_tokens=4)  # rendered as in training
print(run.steps, "steps, then a chat request:", repr(answer))
