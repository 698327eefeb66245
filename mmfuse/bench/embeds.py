"""The peer's client: what a vLLM ``prompt_embeds`` user computes before sending a request.

Without mmfuse, a vLLM user who wants vectors in a prompt runs the checkpoint's projectors and the
LM's embedding table on the client, splices the projected rows over the placeholder positions, and
sends the whole ``inputs_embeds`` ([S, H], one row per prompt token) with ``enable_prompt_embeds``.
``PromptEmbedder`` does exactly that with mmfuse's own pieces (tokenization and placeholder rule of
``Checkpoint.encode``, ``project_items``, ``merge_rows``), so its rows are the rows the plugin puts in
the engine, and any difference in the results is the transport, not the maths.

Request sizes: offline the request is the tensor itself (``tensor_bytes``); over HTTP, vLLM's
``/v1/completions`` takes ``prompt_embeds`` as the base64 of a ``torch.save`` file (``server_body_bytes``).
"""
from __future__ import annotations

import base64
import io
import json
import os

import torch
from safetensors import safe_open

from ..backends.hf import merge_rows
from ..checkpoint import load_projector_state, open_checkpoint, weight_files
from ..encoders import encode_items
from ..inputs import EncodedPrompt, PreparedPrompt
from ..projectors import build_projectors, project_items

# The input embedding's tensor name in every family mmfuse supports (qwen2/qwen3/llama/mistral). None of
# them scales the embedding (Gemma would multiply by sqrt(hidden)), so a table lookup is the whole step.
EMBED_KEY = "model.embed_tokens.weight"


def read_embedding_table(path) -> torch.Tensor:
    """The LM's input embedding [V, H], read alone from the checkpoint's safetensors (not the whole LM)."""
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            if EMBED_KEY in st.keys():
                return st.get_tensor(EMBED_KEY)
    raise KeyError(f"{path}: no {EMBED_KEY} in the checkpoint's weights")


class PromptEmbedder:
    """Client-side ``inputs_embeds`` for mmfuse prompts: embedding table + projectors, nothing else of the LM."""

    def __init__(self, model_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
        self.checkpoint = open_checkpoint(model_path)
        self.specs = self.checkpoint.specs
        self.dtype = dtype
        self.table = read_embedding_table(self.checkpoint.path).to(dtype)
        self.projectors = build_projectors(self.specs, self.checkpoint.hidden_size)
        self.projectors.load_state_dict(load_projector_state(self.checkpoint.path))
        self.projectors.to(dtype).eval()

    def encode(self, prepared: PreparedPrompt) -> EncodedPrompt:
        return self.checkpoint.encode(prepared)

    @torch.inference_mode()
    def __call__(self, encoded: EncodedPrompt) -> torch.Tensor:
        """[S, H]: the prompt's token embeddings with each item's projected rows at its placeholders."""
        ids = torch.tensor([encoded.expanded_ids])
        is_mm = torch.zeros_like(ids, dtype=torch.bool)
        for pid in self.checkpoint.placeholder_ids.values():
            is_mm |= ids == pid
        embeds = torch.nn.functional.embedding(ids.masked_fill(is_mm, 0), self.table)  # [1, S, H]
        rows = {name: torch.cat(project_items(self.projectors[name],
                                              encode_items(self.specs[name], list(items), "cpu", self.dtype)))
                for name, items in encoded.items.items() if items}
        return merge_rows(embeds, ids, rows, self.checkpoint.placeholder_ids)[0]


def tensor_bytes(embeds: torch.Tensor) -> int:
    """Bytes of an offline ``prompt_embeds`` request: the tensor's data."""
    return embeds.numel() * embeds.element_size()


def server_body_bytes(embeds: torch.Tensor, max_tokens: int) -> int:
    """Bytes of the JSON body vLLM's ``/v1/completions`` takes for this ``prompt_embeds`` (base64 of ``torch.save``)."""
    buf = io.BytesIO()
    torch.save(embeds.contiguous(), buf)
    body = {"model": "m", "prompt_embeds": base64.b64encode(buf.getvalue()).decode(), "max_tokens": max_tokens,
            "temperature": 0}
    return len(json.dumps(body).encode())


def completion_body(prompt: str, items: dict[str, list], max_tokens: int) -> dict:
    """mmfuse's greedy ``/v1/completions`` body for a prompt (no ``model``): the text plus base64 float32 items."""
    from ..client import encode_embedding

    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "multimodal_embeddings": {name: [encode_embedding(x) for x in its] for name, its in items.items()}}


def mmfuse_body_bytes(prompt: str, items: dict[str, list], max_tokens: int) -> int:
    """Bytes of the equivalent mmfuse ``/v1/completions`` body."""
    return len(json.dumps({"model": "m"} | completion_body(prompt, items, max_tokens)).encode())


def mmfuse_item_bytes(encoded: EncodedPrompt) -> int:
    """Bytes of an offline mmfuse request: the token ids (int64) plus the items' float32 data."""
    n = 8 * len(encoded.token_ids)
    for its in encoded.items.values():
        for x in its:
            n += 4 * int(torch.as_tensor(x).numel())
    return n
