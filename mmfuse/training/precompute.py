"""``mmfuse data encode``: a dataset's raw media -> its checkpoint's encoder vectors, computed once.

Training on raw media (image bytes, waveforms, text in ``mm_NAME``) runs the frozen encoders on every
row of every epoch. ``encode_dataset`` runs them once and writes the same rows with each encoder
modality's column replaced by float32 vectors (``list<list<list<float32>>>``, one ``(rows, dim)`` item
per raw item: exactly what the encoder hands the projector), so training reads vectors instead and
gives the same loss.

- Batched: ``batch_size`` rows at a time, their raw items through each encoder in one call (the towers
  of ``mmfuse.encoders``, which the transformers backend runs too).
- Resumable: the output is shards ``OUT/part-NNNNN.parquet``, each a fixed slice of one input file
  (``rows_per_shard`` rows), written under a temporary name and renamed once complete, plus
  ``OUT/_encode.json`` naming the job (checkpoint, encoders, input files, shard size). Rerunning the same
  job skips the complete shards; any other non-empty OUT is refused unless ``overwrite``
  (``mmfuse.outdir``). Training refuses an OUT whose job is unfinished.
- Every row goes through training's checks (``RowEncoder``): a bad row stops the job with its
  ``row N: ...`` message. The shards already written stay: a rerun keeps them when the cause was
  outside the data files (an image path's file restored); an edited data file is another job.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .data import ENCODE_MANIFEST, data_files, read_schema, vectors_column
from .encode import MM_PREFIX, DataError, RowEncoder

MANIFEST_FORMAT = "mmfuse-data-encode/1"
_SHARD = re.compile(r"_?part-\d+\.parquet(\.tmp)?")


@dataclass
class EncodeResult:
    out: Path
    rows: int  # rows in the whole dataset
    shards: int  # shards in the whole job
    written: int  # shards encoded by this call
    skipped: int  # shards a previous call had completed


@dataclass(frozen=True)
class _Shard:
    index: int  # its number in the job (the file name)
    file: int  # the input file it slices
    start: int  # first row, within that file
    stop: int
    first_row: int  # the global number of its first row (files in sorted order, from 0)


def _owned(entry: Path) -> bool:
    """What ``encode_dataset`` writes in OUT (``--overwrite`` removes only these)."""
    return (entry.is_file() or entry.is_symlink()) and (
        entry.name in (ENCODE_MANIFEST, ENCODE_MANIFEST + ".tmp") or bool(_SHARD.fullmatch(entry.name)))


def _plan(files: list[str], rows_per_shard: int) -> tuple[list[_Shard], list[int]]:
    import pyarrow.parquet as pq

    shards, counts, first = [], [], 0
    for f, file in enumerate(files):
        n = pq.ParquetFile(file).metadata.num_rows
        counts.append(n)
        for start in range(0, n, rows_per_shard):
            shards.append(_Shard(len(shards), f, start, min(n, start + rows_per_shard), first + start))
        first += n
    return shards, counts


def _job(checkpoint, files: list[str], counts: list[int], rows_per_shard: int) -> dict:
    """What decides the output: a rerun with the same job resumes, any change starts over."""
    encoders = {n: s.encoder.to_dict() for n, s in checkpoint.specs.items() if s.encoder is not None}
    data = [{"file": str(Path(f).resolve()), "rows": n, "bytes": os.stat(f).st_size,
             "mtime_ns": os.stat(f).st_mtime_ns} for f, n in zip(files, counts)]
    return {"ckpt": str(Path(checkpoint.path).resolve()), "encoders": encoders, "data": data,
            "rows_per_shard": rows_per_shard}


def _read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / ENCODE_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _write_manifest(out: Path, job: dict, shards: int, complete: bool) -> None:
    tmp = out / (ENCODE_MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "job": job, "shards": shards, "complete": complete},
                              indent=1))
    os.replace(tmp, out / ENCODE_MANIFEST)


def shard_name(index: int, total: int) -> str:
    """``part-00042.parquet``: zero-padded so that name order is row order."""
    return f"part-{index:0{max(5, len(str(total - 1)))}d}.parquet"


def _claim(out: Path, job: dict, files: list[str], shards: list[_Shard], overwrite: bool) -> set[int]:
    """Check OUT before any encoder loads; returns the shards a previous run of this job completed."""
    from ..outdir import claim_output_dir, clear_entries

    if any(Path(f).resolve().parent == out.resolve() for f in files):
        raise ConfigError(f"out: {out} holds the input data; write the encoded dataset to another directory")
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest.get("job") == job and not overwrite:
        return {s.index for s in shards if (out / shard_name(s.index, len(shards))).is_file()}
    hint = ""
    if manifest is not None and isinstance(manifest.get("job"), dict):
        changed = [k for k in job if manifest["job"].get(k) != job[k]]
        hint = f": it holds another `mmfuse data encode` job (its {', '.join(changed)} differ)"
    clear_entries(claim_output_dir(out, overwrite, error=ConfigError, label="out: ", hint=hint, owned=_owned))
    return set()


def _slices(file: str, rows_per_shard: int) -> Iterator:
    """The file's rows as tables of ``rows_per_shard`` rows (the last one shorter), read in one pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    pending, count = [], 0
    for batch in pf.iter_batches(batch_size=rows_per_shard):
        pending.append(batch)
        count += batch.num_rows
        while count >= rows_per_shard:
            table = pa.Table.from_batches(pending, schema=pf.schema_arrow)
            yield table.slice(0, rows_per_shard)
            rest = table.slice(rows_per_shard)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending, schema=pf.schema_arrow)


def _encode_rows(encoder: RowEncoder, names: list[str], rows: list[dict], first_row: int, device) -> dict[str, list]:
    """One batch of rows -> {name: per row, its items as float32 (rows, dim) arrays (None for a null cell)}."""
    import torch

    from ..encoders import encode_items

    examples = [encoder.encode(row, first_row + j) for j, row in enumerate(rows)]
    out = {}
    for name in names:
        owners = [j for j, ex in enumerate(examples) for _ in ex.prompt.items.get(name, [])]
        items = [it for ex in examples for it in ex.prompt.items.get(name, [])]
        vectors = encode_items(encoder.specs[name], items, device, torch.float32) if items else []
        cells = [None if row.get(MM_PREFIX + name) is None else [] for row in rows]
        for j, v in zip(owners, vectors):
            cells[j].append(v.detach().to("cpu", torch.float32).numpy())
        out[name] = cells
    return out


def _with_vectors(table, columns: dict[str, list], first_row: int):
    """``table`` with each encoded column replaced by its vectors (and ``datasets``' feature metadata to match)."""
    import pyarrow as pa

    for name, cells in columns.items():
        col = MM_PREFIX + name
        array = vectors_column(cells, name, first_row)
        table = table.set_column(table.schema.get_field_index(col), pa.field(col, array.type), array)
    meta = dict(table.schema.metadata or {})
    if b"huggingface" in meta:  # a dataset written by `datasets`: its features must describe the new columns
        from datasets import Features

        info = json.loads(meta[b"huggingface"])
        features = info.get("info", {}).get("features")
        if isinstance(features, dict):
            new = Features.from_arrow_schema(pa.schema([table.schema.field(MM_PREFIX + n) for n in columns]))
            features.update(new.to_dict())
            meta[b"huggingface"] = json.dumps(info).encode()
            table = table.replace_schema_metadata(meta)
    return table


def encode_dataset(ckpt: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                   batch_size: int = 32, rows_per_shard: int = 1000, overwrite: bool = False,
                   device: str | None = None, progress: bool = True) -> EncodeResult:
    """Write ``data`` to ``out`` with every encoder modality's raw items replaced by its encoder's vectors.

    Columns of modalities without an encoder, items that are vectors already, and every other column
    pass through unchanged. ``out`` must be missing or empty, or hold this same job (then its complete
    shards are kept and the rest encoded); ``overwrite=True`` starts over. ``device``: where the encoders
    run (default: cuda when available, else cpu), in float32.
    """
    import pyarrow.parquet as pq
    import torch
    from tqdm.auto import tqdm

    from ..checkpoint import open_checkpoint

    for key, value in (("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: must be an int >= 1, got {value!r}")
    out = Path(out)
    checkpoint = open_checkpoint(ckpt)
    if not any(s.encoder is not None for s in checkpoint.specs.values()):
        raise ConfigError(f"{ckpt}: no modality has an encoder, so there is nothing to encode (modalities: "
                          f"{sorted(checkpoint.specs)}); `mmfuse init --encoder NAME=SOURCE` attaches one")
    encoder = RowEncoder(checkpoint)
    names = [n for n, s in checkpoint.specs.items() if s.encoder is not None]
    files = data_files(data)
    schemas = [read_schema(f).names for f in files]
    for columns in schemas:
        encoder.check_columns(columns)
        if "messages" in columns:  # the items of a conversation's parts have no mm_NAME cell to hold vectors
            raise DataError(f"{data}: column 'messages': chat data is not encoded ahead; its media parts are "
                            f"encoded during training (or give the media as mm_NAME columns)")
    if not any(MM_PREFIX + n in columns for columns in schemas for n in names):
        raise DataError(f"{data}: no column for a modality with an encoder (expected one of "
                        f"{[MM_PREFIX + n for n in names]}), so there is nothing to encode")
    shards, counts = _plan(files, rows_per_shard)
    job = _job(checkpoint, files, counts, rows_per_shard)
    done = _claim(out, job, files, shards, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, job, len(shards), complete=False)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bar = tqdm(total=sum(counts), initial=sum(s.stop - s.start for s in shards if s.index in done),
               unit="row", desc="encode", disable=not progress)
    for f, file in enumerate(files):
        todo = [s for s in shards if s.file == f and s.index not in done]
        if not todo:
            continue
        columns = schemas[f]
        present = [n for n in names if MM_PREFIX + n in columns]
        wanted = [c for c in columns if c in ("prompt", "response") or
                  (c.startswith(MM_PREFIX) and c[len(MM_PREFIX):] in checkpoint.specs)]
        for shard, table in zip((s for s in shards if s.file == f), _slices(file, rows_per_shard)):
            if shard.index > todo[-1].index:
                break
            if shard.index in done:
                continue
            cells: dict[str, list] = {n: [] for n in present}
            for a in range(0, table.num_rows, batch_size):
                rows = table.slice(a, batch_size).select(wanted).to_pylist()
                for name, got in _encode_rows(encoder, present, rows, shard.first_row + a, device).items():
                    cells[name] += got
                bar.update(len(rows))
            target = out / shard_name(shard.index, len(shards))
            tmp = target.with_name(f"_{target.name}.tmp")
            pq.write_table(_with_vectors(table, cells, shard.first_row), tmp)
            os.replace(tmp, target)
    bar.close()
    _write_manifest(out, job, len(shards), complete=True)
    return EncodeResult(out=out, rows=sum(counts), shards=len(shards), written=len(shards) - len(done),
                        skipped=len(done))


__all__ = ["encode_dataset", "EncodeResult", "shard_name"]
