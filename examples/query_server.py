"""Query `mmfuse serve` with the official openai client: the README's "Server" snippet.

Start the server first, from the repository root (another terminal):

    mmfuse serve demo/ckpt --port 8000 --api-key KEY

The request sends the MiniLM vectors of a held-out description to ``/v1/completions`` (the demo
model was trained on the raw prompt ``Describe <|sent|><|tok|>:``, so it is queried with that
prompt, not through the chat template). ``MMFUSE_URL`` overrides the server address. Prints:

    a huge purple sphere at the top
"""
import os

from openai import OpenAI

from mmfuse.client import encode_embedding
from mmfuse.demo import heldout_rows

row = heldout_rows("demo/heldout.parquet", limit=1)[0]   # MiniLM vectors of one held-out description
client = OpenAI(base_url=os.environ.get("MMFUSE_URL", "http://127.0.0.1:8000/v1"), api_key="KEY")
reply = client.completions.create(
    model="demo/ckpt", prompt="Describe <|sent|><|tok|>:", max_tokens=24, temperature=0,
    extra_body={"multimodal_embeddings": {"sent": [encode_embedding(row["items"]["sent"][0])],    # (1, 384)
                                          "tok": [encode_embedding(row["items"]["tok"][0])]}})   # (9, 384)
print(reply.choices[0].text.strip())
