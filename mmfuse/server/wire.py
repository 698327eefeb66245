"""Embeddings on the wire -> float32 numpy arrays.

Two encodings (DESIGN.md "Wire format"): a JSON array (one vector, or an array
of vectors), or ``{"dtype", "shape", "data"}`` with ``data`` the base64 of raw
little-endian bytes. Bytes are read with ``numpy.frombuffer`` only: nothing from
the wire is ever unpickled or given to ``torch.load``. The declared shape is
checked against the byte length *before* anything is decoded or allocated, so a
huge shape with little data costs nothing. Shape, dimension and NaN checks
against the checkpoint are left to ``mmfuse.inputs`` (shared with the Python API).

``parse_json`` reads a request body strictly, before pydantic sees it: valid UTF-8,
standard JSON only (no NaN/Infinity), no duplicate keys, no lone surrogates in strings,
and at most ``MAX_JSON_CONTAINERS`` objects and arrays (counted on the raw bytes before
parsing, so a body of a million ``{}`` costs one byte scan, not gigabytes of objects).
"""
from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np

from ..inputs import InputError

# Most JSON objects plus arrays in one body (brackets inside strings count too). A legitimate body
# needs a few per message and one per embedding row; 100,000 is far above that while bounding the
# Python objects a 16 MiB body can turn into.
MAX_JSON_CONTAINERS = 100_000


class BodyInvalid(ValueError):
    """The body is not acceptable JSON; ``param`` names the field when one is known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _object(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise BodyInvalid(f"{key}: duplicate key in a JSON object (each field may be given once)", key)
        if type(value) is str:
            _utf8(key, value)
        out[_utf8("a key", key)] = value
    return out


def _utf8(where: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BodyInvalid(f"{where}: not valid UTF-8 (a lone surrogate \\u{ord(text[e.start]):04x} at character "
                          f"{e.start})", where if where != "a key" else None) from None
    return text


def _constant(name: str):
    raise BodyInvalid(f"the body is not valid JSON: {name} is not a JSON number")


def parse_json(body: bytes) -> object:
    """A request body -> Python objects, refusing what standard JSON or the API does not allow."""
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise BodyInvalid(f"the body holds {containers} JSON objects and arrays, at most {MAX_JSON_CONTAINERS} are "
                          "accepted (send large embeddings as base64 {dtype, shape, data})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyInvalid(f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise BodyInvalid(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, nesting too deep
        if isinstance(e, BodyInvalid):
            raise
        raise BodyInvalid(f"the body is not valid JSON: {str(e)[:200]}") from None


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
    """One wire embedding -> an array (base64 form) or the JSON list itself (checked later by ``inputs``).

    Always as rows: an embedding on the wire is vectors, never raw media, so a single vector becomes
    (1, d) (for an audio modality a 1-D array would otherwise read as a waveform)."""
    if isinstance(value, dict):
        array = decode_base64(where, value.get("dtype"), value.get("shape"), value.get("data"))
        return array.reshape(1, -1) if array.ndim == 1 else array
    if isinstance(value, list):
        return [value] if value and not isinstance(value[0], list) else value
    raise InputError(f"{where}: expected an array of numbers or {{dtype, shape, data}}, got {type(value).__name__}")

