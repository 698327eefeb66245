"""Embeddings on the wire -> float32 numpy arrays.

Two encodings (DESIGN.md "Wire format"): a JSON array (one vector, or an array
of vectors), or ``{"dtype", "shape", "data"}`` with ``data`` the base64 of raw
little-endian bytes. Bytes are read with ``numpy.frombuffer`` only: nothing from
the wire is ever unpickled or given to ``torch.load``. The declared shape is
checked against the byte length *before* anything is decoded or allocated, so a
huge shape with little data costs nothing. Shape, dimension and NaN checks
against the checkpoint are left to ``mmfuse.inputs`` (shared with the Python API).
"""
from __future__ import annotations

import base64
import binascii
import math

import numpy as np

from ..inputs import InputError

# little-endian layouts; bfloat16 has no numpy dtype, it is the top half of a float32
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def decoded_length(data: str) -> int:
    """Bytes that a (padded) base64 string decodes to, without decoding it."""
    n = len(data)
    return n // 4 * 3 - (data.endswith("=") + data.endswith("==")) if n % 4 == 0 else -1


def decode_base64(where: str, dtype: str, shape: list[int], data: str) -> np.ndarray:
    """``{"dtype", "shape", "data"}`` -> float32 array of ``shape``; InputError naming ``where`` otherwise."""
    if dtype not in ITEMSIZE:
        raise InputError(f"{where}.dtype: unknown dtype {dtype!r}, expected one of {sorted(ITEMSIZE)}")
    if not 1 <= len(shape) <= 2 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise InputError(f"{where}.shape: expected [dim] or [n, dim] with positive ints, got {shape}")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    got = decoded_length(data)
    if got != expected:  # checked on the string: a huge declared shape is refused before any allocation
        raise InputError(f"{where}.data: shape {shape} of {dtype} needs {expected} bytes, the base64 data "
                         + ("is not valid base64 (length not a multiple of 4)" if got < 0 else f"holds {got}"))
    try:
        raw = bytearray(base64.b64decode(data, validate=True))  # writable: torch.from_numpy wants that
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}.data: invalid base64 ({e})") from None
    arr = np.frombuffer(raw, dtype=_NUMPY[dtype])
    if dtype == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False).reshape(shape)


def decode_embedding(where: str, value: object) -> np.ndarray | list:
    """One wire embedding -> an array (base64 form) or the JSON list itself (checked later by ``inputs``)."""
    if isinstance(value, dict):
        return decode_base64(where, value.get("dtype"), value.get("shape"), value.get("data"))
    if isinstance(value, list):
        return value
    raise InputError(f"{where}: expected an array of numbers or {{dtype, shape, data}}, got {type(value).__name__}")

