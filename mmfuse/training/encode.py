"""One dataset row -> token ids, labels and items; rows -> a padded batch.

The prompt goes through exactly the inference path (``inputs.prepare`` then
``Checkpoint.encode``, as every backend does), so what the model
learns is what it later sees. The response is tokenized on its own, followed by
EOS; only response tokens carry labels (prompt and padding are -100).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..inputs import EncodedPrompt, InputError, Item, prepare

IGNORE = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)
MM_PREFIX = "mm_"  # column mm_NAME holds the items of modality NAME


class DataError(ValueError):
    """A dataset or one of its rows breaks the format; the message names the row and the field."""


@dataclass
class Example:
    """One encoded row. ``row`` is its index in the dataset (files in sorted order, from 0)."""

    row: int
    input_ids: list[int]  # prompt (placeholders expanded) + response + EOS
    labels: list[int]  # IGNORE over the prompt, the token ids over response + EOS
    prompt: EncodedPrompt  # what a backend generates from
    response: str

    @property
    def prompt_len(self) -> int:
        return sum(1 for x in self.labels if x == IGNORE)


@dataclass
class Batch:
    """Right-padded tensors for one forward pass (causal attention never looks at the padding)."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], IGNORE on prompt and padding
    items: dict[str, list[Item]]  # per modality, items in batch-major prompt order (as merge_rows expects)

    @property
    def num_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def _stored_media(value: object) -> object:
    """Items as ``datasets`` stores its Image / Audio features (``{"bytes": ..., "path": ...}``, read
    undecoded by ``open_dataset``) -> the bytes, or the path when there are none; a list item by item
    (a column of one such item per row also works); anything else unchanged."""
    if isinstance(value, list):
        return [_stored_media(v) if isinstance(v, Mapping) else v for v in value]
    if isinstance(value, Mapping) and set(value) == {"bytes", "path"}:
        return value["bytes"] if value["bytes"] is not None else value["path"]
    return value


class RowEncoder:
    """Encodes rows for one checkpoint: its tokenizer, modalities, placeholder ids and length limit."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.specs = checkpoint.specs
        self.placeholder_ids = checkpoint.placeholder_ids
        self.max_len = checkpoint.max_len
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = checkpoint.pad_token_id

    @classmethod
    def from_model(cls, model) -> "RowEncoder":
        """From a loaded ``MMFuseModel`` (training, hf eval)."""
        return cls(model.checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "RowEncoder":
        """From tokenizer and config only: checking a dataset needs no LM weights."""
        return cls(open_checkpoint(path))

    def check_columns(self, columns: list[str]) -> None:
        """Dataset-level checks: required columns present, every mm_ column a known modality."""
        if "messages" in columns:
            raise DataError("column 'messages' is not supported in this version; use 'prompt' and 'response' "
                            "(render chat prompts to text first)")
        for required in ("prompt", "response"):
            if required not in columns:
                raise DataError(f"column {required!r} is missing (columns: {sorted(columns)})")
        for col in columns:
            if col.startswith(MM_PREFIX) and col[len(MM_PREFIX):] not in self.specs:
                raise DataError(f"column {col!r}: unknown modality {col[len(MM_PREFIX):]!r}, this checkpoint has "
                                f"{sorted(self.specs)} (columns are mm_NAME)")

    def encode(self, row: Mapping, index: int) -> Example:
        """Validate and tokenize one row; any problem raises ``DataError('row INDEX: ...')``."""
        try:
            return self._encode(row, index)
        except InputError as e:
            raise DataError(f"row {index}: {e}") from None

    def _encode(self, row: Mapping, index: int) -> Example:
        prompt, response = row.get("prompt"), row.get("response")
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise InputError(f"column {key!r}: expected a string, got {type(value).__name__}")
        # a missing column, null or [] all mean "no items"; modalities keep the checkpoint's order
        embeddings = {n: _stored_media(row[MM_PREFIX + n]) for n in self.specs
                      if row.get(MM_PREFIX + n) is not None and len(row[MM_PREFIX + n]) > 0}
        encoded = self.checkpoint.encode(prepare(prompt, embeddings, self.specs))
        prompt_ids = encoded.expanded_ids
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]
        bad = [n for n, pid in self.placeholder_ids.items() if pid in response_ids]
        if bad:
            raise InputError(f"column 'response': contains the placeholder {self.specs[bad[0]].placeholder} "
                             f"(items belong in the prompt)")
        total = len(prompt_ids) + len(response_ids)
        if total > self.max_len:
            raise InputError(f"prompt + response too long: {total} tokens ({len(prompt_ids)} prompt after "
                             f"expanding items, {len(response_ids)} response + EOS), the model takes at most "
                             f"{self.max_len}")
        return Example(row=index, input_ids=prompt_ids + response_ids,
                       labels=[IGNORE] * len(prompt_ids) + response_ids, prompt=encoded, response=response)

    def collate(self, examples: list[Example]) -> Batch:
        width = max(len(e.input_ids) for e in examples)
        ids, mask, labels = [], [], []
        for e in examples:
            pad = width - len(e.input_ids)
            ids.append(e.input_ids + [self.pad_id] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
            labels.append(e.labels + [IGNORE] * pad)
        items = {n: [it for e in examples for it in e.prompt.items.get(n, [])] for n in self.specs}
        return Batch(torch.tensor(ids), torch.tensor(mask), torch.tensor(labels),
                     {n: v for n, v in items.items() if v})
