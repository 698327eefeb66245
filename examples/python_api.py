"""The README's "Python API": make a checkpoint, generate from text plus vectors, chat, full records.

Runs offline: the base LM is a tiny random one made by ``mmfuse.tiny`` (with a real model,
pass its hub id or directory instead), so the generated text is gibberish until trained.
Prints (the ``...`` differ from machine to machine and run to run):

    checkpoint: /tmp/.../ckpt with modalities vision, audio
    backend: vllm
    generate: '...'
    chat: '...'
    completion: 8 token ids, finish_reason 'length'
    ok

(``backend: hf`` where vLLM is not installed.)
"""
import tempfile
from pathlib import Path

import numpy as np

import mmfuse
from mmfuse import ModalitySpec, MultimodalPipeline, SamplingConfig
from mmfuse.tiny import make_base

# A checkpoint from a base LM (a hub id such as "Qwen/Qwen3-0.6B", or a local directory; here a
# tiny random one, made offline in seconds) with fresh projectors:
work = Path(tempfile.mkdtemp())
ckpt = mmfuse.init_checkpoint(make_base(work / "base"), work / "ckpt", [
    ModalitySpec("vision", input_dim=768),                               # mlp2x_gelu, 1 token per vector
    ModalitySpec("audio", input_dim=128, projector="linear", tokens_per_item=4),
])
print("checkpoint:", ckpt, "with modalities vision, audio")

with MultimodalPipeline(ckpt, backend="auto") as pipe:   # "vllm" when importable, else "hf"
    print("backend:", pipe.backend.name)

    # Text plus vectors: the i-th <|vision|> takes the i-th vision item.
    a, b = np.random.rand(768), np.random.rand(768)
    out = pipe.generate({"text": "Compare <|vision|> with <|vision|>.",
                         "multimodal_data": {"multimodal_embeddings": {"vision": [a, b]}}},
                        max_tokens=16)                  # -> str; a list of inputs -> a list of str
    print("generate:", repr(out))

    # Chat: OpenAI-style messages; an input_embedding part stands where the placeholder would.
    # An (n, 128) audio item is n vectors, each 4 soft tokens here.
    frames = np.random.rand(3, 128).astype(np.float32)
    reply = pipe.generate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in "},
        {"type": "input_embedding", "modality": "vision", "embedding": a},
        {"type": "text", "text": " and "},
        {"type": "input_embedding", "modality": "audio", "embedding": frames},
        {"type": "text", "text": "?"}]}]}, max_tokens=16, temperature=0.7, top_p=0.9, seed=0)
    print("chat:", repr(reply))

    # Full records: token ids, finish reason, logprobs.
    [[done]] = pipe.generate_completions(
        {"text": "Describe <|vision|>.", "multimodal_data": {"multimodal_embeddings": {"vision": [b]}}},
        SamplingConfig(max_tokens=8, logprobs=True))
    print(f"completion: {len(done.token_ids)} token ids, finish_reason {done.finish_reason!r}")

assert isinstance(out, str) and isinstance(reply, str)
assert len(done.token_ids) <= 8 and len(done.logprobs) == len(done.token_ids)
print("ok")
