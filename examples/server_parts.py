"""Every way to send embeddings to `mmfuse serve` with the openai client: docs/server.md's snippet.

Start the server first, from the repository root: ``mmfuse serve demo/ckpt --port 8000 --api-key KEY``
(``MMFUSE_URL`` overrides the address). The vectors are MiniLM's for a held-out description:

- chat: ``input_embedding`` content parts (``embedding_part``), ``tok`` sent as bfloat16 (half the
  bytes; the server widens to float32). The demo model was trained on raw prompts, never on the
  chat template, so its chat answer is *not* the description (docs/training.md, "Training for
  chat use");
- completions: ``prompt`` with placeholders plus ``multimodal_embeddings`` (``encode_embedding``),
  the format the demo was trained on: it writes the description back.

Prints (the chat answer is whatever this model makes of the unfamiliar framing):

    model: demo/ckpt
    chat: '...'
    completions: 'a huge purple sphere at the top'
"""
import os

from openai import OpenAI

from mmfuse.client import embedding_part, encode_embedding
from mmfuse.demo import heldout_rows

row = heldout_rows("demo/heldout.parquet", limit=1)[0]
sent, tok = row["items"]["sent"][0], row["items"]["tok"][0]   # (1, 384) and (9, 384) float32

client = OpenAI(base_url=os.environ.get("MMFUSE_URL", "http://127.0.0.1:8000/v1"), api_key="KEY")
model = client.models.list().data[0].id   # the CKPT argument as given, or --served-model-name
print("model:", model)

chat = client.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=[
    {"role": "user", "content": [{"type": "text", "text": "Describe "}, embedding_part(sent, "sent"),
                                 embedding_part(tok, "tok", dtype="bfloat16"), {"type": "text", "text": ":"}]}])
print("chat:", repr(chat.choices[0].message.content))

completion = client.completions.create(model=model, prompt="Describe <|sent|><|tok|>:", max_tokens=24,
                                       temperature=0, extra_body={"multimodal_embeddings": {
                                           "sent": [encode_embedding(sent)], "tok": [encode_embedding(tok)]}})
print("completions:", repr(completion.choices[0].text.strip()))
