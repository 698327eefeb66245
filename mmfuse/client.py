"""Client helpers for ``mmfuse serve``: embedding content parts for the official ``openai`` package.

The encoding itself needs only numpy (a torch tensor is converted without importing torch)::

    from openai import OpenAI
    from mmfuse.client import embedding_part
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe "}, embedding_part(clip_vector, "vision")]}])

The ``openai`` package types ``content`` parts for its own kinds only; extra
kinds pass through unchanged as plain dicts (its ``extra_body`` does the same
for ``multimodal_embeddings`` on ``/v1/completions``).
"""
from __future__ import annotations

import base64

import numpy as np

DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def encode_embedding(array, dtype: str = "float32") -> dict:
    """``{"dtype", "shape", "data"}``: ``array`` (``(dim,)`` or ``(n, dim)``) as base64 of little-endian bytes.

    ``bfloat16`` rounds to nearest even, as torch does; it halves the bytes on the wire.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if hasattr(array, "detach"):  # a torch tensor, without importing torch
        array = array.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(array, dtype=np.float32)
    if arr.ndim not in (1, 2):
        raise ValueError(f"array: expected shape (dim,) or (n, dim), got {arr.shape}")
    if dtype == "bfloat16":
        bits = arr.view(np.uint32).astype(np.uint64)
        raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    else:
        raw = arr.astype(DTYPES[dtype]).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(raw).decode("ascii")}


def embedding_part(array, modality: str, dtype: str = "float32") -> dict:
    """A chat ``content`` part carrying ``array`` for ``modality``: it stands where the placeholder would."""
    return {"type": "input_embedding", "modality": modality, "embedding": encode_embedding(array, dtype)}


def _read(data) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    with open(data, "rb") as f:  # a path
        return f.read()


def image_part(data, mime: str = "image/png", modality: str | None = None) -> dict:
    """A standard OpenAI ``image_url`` part with the image inline as a data URL (``data``: encoded image
    bytes or a file path). ``modality`` names the checkpoint's modality when several take images."""
    url = f"data:{mime};base64," + base64.b64encode(_read(data)).decode("ascii")
    part = {"type": "image_url", "image_url": {"url": url}}
    return part | {"modality": modality} if modality else part


def audio_part(data, fmt: str = "wav", modality: str | None = None) -> dict:
    """A standard OpenAI ``input_audio`` part (``data``: encoded audio bytes or a file path)."""
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_read(data)).decode("ascii"), "format": fmt}}
    return part | {"modality": modality} if modality else part
