"""docs/training.md, "Data format": write rows in the training format with ``write_parquet``.

Writes ``train.parquet`` (one row: a prompt with a placeholder, a response, and one (1, 768)
item of modality m1) into the current directory. Prints nothing.
"""
import numpy as np
from mmfuse.training import write_parquet

write_parquet([{"prompt": "What is <|m1|>?", "response": "a red cube",
                "items": {"m1": [np.random.randn(1, 768)]}}],      # (n, dim) or (dim,) per item
              "train.parquet")                                        # rows_per_file=N: a directory of parts
