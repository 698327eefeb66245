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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModalitySpec

Item = torch.Tensor  # float32 [n, input_dim], n >= 1


class InputError(ValueError):
    """A request's text or embeddings break the input rules; the message says which and how."""


def _where(name: str, index: int | None) -> str:
    return f"modality {name!r}" + ("" if index is None else f" item {index}")


def coerce_item(spec: ModalitySpec, index: int, item: object) -> Item:
    """Turn a tensor, numpy array or nested float list into a checked ``(n, input_dim)`` float32 tensor."""
    where = _where(spec.name, index)
    expected = f"shape ({spec.input_dim},) or (n, {spec.input_dim})"
    if isinstance(item, torch.Tensor):
        if item.is_complex() or item.dtype == torch.bool:
            raise InputError(f"{where}: expected a real float tensor with {expected}, got dtype {item.dtype}")
        t = item.detach().to(torch.float32)
    else:
        try:
            arr = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: expected numbers with {expected}, got {type(item).__name__} ({e})") from None
        t = torch.from_numpy(arr)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InputError(f"{where}: expected rank 1 or 2 with {expected}, got rank {t.dim()} shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{where}: empty item, expected {expected} with n >= 1, got shape {tuple(t.shape)}")
    if t.shape[1] != spec.input_dim:
        raise InputError(f"{where}: wrong last dimension, expected {spec.input_dim}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{where}: contains NaN or Inf values")
    return t


def is_single_item(value: object) -> bool:
    """A tensor/array is one item; a list is one item only if its first element is a number."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, Sequence) and len(value) > 0 and isinstance(value[0], (int, float, np.number))


def coerce_items(specs: Mapping[str, ModalitySpec], embeddings: Mapping[str, object] | None) -> dict[str, list[Item]]:
    """Validate ``{modality: item or [items]}`` against the checkpoint's modalities."""
    if embeddings is None:
        return {}
    if not isinstance(embeddings, Mapping):
        raise InputError(f"multimodal_embeddings: expected a mapping of modality name to items, got {type(embeddings).__name__}")
    out: dict[str, list[Item]] = {}
    for name, value in embeddings.items():
        if name not in specs:
            raise InputError(f"{_where(str(name), 0)}: unknown modality, this checkpoint has {sorted(specs)}")
        spec = specs[name]
        if value is None:
            value = []
        values = [value] if is_single_item(value) else value
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise InputError(f"{_where(name, 0)}: expected an item or a list of items, got {type(value).__name__}")
        if len(values) > spec.max_items:
            raise InputError(f"{_where(name, spec.max_items)}: too many items, expected at most "
                             f"{spec.max_items}, got {len(values)}")
        out[name] = [coerce_item(spec, i, v) for i, v in enumerate(values)]
    return out


def rows_of(spec: ModalitySpec, item: Item) -> int:
    """Soft tokens an item becomes: one block of ``tokens_per_item`` rows per vector."""
    return item.shape[0] * spec.tokens_per_item


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
