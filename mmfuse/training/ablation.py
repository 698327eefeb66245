"""Input ablation: how much a checkpoint's scores fall when a modality's vectors carry no information.

``mmfuse eval --ablate MODE`` scores the data as it is, then again with the vectors of one
modality replaced (each modality in turn, then all of them together), and reports each
score and its drop (as-is score minus ablated score). A model that ignores a modality
shows no drop for it. The replacements, per modality, over the evaluated rows:

- ``zero``: every vector becomes zeros (same shape);
- ``shuffle``: each row gets another row's items of that modality (a seeded permutation with
  no fixed point, within the rows that hold the same number of items, so placeholder counts
  stay right; a row alone in its group keeps its items);
- ``noise``: Gaussian vectors with the modality's per-dimension mean and standard deviation
  over all its vectors in the evaluated rows (same shapes).

Only the ``mm_NAME`` vector columns are ablated; a modality stored as raw media (encoder input)
is refused with a message: encode it first (``mmfuse data encode``).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from .config import ABLATIONS
from .encode import MM_PREFIX, DataError
ALL = "all"  # the report key of every modality ablated together

Rows = list[tuple[int, dict]]  # (row index in the dataset, row)


def _items(row: dict, name: str, index: int) -> list[np.ndarray]:
    """A row's items of modality ``name`` as float32 arrays ([] when it has none)."""
    value = row.get(MM_PREFIX + name)
    if value is None:
        return []
    out = []
    for i, item in enumerate(value):
        try:
            out.append(np.asarray(item, dtype=np.float32))
        except (TypeError, ValueError):
            raise DataError(f"row {index}: modality {name!r} item {i}: --ablate needs vectors, got raw media "
                            f"({type(item).__name__}); encode the data first (`mmfuse data encode`)") from None
    return out


def modalities_present(rows: Rows, names: Sequence[str]) -> list[str]:
    """The modalities of ``names`` with at least one item in ``rows``, in the given order."""
    return [n for n in names if any(row.get(MM_PREFIX + n) for _, row in rows)]


def _rng(seed: int, mode: str, name: str) -> np.random.Generator:
    # one stream per (mode, modality): ablating "a" alone and "a" with "b" replaces "a" identically
    return np.random.default_rng([seed, zlib.crc32(f"{mode}:{name}".encode())])


def _replace(rows: Rows, name: str, mode: str, seed: int) -> list[list[np.ndarray]]:
    """Each row's new items of ``name``."""
    items = [_items(row, name, i) for i, row in rows]
    rng = _rng(seed, mode, name)
    if mode == "zero":
        return [[np.zeros_like(x) for x in its] for its in items]
    if mode == "noise":
        vectors = np.concatenate([x.reshape(-1, x.shape[-1]) for its in items for x in its])
        mean, std = vectors.mean(axis=0), vectors.std(axis=0)
        return [[(mean + std * rng.standard_normal(x.shape)).astype(np.float32) for x in its] for its in items]
    if mode == "shuffle":
        out = list(items)
        groups: dict[int, list[int]] = {}
        for r, its in enumerate(items):
            groups.setdefault(len(its), []).append(r)
        for count, members in groups.items():
            if count == 0 or len(members) < 2:
                continue
            order = [members[k] for k in rng.permutation(len(members))]
            for k, r in enumerate(order):  # each row takes the next one's items in a random cycle: no fixed point
                out[r] = items[order[(k + 1) % len(order)]]
        return out
    raise ValueError(f"ablate: expected one of {ABLATIONS}, got {mode!r}")


def ablate(rows: Rows, names: Sequence[str], mode: str, seed: int = 0) -> Rows:
    """``rows`` with the items of every modality in ``names`` replaced as ``mode`` says (new row dicts)."""
    new = [(i, dict(row)) for i, row in rows]
    for name in names:
        for (_, row), its in zip(new, _replace(rows, name, mode, seed)):
            if row.get(MM_PREFIX + name) is not None:
                row[MM_PREFIX + name] = its
    return new


def ablation_report(rows: Rows, names: Sequence[str], modes: Sequence[str], score: Callable[[Rows], dict],
                    base: dict, seed: int = 0) -> dict:
    """``{mode: {target: {"scores": {...}, "drops": {...}}}}`` for each modality in ``names`` and ``"all"``.

    ``score(rows)`` returns the scores of a list of rows; ``base`` is its result on ``rows`` unchanged.
    """
    report = {}
    for mode in modes:
        targets = {name: [name] for name in names} | {ALL: list(names)}
        report[mode] = {}
        for target, ablated in targets.items():
            scores = score(ablate(rows, ablated, mode, seed))
            report[mode][target] = {"scores": scores, "drops": {k: base[k] - v for k, v in scores.items()}}
    return report
