"""docs/training.md, "Python API": ``write_parquet``, ``train`` (stage 1, 4 steps) and ``evaluate``.

On a tiny offline checkpoint (``mmfuse.tiny``) and 16 rows, all in a temporary directory.
Prints the run's directory, steps, last loss and last eval record, then the evaluation
(the ``...`` vary; 4 steps teach nothing, so exact match stays near 0):

    /tmp/.../run1 4 ... {'step': 4, 'eval_loss': ..., 'n': 16}
    {'n': 16, 'exact_match': ..., 'backend': 'hf', ...}
"""
import tempfile
from pathlib import Path

import numpy as np

from mmfuse import ModalitySpec, init_checkpoint
from mmfuse.tiny import make_base
from mmfuse.training import EvalConfig, TrainConfig, evaluate, train, write_parquet

# a tiny offline checkpoint and a small dataset; use your own checkpoint and data instead
work = Path(tempfile.mkdtemp())
ckpt = init_checkpoint(make_base(work / "base"), work / "ckpt", [ModalitySpec("m1", input_dim=32)])
rng = np.random.default_rng(0)
rows = [{"prompt": "the colour of <|m1|> is", "response": colour, "items": {"m1": [rng.normal(size=(1, 32))]}}
        for colour in ["red", "green", "blue", "black"] * 4]
write_parquet(rows, work / "train.parquet")

result = train(TrainConfig(ckpt=str(ckpt), data=str(work / "train.parquet"), out=str(work / "run1"), stage=1,
                           max_steps=4, batch_size=4, eval_data=str(work / "train.parquet")))
print(result.out, result.steps, result.final_loss, result.eval)   # eval: the last eval record
print(evaluate(str(result.out), str(work / "train.parquet"), EvalConfig(backend="hf")))
