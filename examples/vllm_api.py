"""vLLM's own Python API on an mmfuse checkpoint (the plugin is registered when mmfuse is installed).

The shipped demo checkpoint gets MiniLM vectors of a held-out description as
``multi_modal_data`` (keys: the checkpoint's modality names) and writes the description back.
Run from the repository root. Prints:

    a huge purple sphere at the top
"""
import os

# vLLM on CPU starts its engine core with `spawn`, which re-imports this script: run the core
# in this process instead (or put the code below under `if __name__ == "__main__":`)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM, SamplingParams

from mmfuse.demo import heldout_rows

row = heldout_rows("demo/heldout.parquet", limit=1)[0]   # {"sent": [(1, 384)], "tok": [(9, 384)]} in row["items"]
llm = LLM(model="demo/ckpt", dtype="float32",
          kv_cache_memory_bytes=2**30)   # an explicit 1 GiB KV cache: on CPU vLLM's default wants 92% of all RAM free
[out] = llm.generate({"prompt": "Describe <|sent|><|tok|>:", "multi_modal_data": row["items"]},
                     SamplingParams(max_tokens=24, temperature=0))
print(out.outputs[0].text.strip())
