"""The training data format: parquet rows of prompt, response and per-modality items.

Columns (one file, or a directory of ``*.parquet`` read in sorted order):

- ``prompt``: str, with or without placeholders (the rules of ``mmfuse.inputs.prepare``;
  without any placeholder the items go before the text, modalities in checkpoint order);
- ``response``: str, the target text (EOS is appended);
- ``mm_NAME`` for each modality NAME: ``list<list<list<float>>>``, the row's items, each
  ``(n_i, input_dim)``. A missing column, null or ``[]`` means no items.

Rows are numbered from 0 across files in sorted order; every error names that number.
A ``messages`` (chat) column is not supported in this version.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .encode import MM_PREFIX, DataError, RowEncoder

ROW_KEYS = ("prompt", "response", "items")


def data_files(path: str | os.PathLike) -> list[str]:
    """The parquet files of a dataset path (a file, or a directory's ``*.parquet`` sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        if not files:
            raise DataError(f"{p}: directory has no *.parquet files")
        return files
    if p.is_file():
        return [str(p)]
    raise DataError(f"{p}: no such parquet file or directory")


def open_dataset(path: str | os.PathLike, streaming: bool = False):
    """A ``datasets`` Dataset (memory-mapped) or, with ``streaming``, an IterableDataset."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=data_files(path), split="train", streaming=streaming)


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


def _list_column(rows: list[list], name: str):
    """list<list<list<float32>>> from per-row lists of items, built from flat buffers (no per-float objects)."""
    import pyarrow as pa

    row_off, item_off, vec_off, values = [0], [0], [0], []
    for r, items in enumerate(rows):
        for i, item in enumerate(items):
            arr = np.asarray(item, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[None, :]
            if arr.ndim != 2:
                raise DataError(f"row {r}: modality {name!r} item {i}: expected shape (n, dim) or (dim,), "
                                f"got {arr.shape}")
            values.append(arr.reshape(-1))
            vec_off.extend(vec_off[-1] + arr.shape[1] * np.arange(1, arr.shape[0] + 1))
            item_off.append(item_off[-1] + arr.shape[0])
        row_off.append(row_off[-1] + len(items))
    flat = pa.array(np.concatenate(values) if values else np.zeros(0, np.float32), type=pa.float32())
    vecs = pa.ListArray.from_arrays(pa.array(vec_off, pa.int32()), flat)
    its = pa.ListArray.from_arrays(pa.array(item_off, pa.int32()), vecs)
    return pa.ListArray.from_arrays(pa.array(row_off, pa.int32()), its)


def _table(rows: list[Mapping]):
    import pyarrow as pa

    names: list[str] = []
    for r, row in enumerate(rows):
        if not isinstance(row, Mapping) or set(row) - set(ROW_KEYS) or "prompt" not in row or "response" not in row:
            raise DataError(f"row {r}: expected a dict with 'prompt', 'response' and optional 'items' "
                            f"{{name: [arrays]}}, got {list(row) if isinstance(row, Mapping) else type(row).__name__}")
        names += [n for n in (row.get("items") or {}) if n not in names]
    columns = {"prompt": pa.array([r["prompt"] for r in rows], pa.string()),
               "response": pa.array([r["response"] for r in rows], pa.string())}
    for name in names:
        columns[MM_PREFIX + name] = _list_column([list((r.get("items") or {}).get(name) or []) for r in rows], name)
    return pa.table(columns)


def write_parquet(rows: Iterable[Mapping], path: str | os.PathLike, rows_per_file: int | None = None) -> list[Path]:
    """Write rows ``{"prompt": str, "response": str, "items": {name: [array (n, dim) or (dim,)]}}`` as parquet.

    One file at ``path``, or with ``rows_per_file`` a directory ``path`` of
    ``part-00000.parquet``, ... Items are stored as float32. Returns the files written.
    Rows are not validated against a checkpoint here (use ``check_dataset``), so
    deliberately bad data can be written too.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    chunks: list[list[Mapping]] = [[]]
    for row in rows:
        if rows_per_file and len(chunks[-1]) == rows_per_file:
            chunks.append([])
        chunks[-1].append(row)
    if rows_per_file:
        path.mkdir(parents=True, exist_ok=True)
        targets = [path / f"part-{i:05d}.parquet" for i in range(len(chunks))]
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        targets = [path]
    offset = 0
    for chunk, target in zip(chunks, targets):
        try:
            table = _table(chunk)
        except DataError as e:  # renumber "row r" from the chunk to the whole input
            raise DataError(_renumber(str(e), offset)) from None
        pq.write_table(table, target)
        offset += len(chunk)
    return targets


def _renumber(message: str, offset: int) -> str:
    head, _, rest = message.partition(":")
    return f"row {int(head.split()[1]) + offset}:{rest}" if head.startswith("row ") else message


def check_dataset(ckpt: str | os.PathLike, data: str | os.PathLike, max_errors: int = 10,
                  streaming: bool = False) -> list[str]:
    """Run every row through the same encoding as training; return up to ``max_errors`` messages.

    An empty list means every row is valid for ``ckpt`` (items, placeholders, token length).
    Needs the checkpoint's tokenizer and config only, not its weights.
    """
    encoder = RowEncoder.from_checkpoint(ckpt)
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
