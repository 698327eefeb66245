"""Input rules shared by every backend: item coercion, validation, placeholders.

The data path starts here: ``text + {modality: [items]}`` becomes a
``PreparedPrompt`` whose items are float32 tensors shaped ``(n, input_dim)``;
once tokenized (``Checkpoint.encode``), ``encode_token_ids`` applies the
placeholder rule on token ids and expands each placeholder to its item's rows,
giving the ``EncodedPrompt`` every backend submits. vLLM's processor applies the
same rule (``place_placeholder_ids``) to requests sent to ``vllm.LLM`` directly. Every user mistake raises
``InputError`` naming the modality, the item index, what was expected and what
came, before anything reaches a model.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModalitySpec



@dataclass
class RawItem:
    """Raw media (an image, a waveform, a string) as its encoder's preprocessor left it
    (``mmfuse.encoders.preprocess``); the encoder makes ``rows`` vectors of it inside the backend."""

    features: dict[str, torch.Tensor]
    rows: int


Item = torch.Tensor | RawItem  # vectors: float32 [n, input_dim], n >= 1

# Largest |value| accepted in an item. Projectors are small linear maps (gains of order 1-10),
# and the LM runs in float16/bfloat16 on GPUs (largest float16: 65504): beyond 1e4 a projected
# row can overflow there and poison the logits. Encoder outputs (CLIP, Whisper, sentence
# vectors, normalised features) are orders of magnitude below this.
MAX_ABS_VALUE = 1e4
_NUMBER_TYPES = (int, float, np.floating, np.integer)


class InputError(ValueError):
    """A request's text or embeddings break the input rules; the message says which and how.

    ``param``: the request field at fault when one is known (the server's error ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _where(name: str, index: int | None) -> str:
    return f"modality {name!r}" + ("" if index is None else f" item {index}")


def as_list(value: object) -> list | None:
    """The elements of a list or tuple (subclasses included, read without calling their own
    ``__len__``/``__iter__``/``__getitem__``, which may lie); None for anything else."""
    if isinstance(value, list):
        return list(list.__iter__(value))
    if isinstance(value, tuple):
        return list(tuple.__iter__(value))
    return None


def _check_tensor(where: str, expected: str, item: torch.Tensor) -> torch.Tensor:
    if item.is_nested or item.layout != torch.strided:
        kind = "nested" if item.is_nested else f"{item.layout} (sparse)"
        raise InputError(f"{where}: expected a dense tensor with {expected}, got a {kind} tensor")
    if item.is_quantized:
        raise InputError(f"{where}: expected a real float tensor with {expected}, got a quantized tensor ({item.dtype})")
    if item.device.type == "meta":
        raise InputError(f"{where}: expected a tensor with data, got one on the meta device (no values)")
    if not item.is_floating_point():
        raise InputError(f"{where}: expected a real float tensor with {expected}, got dtype {item.dtype}")
    return item.detach()


def _check_array(where: str, expected: str, item: np.ndarray) -> np.ndarray:
    if isinstance(item, np.ma.MaskedArray):
        raise InputError(f"{where}: expected a plain float array with {expected}, got a masked array")
    if item.dtype.kind != "f":
        raise InputError(f"{where}: expected a real float array with {expected}, got dtype {item.dtype}")
    return np.asarray(item)


def _numbers(at: str, expected: str, row: object) -> np.ndarray:
    """One vector given as a list of numbers, a float array or a float tensor -> float64 [d]."""
    if isinstance(row, torch.Tensor):
        return _check_tensor(at, expected, row).to("cpu", torch.float64).numpy()
    if isinstance(row, np.ndarray):
        return _check_array(at, expected, row).astype(np.float64)
    values = as_list(row)
    if values is None:
        raise InputError(f"{at}: expected a list of numbers with {expected}, got {type(row).__name__}")
    if not set(map(type, values)) <= {float, int}:  # the common case costs one pass in C
        at_bad = next((i for i, v in enumerate(values)
                       if isinstance(v, (bool, np.bool_)) or not isinstance(v, _NUMBER_TYPES)), None)
        if at_bad is not None:
            bad = values[at_bad]
            raise InputError(f"{at}: expected numbers with {expected}, got {type(bad).__name__} {bad!r:.40}")
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        raise InputError(f"{at}: a number too large for a float, expected |x| <= {MAX_ABS_VALUE:g}") from None


def _list_values(where: str, expected: str, item: list) -> np.ndarray:
    """A list of numbers (one vector) or a list of rows (lists of numbers, float arrays or tensors)."""
    if not item or not (as_list(item[0]) is not None or isinstance(item[0], (np.ndarray, torch.Tensor))):
        return _numbers(where, expected, item)
    rows = [_numbers(f"{where} row {r}", expected, row) for r, row in enumerate(item)]
    ranks = {r.ndim for r in rows}
    if ranks != {1}:
        raise InputError(f"{where}: expected rank 1 or 2 with {expected}, got rows of rank {max(ranks)}")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise InputError(f"{where}: rows of different lengths {sorted(widths)}, expected {expected}")
    return np.stack(rows)


def coerce_item(spec: ModalitySpec, index: int, item: object) -> Item:
    """Turn a float tensor, float numpy array or nested list of numbers into a checked ``(n, input_dim)``
    float32 tensor. Only real floating dtypes (lists: Python/numpy numbers, not bools or strings),
    finite values with ``|x| <= MAX_ABS_VALUE``. For a modality with an encoder, raw media (an image,
    image bytes or path; a 1-D 16 kHz waveform; a string) become a ``RawItem``."""
    if isinstance(item, RawItem):
        return item
    if spec.encoder is not None:
        from .encoders import is_raw, preprocess

        if is_raw(spec, item):
            return preprocess(spec, index, item)
    where = _where(spec.name, index)
    expected = f"shape ({spec.input_dim},) or (n, {spec.input_dim})"
    if isinstance(item, torch.Tensor):
        src = _check_tensor(where, expected, item)
        if src.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            src = src.to(torch.float32)  # float8 kinds: widened before the checks
    elif isinstance(item, np.ndarray):
        arr = _check_array(where, expected, item)
        if arr.dtype not in (np.float16, np.float32, np.float64) or not arr.dtype.isnative:
            arr = arr.astype(np.float64)  # long double, big-endian: torch takes neither
        src = torch.from_numpy(np.ascontiguousarray(arr))
    elif as_list(item) is not None:
        src = torch.from_numpy(_list_values(where, expected, as_list(item)))
    else:
        raise InputError(f"{where}: expected a float tensor, float array or list of numbers with {expected}, "
                         f"got {type(item).__name__}")
    if src.dim() == 1:
        src = src.unsqueeze(0)
    if src.dim() != 2:
        raise InputError(f"{where}: expected rank 1 or 2 with {expected}, got rank {src.dim()} shape {tuple(src.shape)}")
    if src.shape[0] == 0 or src.shape[1] == 0:
        raise InputError(f"{where}: empty item, expected {expected} with n >= 1, got shape {tuple(src.shape)}")
    if src.shape[1] != spec.input_dim:
        raise InputError(f"{where}: wrong last dimension, expected {spec.input_dim}, got shape {tuple(src.shape)}")
    if not torch.isfinite(src).all():
        raise InputError(f"{where}: contains NaN or Inf values")
    peak = float(src.abs().max())
    if peak > MAX_ABS_VALUE:
        raise InputError(f"{where}: a value of magnitude {peak:.3g} is out of range, expected |x| <= "
                         f"{MAX_ABS_VALUE:g} (larger values overflow the LM's float16/bfloat16 range after projection)")
    return src.to(torch.float32).contiguous()


def is_single_item(value: object) -> bool:
    """A tensor/array/raw medium is one item; a list is one item only if its first element is a number."""
    if isinstance(value, (torch.Tensor, np.ndarray, RawItem, str, bytes, bytearray, os.PathLike)) or \
            type(value).__module__.startswith("PIL.") or is_sampled_waveform(value):
        return True
    values = as_list(value)
    return bool(values) and isinstance(values[0], _NUMBER_TYPES + (np.bool_,))


def is_sampled_waveform(value: object) -> bool:
    """vLLM's audio convention: a ``(waveform, sampling_rate)`` pair."""
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], _NUMBER_TYPES)
            and np.ndim(value[0]) == 1)


def item_list(name: str, value: object) -> list:
    """A modality's value as its list of items (one item, a list of items, or None for none)."""
    if value is None:
        return []
    if is_single_item(value):
        return [value]
    values = as_list(value)
    if values is None:
        raise InputError(f"{_where(name, 0)}: expected an item or a list of items, got {type(value).__name__}")
    return values


def coerce_items(specs: Mapping[str, ModalitySpec], embeddings: Mapping[str, object] | None) -> dict[str, list[Item]]:
    """Validate ``{modality: item or [items]}`` against the checkpoint's modalities."""
    if embeddings is None:
        return {}
    if not isinstance(embeddings, Mapping):
        raise InputError(f"multimodal_embeddings: expected a mapping of modality name to items, got {type(embeddings).__name__}")
    out: dict[str, list[Item]] = {}
    for name, value in embeddings.items():
        if not isinstance(name, str) or name not in specs:
            raise InputError(f"{_where(str(name), 0)}: unknown modality, this checkpoint has {sorted(specs)}")
        spec = specs[name]
        values = item_list(name, value)
        if len(values) > spec.max_items:
            raise InputError(f"{_where(name, spec.max_items)}: too many items, expected at most "
                             f"{spec.max_items}, got {len(values)}")
        out[name] = [coerce_item(spec, i, v) for i, v in enumerate(values)]
        kinds = {isinstance(it, RawItem) for it in out[name]}
        if len(kinds) > 1:
            # vLLM batches one modality's items of one request as one set of fields
            first = next(i for i, it in enumerate(out[name]) if isinstance(it, RawItem) != isinstance(out[name][0], RawItem))
            raise InputError(f"{_where(name, first)}: items of one prompt must all be raw media or all be vectors, "
                             f"item 0 is {'raw media' if isinstance(out[name][0], RawItem) else 'a vector'} and "
                             f"this one is not; send them in separate prompts, or encode the media first")
    return out


# -- text ---------------------------------------------------------------------------------------------
# User text may contain the strings of the tokenizer's special tokens ("<|im_start|>", "</s>"). Unless
# the caller allows it, those must not become the special tokens (no role injection through a user
# message): ``user_text`` wraps each such string in two lone surrogates, which valid user text never
# holds (``check_text`` refuses them), and ``tokenize`` gives a wrapped string its plain-text tokens.
# Placeholders are the exception: they are how items are placed. Chat templates render around the
# wrapped strings, so the template's own special tokens stay special.
LITERAL_OPEN, LITERAL_CLOSE = "\ud800", "\udfff"
_LITERAL = re.compile(f"{LITERAL_OPEN}(.*?){LITERAL_CLOSE}", re.S)


def check_text(where: str, value: object) -> str:
    """A ``str`` that is valid Unicode text (encodes to UTF-8: no lone surrogates)."""
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {type(value).__name__}", where.split("[")[0].split(".")[0])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (a lone surrogate \\u{ord(value[e.start]):04x} at character "
                         f"{e.start})", where.split("[")[0].split(".")[0]) from None
    return value


def special_strings(tokenizer, specs: Mapping[str, ModalitySpec]) -> tuple[str, ...]:
    """The tokenizer's special-token strings, placeholders excluded (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_mmfuse_specials", None)
    if cached is None:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        found = {t.content for t in decoder.values() if getattr(t, "special", False)}
        found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        found -= {s.placeholder for s in specs.values()}
        cached = tuple(sorted((s for s in found if s), key=len, reverse=True))
        try:
            tokenizer._mmfuse_specials = cached
        except AttributeError:
            pass
    return cached


def user_text(where: str, text: object, tokenizer, specs: Mapping[str, ModalitySpec],
              allow_special_tokens: bool = False) -> str:
    """Check user-supplied text and, unless ``allow_special_tokens``, mark its special-token strings
    so that ``tokenize`` reads them as plain text."""
    text = check_text(where, text)
    if allow_special_tokens:
        return text
    specials = [s for s in special_strings(tokenizer, specs) if s in text]
    if not specials:
        return text
    pattern = re.compile("|".join(map(re.escape, specials)))
    return pattern.sub(lambda m: f"{LITERAL_OPEN}{m.group(0)}{LITERAL_CLOSE}", text)


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; strings marked by ``user_text`` become plain-text tokens, not special ones."""
    if LITERAL_OPEN not in text:
        return list(tokenizer(text)["input_ids"])
    ids = list(tokenizer("")["input_ids"])  # what the tokenizer adds by itself (a BOS)
    pos = 0
    for m in _LITERAL.finditer(text):
        if m.start() > pos:
            ids += tokenizer(text[pos:m.start()], add_special_tokens=False)["input_ids"]
        ids += tokenizer(m.group(1), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        pos = m.end()
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    return ids


def rows_of(spec: ModalitySpec, item: Item) -> int:
    """Soft tokens an item becomes: one block of ``tokens_per_item`` rows per vector, except that a
    resampler turns any (n, d) item into exactly ``tokens_per_item`` rows."""
    n = item.rows if isinstance(item, RawItem) else item.shape[0]
    return spec.tokens_per_item if spec.resamples else n * spec.tokens_per_item


@dataclass
class PreparedPrompt:
    """Prompt text and its validated items, per modality in placeholder order (not yet tokenized)."""

    text: str
    items: dict[str, list[Item]]


@dataclass
class EncodedPrompt:
    """A prompt as token ids, once: what every backend submits.

    ``token_ids`` hold one placeholder id per item (what vLLM's processor takes and
    expands itself); ``expanded_ids`` repeat each one per soft row of its item (what
    the transformers backend feeds the LM). ``len(expanded_ids)`` is the prompt's length.
    """

    token_ids: list[int]
    expanded_ids: list[int]
    items: dict[str, list[Item]]
    lora: str | None = None  # the LoRA adapter that runs it (mmfuse.lora); None = the checkpoint's own LM

    @property
    def num_tokens(self) -> int:
        return len(self.expanded_ids)


def check_placeholder_counts(found: Mapping[str, int], given: Mapping[str, int],
                             specs: Mapping[str, ModalitySpec]) -> None:
    """Placeholders found in a prompt's token ids must match the items given, per modality."""
    for name, spec in specs.items():
        n_given, n_found = given.get(name, 0), found.get(name, 0)
        if n_given > n_found:
            raise InputError(f"{_where(name, n_found)}: no placeholder {spec.placeholder} for this item "
                             f"(expected {n_given} placeholders for {n_given} items, the prompt has {n_found})")
        if n_found > n_given:
            raise InputError(f"{_where(name, n_given)}: placeholder {spec.placeholder} #{n_given} has no item "
                             f"(expected {n_found} items for {n_found} placeholders, got {n_given})")


def place_placeholder_ids(ids: Sequence[int], given: Mapping[str, int], specs: Mapping[str, ModalitySpec],
                          placeholder_ids: Mapping[str, int], bos_id: int | None = None) -> list[int]:
    """The placeholder rule, on token ids (both backends and vLLM's processor use this one).

    With no placeholder at all, the items go first (after a leading BOS), modalities in the
    order given; otherwise the placeholders of each modality must match its items one to one.
    """
    ids = list(ids)
    found = {n: ids.count(pid) for n, pid in placeholder_ids.items()}
    if any(found.values()) or not any(given.values()):
        check_placeholder_counts(found, given, specs)
        return ids
    start = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    return ids[:start] + [placeholder_ids[n] for n, c in given.items() for _ in range(c)] + ids[start:]


def prepare(text: str, embeddings: Mapping[str, object] | None, specs: Mapping[str, ModalitySpec]) -> PreparedPrompt:
    """Validate one request's text type and items (placeholders are checked once tokenized)."""
    if not isinstance(text, str):
        raise InputError(f"text: expected a string, got {type(text).__name__}")
    return PreparedPrompt(text=text, items=coerce_items(specs, embeddings))


def encode_token_ids(ids: Sequence[int], items: Mapping[str, list[Item]], specs: Mapping[str, ModalitySpec],
                     placeholder_ids: Mapping[str, int], max_len: int, bos_id: int | None = None) -> EncodedPrompt:
    """Apply the placeholder rule, expand each placeholder to its item's soft rows, check the length."""
    items = {n: list(v) for n, v in items.items() if v}
    ids = place_placeholder_ids(ids, {n: len(v) for n, v in items.items()}, specs, placeholder_ids, bos_id)
    if not ids:
        raise InputError("text: the prompt is empty (no text and no items); give some text or an item")
    by_id = {placeholder_ids[n]: n for n in specs}
    seen = {n: 0 for n in specs}
    expanded: list[int] = []
    for tok in ids:
        name = by_id.get(tok)
        if name is None:
            expanded.append(tok)
            continue
        expanded.extend([tok] * rows_of(specs[name], items[name][seen[name]]))
        seen[name] += 1
    if len(expanded) > max_len:
        rows = {n: sum(rows_of(specs[n], t) for t in v) for n, v in items.items()}
        raise InputError(f"prompt too long: {len(expanded)} tokens after expanding items into soft tokens "
                         f"(rows by modality {rows}), the model takes at most {max_len}")
    return EncodedPrompt(token_ids=ids, expanded_ids=expanded, items=items)
