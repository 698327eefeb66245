"""docs/training.md, "Training for chat use": training prompts rendered with the chat template.

Makes a tiny offline checkpoint with a ``vision`` modality, renders two questions through the
tokenizer's chat template (the placeholder where the ``input_embedding`` part will stand),
writes them with ``write_parquet`` and checks the file against the checkpoint. Prints:

    '<|im_start|>user\\nWhat colour is <|vision|>?<|im_end|>\\n<|im_start|>assistant\\n'
    []
"""
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from mmfuse import ModalitySpec, init_checkpoint
from mmfuse.tiny import make_base
from mmfuse.training import check_dataset, write_parquet

# your checkpoint; here a tiny offline one (the same as `mmfuse tiny-base` + `mmfuse init`)
work = Path(tempfile.mkdtemp())
ckpt = init_checkpoint(make_base(work / "base"), work / "ckpt", [ModalitySpec("vision", input_dim=32)])
tokenizer = AutoTokenizer.from_pretrained(ckpt)

rng = np.random.default_rng(0)
examples = [("What colour is <|vision|>?", "red", rng.normal(size=(1, 32))),
            ("Describe <|vision|> in one word.", "square", rng.normal(size=(1, 32)))]
rows = []
for question, answer, vectors in examples:
    messages = [{"role": "user", "content": question}]  # add a system message here if you will send one
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rows.append({"prompt": prompt, "response": answer, "items": {"vision": [vectors]}})
write_parquet(rows, work / "chat_train.parquet")
print(repr(rows[0]["prompt"]))
print(check_dataset(str(ckpt), str(work / "chat_train.parquet")))  # [] when every row is fine
