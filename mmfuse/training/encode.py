"""One dataset row -> token ids, labels and items; rows -> a padded (or packed) batch.

The prompt goes through exactly the inference path (``inputs.prepare`` then
``Checkpoint.encode``, as every backend does), so what the model
learns is what it later sees. The response is tokenized on its own, followed by
EOS; only response tokens carry labels (prompt and padding are -100). A
``messages`` row (chat) goes through the pipeline's chat rendering instead
(``chat_rows``).

Length rule (``max_length``, default the LM's own length; items count as their
soft tokens): a longer row is refused (``DataError`` naming the row), dropped
(``OverLength``, counted by ``plan``), or truncated: cut to its first
``max_length`` tokens, only when the cut falls after the last soft token of every
item and keeps at least one target token; otherwise refused. A cut never lands
inside an item.

Packing: the rows of one micro-batch are laid end to end in as few rows of at most
``max_length`` tokens as first-fit allows, each sample's position ids restarting at
0. transformers reads restarting positions (with no 2D attention mask) as packed
sequences and masks attention block-diagonally, on every attention backend, so a
packed batch computes the same per-token loss as the padded one, with less padding.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..inputs import EncodedPrompt, InputError, Item, prepare
from .config import LOSS_ON, OVERLENGTH, TrainConfigError

IGNORE = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)
MM_PREFIX = "mm_"  # column mm_NAME holds the items of modality NAME
UNBOUNDED = 1 << 62  # Checkpoint.encode's max_len when the length rule (RowEncoder._fit) decides instead


class DataError(ValueError):
    """A dataset or one of its rows breaks the format; the message names the row and the field."""


class OverLength(DataError):
    """A row over ``max_length`` with ``overlength="drop"``: ``plan`` counts it instead of stopping."""


@dataclass
class Example:
    """One encoded row. ``row`` is its index in the dataset (files in sorted order, from 0)."""

    row: int
    input_ids: list[int]  # prompt (placeholders expanded) + response + EOS; a chat row: the whole conversation
    labels: list[int]  # IGNORE over the prompt, the token ids over response + EOS (chat: assistant turns)
    prompt: EncodedPrompt  # what a backend generates from (chat: the conversation before its last answer)
    response: str  # the target text (chat: the last assistant message)

    @property
    def prompt_len(self) -> int:
        return sum(1 for x in self.labels if x == IGNORE)


@dataclass
class Batch:
    """Right-padded tensors for one forward pass (causal attention never looks at the padding).

    Packed (``position_ids`` set): each row holds several samples, positions restarting at 0 for each."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], 1 on real tokens
    labels: torch.Tensor  # [B, S], IGNORE on prompt and padding (and on each packed sample's first token)
    items: dict[str, list[Item]]  # per modality, items in batch-major prompt order (as merge_rows expects)
    position_ids: torch.Tensor | None = None  # [B, S] when packed

    @property
    def num_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def lm_kwargs(self, device) -> dict[str, object]:
        """The LM's masking arguments for a teacher-forced pass. Packed: position ids only, since
        transformers derives the block-diagonal causal mask from them when there is neither a 2D mask nor
        a KV cache (``masking_utils.find_packed_sequence_indices``); no cache either way (nothing decodes)."""
        if self.position_ids is not None:
            return {"position_ids": self.position_ids.to(device), "use_cache": False}
        return {"attention_mask": self.attention_mask.to(device), "use_cache": False}


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
    """Encodes rows for one checkpoint: its tokenizer, modalities, placeholder ids and the length rule.

    ``max_length``: most tokens in a row (None: the LM's ``max_position_embeddings``); ``overlength``: what a
    longer row gets (module docstring); ``loss_on``: chat rows' labelled turns (``chat_rows``); ``packing``:
    how ``collate`` lays rows out by default."""

    def __init__(self, checkpoint: Checkpoint, max_length: int | None = None, overlength: str = "refuse",
                 loss_on: str = "assistant", packing: bool = False):
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.specs = checkpoint.specs
        self.placeholder_ids = checkpoint.placeholder_ids
        self.max_len = checkpoint.max_len
        if max_length is not None and max_length > checkpoint.max_len:
            raise TrainConfigError(f"max_length: {max_length} is over the model's length {checkpoint.max_len}")
        if overlength not in OVERLENGTH or loss_on not in LOSS_ON:
            raise TrainConfigError(f"overlength / loss_on: expected one of {OVERLENGTH} / {LOSS_ON}, got "
                                   f"{overlength!r} / {loss_on!r}")
        self.limit = max_length or checkpoint.max_len
        self.overlength, self.loss_on, self.packing = overlength, loss_on, packing
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = checkpoint.pad_token_id

    @classmethod
    def from_model(cls, model, config=None) -> "RowEncoder":
        """From a loaded ``MMFuseModel`` (training, hf eval); ``config``: a ``TrainConfig`` whose data
        layout options (max_length, overlength, loss_on, packing) apply."""
        if config is None:
            return cls(model.checkpoint)
        return cls(model.checkpoint, config.max_length, config.overlength, config.loss_on, config.packing)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, max_length: int | None = None,
                        overlength: str = "refuse") -> "RowEncoder":
        """From tokenizer and config only: checking a dataset needs no LM weights."""
        return cls(open_checkpoint(path), max_length, overlength)

    def check_columns(self, columns: list[str]) -> None:
        """Dataset-level checks: ``messages`` or ``prompt`` + ``response``, every mm_ column a known modality."""
        if "messages" in columns:
            both = [c for c in ("prompt", "response") if c in columns]
            if both:
                raise DataError(f"columns 'messages' and {both}: give a chat column 'messages' or plain columns "
                                f"'prompt' and 'response', not both")
        else:
            for required in ("prompt", "response"):
                if required not in columns:
                    raise DataError(f"column {required!r} is missing (columns: {sorted(columns)})")
        for col in columns:
            if col.startswith(MM_PREFIX) and col[len(MM_PREFIX):] not in self.specs:
                raise DataError(f"column {col!r}: unknown modality {col[len(MM_PREFIX):]!r}, this checkpoint has "
                                f"{sorted(self.specs)} (columns are mm_NAME)")

    def encode(self, row: Mapping, index: int) -> Example:
        """Validate and tokenize one row and apply the length rule; any problem raises
        ``DataError('row INDEX: ...')`` (``OverLength`` for a row to drop)."""
        try:
            if "messages" in row:
                from .chat_rows import encode_chat
                example = encode_chat(self, row, index)
            else:
                example = self._encode(row, index)
            return self._fit(example)
        except OverLength as e:
            raise OverLength(f"row {index}: {e}") from None
        except InputError as e:
            raise DataError(f"row {index}: {e}") from None

    def items_of(self, row: Mapping) -> dict[str, object]:
        """The row's mm_NAME items (a missing column, null or [] all mean none), in checkpoint order."""
        return {n: _stored_media(row[MM_PREFIX + n]) for n in self.specs
                if row.get(MM_PREFIX + n) is not None and len(row[MM_PREFIX + n]) > 0}

    def _fit(self, example: Example) -> Example:
        """The length rule (module docstring): the example as it is, cut, or an error."""
        total = len(example.input_ids)
        if total <= self.limit:
            return example
        limit = f"max_length {self.limit}" if self.limit < self.max_len else f"the model's length {self.limit}"
        prompt = example.prompt.num_tokens
        what = (f"prompt too long: {prompt} tokens after expanding items into soft tokens" if prompt > self.limit
                else f"prompt + response too long: {total} tokens ({prompt} prompt after expanding items, "
                     f"{total - prompt} response)")
        if self.overlength == "drop":
            raise OverLength(f"{what}, over {limit} (overlength=drop leaves such rows out of training)")
        if self.overlength == "truncate":
            soft = set(self.placeholder_ids.values())
            last_item = max((i for i, t in enumerate(example.input_ids) if t in soft), default=-1)
            targets = sum(1 for x in example.labels[1:self.limit] if x != IGNORE)
            if last_item < self.limit and targets:
                example.input_ids, example.labels = example.input_ids[:self.limit], example.labels[:self.limit]
                return example
            why = "inside an item's soft tokens" if last_item >= self.limit else "before the first target token"
            raise InputError(f"{what}, over {limit}; truncating would cut {why} (a cut must fall after the last "
                             f"item and keep a target)")
        raise InputError(f"{what}, over {limit} (overlength=drop skips such rows, truncate cuts their end)")

    def _encode(self, row: Mapping, index: int) -> Example:
        prompt, response = row.get("prompt"), row.get("response")
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise InputError(f"column {key!r}: expected a string, got {type(value).__name__}")
        # the length is checked by _fit, on prompt and response together (so overlength=drop sees it)
        encoded = self.checkpoint.encode(prepare(prompt, self.items_of(row), self.specs), max_len=UNBOUNDED)
        prompt_ids = encoded.expanded_ids
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]
        bad = [n for n, pid in self.placeholder_ids.items() if pid in response_ids]
        if bad:
            raise InputError(f"column 'response': contains the placeholder {self.specs[bad[0]].placeholder} "
                             f"(items belong in the prompt)")
        return Example(row=index, input_ids=prompt_ids + response_ids,
                       labels=[IGNORE] * len(prompt_ids) + response_ids, prompt=encoded, response=response)

    def collate(self, examples: list[Example], packing: bool | None = None) -> Batch:
        """One batch: a row per example, right-padded; with ``packing`` (None: the encoder's own setting),
        rows of several examples each (first fit, in order, at most ``max_length`` tokens a row)."""
        packing = self.packing if packing is None else packing
        groups = pack([len(e.input_ids) for e in examples], self.limit) if packing else [[i] for i in
                                                                                          range(len(examples))]
        rows = [[examples[i] for i in g] for g in groups]
        width = max(sum(len(e.input_ids) for e in row) for row in rows)
        ids, mask, labels, positions = [], [], [], []
        for row in rows:
            r_ids, r_labels, r_pos = [], [], []
            for e in row:
                r_ids += e.input_ids
                # a sample's first token is predicted from the previous sample's last: never a target
                r_labels += [IGNORE] + e.labels[1:]
                r_pos += list(range(len(e.input_ids)))
            pad = width - len(r_ids)
            ids.append(r_ids + [self.pad_id] * pad)
            mask.append([1] * len(r_ids) + [0] * pad)
            labels.append(r_labels + [IGNORE] * pad)
            positions.append(r_pos + list(range(pad)))  # the padding: one more block of its own
        # items in the order their placeholders now appear (row-major over the packed rows)
        items = {n: [it for row in rows for e in row for it in e.prompt.items.get(n, [])] for n in self.specs}
        return Batch(torch.tensor(ids), torch.tensor(mask), torch.tensor(labels),
                     {n: v for n, v in items.items() if v}, torch.tensor(positions) if packing else None)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit packing of sample lengths into bins of ``capacity`` tokens, in order (deterministic):
    each sample goes to the first bin with room, else a new one. Returns the sample indices per bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        b = next((j for j, r in enumerate(room) if r >= n), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    return bins
