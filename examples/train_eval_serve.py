"""Train -> evaluate -> serve -> query, end to end on a tiny offline model (about a minute of work
on 2 CPU cores, plus the server's engine start).

1. a tiny random base LM (``mmfuse.tiny``) and a checkpoint with one modality, ``vision`` (32-d);
2. a dataset in the training format (``write_parquet``): each row's prompt is a chat request
   rendered with the tokenizer's chat template (so the model answers chat requests, see
   docs/training.md "Training for chat use"), its response a colour, its item a vector near
   that colour's centre;
3. stage 1 (projectors only, LM frozen) for 10 steps, then ``evaluate`` (transformers);
4. ``mmfuse serve`` on the trained checkpoint as a subprocess on a free port (vLLM when installed);
5. a chat request through the official ``openai`` client with ``mmfuse.client.embedding_part``,
   checked against the offline pipeline's answer for the same request; then the server is stopped.

Prints (the ``...`` vary):

    checkpoint: /tmp/.../ckpt
    dataset: /tmp/.../train.parquet (16 rows)
    trained: /tmp/.../run1 in 10 steps, loss ... -> ...
    eval: {"backend": "hf", "bleu": ..., "eval_loss": ..., "eval_tokens": ..., "exact_match": ..., "max_tokens": ..., "n": 16, "rouge1": ..., "rouge2": ..., "rougeL": ..., "token_f1": ...}
    server: http://127.0.0.1:.../v1 model /tmp/.../run1
    served: '...' (offline, transformers: the same)
    server stopped: exit code 0
    ok
"""
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from openai import OpenAI
from transformers import AutoTokenizer

from mmfuse import ModalitySpec, MultimodalPipeline, init_checkpoint
from mmfuse.client import embedding_part
from mmfuse.tiny import make_base
from mmfuse.training import EvalConfig, TrainConfig, evaluate, train, write_parquet

work = Path(tempfile.mkdtemp())

# 1. a checkpoint: base LM + a fresh projector for 32-d "vision" vectors
ckpt = init_checkpoint(make_base(work / "base"), work / "ckpt", [ModalitySpec("vision", input_dim=32)])
print("checkpoint:", ckpt)

# 2. data: chat-rendered prompts, the placeholder where the input_embedding part will stand
tokenizer = AutoTokenizer.from_pretrained(ckpt)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is <|vision|>?"}],
                                       tokenize=False, add_generation_prompt=True)
rng = np.random.default_rng(0)
colours = ["red", "green", "blue", "black"]
centres = {c: rng.normal(size=32) for c in colours}
rows = [{"prompt": prompt, "response": c, "items": {"vision": [centres[c] + 0.1 * rng.normal(size=(1, 32))]}}
        for c in colours * 4]
write_parquet(rows, work / "train.parquet")
print(f"dataset: {work / 'train.parquet'} ({len(rows)} rows)")

# 3. stage 1 (projectors only), then evaluate on the training rows (a real run holds data out)
result = train(TrainConfig(ckpt=str(ckpt), data=str(work / "train.parquet"), out=str(work / "run1"), stage=1,
                           max_steps=10, batch_size=8, lr=1e-2))
losses = [r["loss"] for r in json.loads((result.out / "metrics.json").read_text())["history"]]
print(f"trained: {result.out} in {result.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
metrics = evaluate(result.out, work / "train.parquet", EvalConfig(backend="hf"))
print("eval:", json.dumps(metrics, sort_keys=True))

# 4. serve the trained checkpoint (`mmfuse serve`, the command next to this Python) on a free port
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
mmfuse = str(Path(sys.executable).with_name("mmfuse"))
server = subprocess.Popen([mmfuse, "serve", str(result.out), "--port", str(port), "--api-key", "KEY"])
deadline = time.monotonic() + 300
while True:  # the engine starts in the background; /health answers 200 once requests are taken
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if server.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"mmfuse serve did not come up (exit code {server.poll()})")
    time.sleep(1)
base_url = f"http://127.0.0.1:{port}/v1"
print("server:", base_url, "model", result.out)

# 5. one chat request with the official openai client; the same request offline for comparison
vector = centres["red"]
client = OpenAI(base_url=base_url, api_key="KEY")
reply = client.chat.completions.create(model=str(result.out), max_tokens=8, temperature=0, messages=[
    {"role": "user", "content": [{"type": "text", "text": "What colour is "}, embedding_part(vector, "vision"),
                                 {"type": "text", "text": "?"}]}])
served = reply.choices[0].message.content
with MultimodalPipeline(result.out, backend="hf") as pipe:
    offline = pipe.generate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour is "},
        {"type": "input_embedding", "modality": "vision", "embedding": vector},
        {"type": "text", "text": "?"}]}]}, max_tokens=8)
print(f"served: {served!r} (offline, transformers: {'the same' if served == offline else repr(offline)})")

server.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish, then the engine stops
print("server stopped: exit code", server.wait(timeout=120))
assert served == offline and server.returncode == 0
print("ok")
