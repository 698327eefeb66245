"""The training data format: parquet rows of prompt, response and per-modality items.

Columns (one file, or a directory of ``*.parquet`` read in sorted order):

- ``prompt``: str, with or without placeholders (the rules of ``mmfuse.inputs.prepare``;
  without any placeholder the items go before the text, modalities in checkpoint order);
- ``response``: str, the target text (EOS is appended);
- ``mm_NAME`` for each modality NAME: ``list<list<list<float>>>``, the row's items, each
  ``(n_i, input_dim)`` (``list<list<float>>``: one vector per item). A missing column, null or ``[]``
  means no items. A modality with an encoder may hold raw media instead, as the inference API
  takes them: image bytes or file paths, 16 kHz waveforms (1-D) or audio bytes, strings; and
  ``datasets``' ``Image`` / ``Audio`` columns, read undecoded (``{"bytes", "path"}``).

Or, for chat data, instead of prompt and response:

- ``messages``: an OpenAI-style conversation ending with the assistant's answer, as JSON text (or
  native structs); content parts ``text``, ``input_embedding`` and raw media (``chat_rows``).

Rows are numbered from 0 across files in sorted order; every error names that number.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .encode import MM_PREFIX, DataError, RowEncoder

ROW_KEYS = ("prompt", "response", "items")
CHAT_KEYS = ("messages", "items")
# in the output directory of `mmfuse data encode` (training.precompute); a leading "_" hides it from readers
# of a parquet directory (pyarrow, pandas, Spark), as the shards' temporary files are
ENCODE_MANIFEST = "_encode.json"


def data_files(path: str | os.PathLike) -> list[str]:
    """The parquet files of a dataset path (a file, or a directory's ``*.parquet`` sorted by name).

    A directory that ``mmfuse data encode`` has not finished writing is refused (it lacks rows)."""
    p = Path(path)
    if p.is_dir():
        _check_finished(p)
        files = sorted(str(f) for f in p.glob("*.parquet"))
        if not files:
            raise DataError(f"{p}: directory has no *.parquet files")
        return files
    if p.is_file():
        return [str(p)]
    raise DataError(f"{p}: no such parquet file or directory")


def _check_finished(directory: Path) -> None:
    import json

    try:
        manifest = json.loads((directory / ENCODE_MANIFEST).read_text())
    except (OSError, ValueError):
        return
    if isinstance(manifest, dict) and manifest.get("complete") is False:
        done = len(list(directory.glob("part-*.parquet")))
        raise DataError(f"{directory}: an unfinished `mmfuse data encode` output ({done} of "
                        f"{manifest.get('shards', '?')} shards written); rerun that command to finish it")


def open_dataset(path: str | os.PathLike, streaming: bool = False):
    """A ``datasets`` Dataset (memory-mapped) or, with ``streaming``, an IterableDataset.

    Columns that ``datasets`` would decode itself (its ``Image`` / ``Audio`` features, e.g. from
    ``Dataset.to_parquet``) are read undecoded, as ``{"bytes", "path"}``: mmfuse decodes the media
    (``mmfuse.media``, errors naming the row), and audio needs no torchcodec.
    """
    from datasets import load_dataset

    files = data_files(path)
    return load_dataset("parquet", data_files=files, split="train", streaming=streaming,
                        features=_undecoded_features(files[0]))


def read_schema(file: str):
    """A parquet file's arrow schema (its footer only)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(file)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet vary by version
        raise DataError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _undecoded_features(file: str):
    """The file's ``datasets`` features with media decoding turned off; None when nothing would decode."""
    from datasets import Features

    schema = read_schema(file)
    if not (schema.metadata or {}).get(b"huggingface"):
        return None
    features = Features.from_arrow_schema(schema)
    undecoded = Features({k: _no_decode(v) for k, v in features.items()})
    return undecoded if undecoded != features else None


def _no_decode(feature):
    if isinstance(feature, dict):
        return {k: _no_decode(v) for k, v in feature.items()}
    if isinstance(feature, list):  # the old [feature] form of a list
        return [_no_decode(feature[0])]
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List, LargeList, Sequence
        return dataclasses.replace(feature, feature=_no_decode(feature.feature))
    if getattr(feature, "decode", False):  # Image, Audio, Video...
        return dataclasses.replace(feature, decode=False)
    return feature


def column_names(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # a stream without schema metadata: look at the first row
        names = list(next(iter(ds)).keys())
    return list(names)


def iter_rows(ds, start: int = 0) -> Iterator[tuple[int, dict]]:
    """(row index, row) in file order, from ``start``."""
    if hasattr(ds, "__len__"):
        for i in range(start, len(ds)):
            yield i, ds[i]
    else:
        for i, row in enumerate(ds.skip(start) if start else ds, start):
            yield i, row


# how an item is stored (write_parquet): the kinds of raw media an encoder modality takes, and numbers
STORED = {"binary": "bytes (an image or audio file; a PIL image is stored as PNG)", "string": "a string (text or "
          "a file path)", "numbers": "numbers (vectors, or a waveform)"}


def _kind(item: object) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)) or type(item).__module__.startswith("PIL."):
        return "binary"
    if isinstance(item, (str, os.PathLike)):
        return "string"
    return "numbers"


def _png(image) -> bytes:
    """A PIL image as PNG bytes: lossless, so training reads the same pixels as from the image itself."""
    import io

    buf = io.BytesIO()
    (image if image.mode in ("RGB", "RGBA", "L", "LA", "P") else image.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def _storage(rows: list[list], name: str) -> tuple[str, bool]:
    """How column mm_NAME is stored: (kind, flat). One kind per column (parquet types are per column);
    ``flat``: every item is 1-D numbers, stored 1-D (a vector, or an audio modality's waveform, as the
    inference API reads it); a column with any (n, dim) item stores 1-D items as (1, dim)."""
    first: dict[str, tuple[int, int]] = {}  # kind -> (row, item) where it first appears
    ranks: set[int] = set()
    for r, items in enumerate(rows):
        for i, item in enumerate(items):
            kind = _kind(item)
            first.setdefault(kind, (r, i))
            if len(first) > 1:
                other = next(k for k in first if k != kind)
                raise DataError(f"row {r}: modality {name!r} item {i}: {STORED[kind]} in a column that holds "
                                f"{STORED[other]} (row {first[other][0]} item {first[other][1]}); a parquet column "
                                f"holds one kind of item: give every row's items of a modality in one form, or "
                                f"encode the media to vectors first (`mmfuse data encode`)")
            if kind == "numbers":
                try:
                    ranks.add(np.ndim(item))
                except ValueError:  # ragged: vectors_column names it
                    ranks.add(-1)
    kind = next(iter(first), "numbers")
    return kind, kind == "numbers" and ranks == {1}


def vectors_column(rows: list[list | None], name: str, offset: int = 0, flat: bool = False):
    """``list<list<list<float32>>>`` from per-row lists of items (each ``(n, dim)`` or ``(dim,)``; a row of
    None is null), built from flat buffers (no per-float objects); with ``flat``, ``list<list<float32>>``
    of 1-D items. Errors name the row as ``offset`` + its position."""
    import pyarrow as pa

    want = 1 if flat else 2
    row_off, item_off, vec_off, values = [0], [0], [0], []
    for r, items in enumerate(rows):
        for i, item in enumerate(items or []):
            try:
                arr = np.asarray(item, dtype=np.float32)
            except (ValueError, TypeError) as e:
                raise DataError(f"row {offset + r}: modality {name!r} item {i}: expected numbers of shape "
                                f"(n, dim) or (dim,) ({e})") from None
            if arr.ndim == 1 and not flat:
                arr = arr[None, :]
            if arr.ndim != want:
                raise DataError(f"row {offset + r}: modality {name!r} item {i}: expected shape "
                                f"{'(n,)' if flat else '(n, dim) or (dim,)'}, got {arr.shape}")
            values.append(arr.reshape(-1))
            if not flat:
                vec_off.extend(vec_off[-1] + arr.shape[1] * np.arange(1, arr.shape[0] + 1))
            item_off.append(item_off[-1] + arr.shape[0])
        row_off.append(row_off[-1] + len(items or []))
    values = pa.array(np.concatenate(values) if values else np.zeros(0, np.float32), type=pa.float32())
    inner = values if flat else pa.ListArray.from_arrays(pa.array(vec_off, pa.int32()), values)
    its = pa.ListArray.from_arrays(pa.array(item_off, pa.int32()), inner)
    nulls = pa.array([items is None for items in rows]) if any(items is None for items in rows) else None
    return pa.ListArray.from_arrays(pa.array(row_off, pa.int32()), its, mask=nulls)


def _column(rows: list[list], name: str, offset: int, storage: tuple[str, bool]):
    import pyarrow as pa

    kind, flat = storage
    if kind == "binary":
        return pa.array([[_png(x) if type(x).__module__.startswith("PIL.") else bytes(x) for x in items]
                         for items in rows], pa.list_(pa.binary()))
    if kind == "string":
        return pa.array([[os.fspath(x) for x in items] for items in rows], pa.list_(pa.string()))
    return vectors_column(rows, name, offset, flat)


def _check_rows(rows: list[Mapping]) -> list[str]:
    """The modality names of rows given to write_parquet, in order of first use."""
    names: list[str] = []
    chat = bool(rows) and isinstance(rows[0], Mapping) and "messages" in rows[0]
    for r, row in enumerate(rows):
        if chat:
            if not isinstance(row, Mapping) or set(row) - set(CHAT_KEYS) or "messages" not in row:
                raise DataError(f"row {r}: expected a dict with 'messages' and optional 'items' (row 0 is a chat "
                                f"row), got {list(row) if isinstance(row, Mapping) else type(row).__name__}")
        elif not isinstance(row, Mapping) or set(row) - set(ROW_KEYS) or "prompt" not in row or "response" not in row:
            raise DataError(f"row {r}: expected a dict with 'prompt', 'response' and optional 'items' "
                            f"{{name: [arrays]}}, got {list(row) if isinstance(row, Mapping) else type(row).__name__}")
        names += [n for n in (row.get("items") or {}) if n not in names]
    return names


def _items(rows: list[Mapping], name: str) -> list[list]:
    """Each row's items of modality ``name`` (one raw medium not in a list is one item, not its characters)."""
    values = [(r.get("items") or {}).get(name) for r in rows]
    return [[v] if v is not None and _kind(v) != "numbers" else list(v if v is not None else []) for v in values]


def write_parquet(rows: Iterable[Mapping], path: str | os.PathLike, rows_per_file: int | None = None) -> list[Path]:
    """Write rows ``{"prompt": str, "response": str, "items": {name: [item, ...]}}`` as parquet.

    Chat rows are ``{"messages": [...], "items"?: ...}`` (every row then): the conversation is stored as
    JSON text, its arrays in the wire format (``chat_rows.to_json``).

    An item is what the inference API takes: vectors (an array ``(n, dim)`` or ``(dim,)``, stored as
    float32) or, for a modality with an encoder, raw media: image bytes or a PIL image (stored as bytes,
    PIL images as PNG), a 1-D float waveform at 16 kHz, a string (text, or a file path). Each column
    holds one kind of item. One file at ``path``, or with ``rows_per_file`` a directory ``path`` of
    ``part-00000.parquet``, ... Returns the files written. Rows are not validated against a checkpoint
    here (use ``check_dataset``), so deliberately bad data can be written too.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    names = _check_rows(rows)
    storage = {name: _storage(_items(rows, name), name) for name in names}
    path = Path(path)
    size = rows_per_file or max(len(rows), 1)
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)] or [[]]
    if rows_per_file:
        path.mkdir(parents=True, exist_ok=True)
        targets = [path / f"part-{i:05d}.parquet" for i in range(len(chunks))]
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        targets = [path]
    offset = 0
    for chunk, target in zip(chunks, targets):
        if "messages" in chunk[0] if chunk else False:
            from .chat_rows import to_json
            columns = {"messages": pa.array([to_json(r["messages"]) for r in chunk], pa.string())}
        else:
            columns = {"prompt": pa.array([r.get("prompt") for r in chunk], pa.string()),
                       "response": pa.array([r.get("response") for r in chunk], pa.string())}
        for name in names:
            columns[MM_PREFIX + name] = _column(_items(chunk, name), name, offset, storage[name])
        pq.write_table(pa.table(columns), target)
        offset += len(chunk)
    return targets


def check_dataset(ckpt: str | os.PathLike, data: str | os.PathLike, max_errors: int = 10,
                  streaming: bool = False, max_length: int | None = None) -> list[str]:
    """Run every row through the same encoding as training; return up to ``max_errors`` messages.

    An empty list means every row is valid for ``ckpt`` (items, placeholders, chat structure, token
    length: at most ``max_length``, default the LM's). Needs the checkpoint's tokenizer and config only,
    not its weights.
    """
    encoder = RowEncoder.from_checkpoint(ckpt, max_length)
    try:
        ds = open_dataset(data, streaming=streaming)
        encoder.check_columns(column_names(ds))
    except DataError as e:
        return [str(e)]
    errors: list[str] = []
    for index, row in iter_rows(ds):
        try:
            encoder.encode(row, index)
        except DataError as e:
            errors.append(str(e))
            if len(errors) >= max_errors:
                break
    return errors
