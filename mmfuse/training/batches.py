"""Which rows each process reads at each optimiser step.

One optimiser step consumes a *global batch* of ``batch_size * processes *
grad_accum`` rows, taken in order from the epoch's permutation (a fixed
function of seed and epoch, so a resumed run sees the same rows). Micro-step
``m`` of process ``r`` reads positions ``[m*B*P + r*B, m*B*P + (r+1)*B)`` of the
step's rows. The same global batch therefore trains the same update whether it
is split over processes, over accumulation steps, or neither. The last step of
an epoch may be short; a process may then get no rows at all.

The rows are those ``plan.plan_dataset`` kept (all of them, unless over-long rows
were dropped): positions above index that list, so dropping a row shifts the
rows after it but every process still agrees on each step's rows.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch

from .config import TrainConfig

Rows = list[tuple[int, dict]]  # (row index in the dataset, row)
ROW_INDEX = "__mmfuse_row__"  # stream column carrying the row's original position
STREAM_SHUFFLE_BUFFER = 10_000


def global_batch(config: TrainConfig, processes: int) -> int:
    return config.batch_size * processes * config.grad_accum


def steps_per_epoch(num_rows: int, config: TrainConfig, processes: int) -> int:
    return math.ceil(num_rows / global_batch(config, processes))


def epoch_order(num_rows: int, epoch: int, config: TrainConfig) -> list[int]:
    if not config.shuffle:
        return list(range(num_rows))
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=gen).tolist()


def _split(chunk: list, config: TrainConfig, processes: int, rank: int) -> list[list]:
    """This process's micro-batches of one global batch (positions as in the module docstring)."""
    b, per_micro = config.batch_size, config.batch_size * processes
    return [chunk[m * per_micro + rank * b: m * per_micro + (rank + 1) * b] for m in range(config.grad_accum)]


def fetch(ds, indices: list[int]) -> Rows:
    """Rows of a map-style dataset, read as one batch."""
    if not indices:
        return []
    cols = ds[indices]
    return [(i, {k: v[j] for k, v in cols.items()}) for j, i in enumerate(indices)]


def map_steps(ds, config: TrainConfig, epoch: int, start_step: int, processes: int,
              rank: int, rows: list[int] | None = None) -> Iterator[list[Rows]]:
    """Micro-batches of rows for each remaining step of ``epoch`` (memory-mapped dataset);
    ``rows``: the dataset rows that train (None: all)."""
    rows = list(range(len(ds))) if rows is None else rows
    order = [rows[i] for i in epoch_order(len(rows), epoch, config)]
    g = global_batch(config, processes)
    for step in range(start_step, steps_per_epoch(len(rows), config, processes)):
        yield [fetch(ds, idx) for idx in _split(order[step * g:(step + 1) * g], config, processes, rank)]


def stream_steps(ds, config: TrainConfig, epoch: int, start_step: int, processes: int,
                 rank: int, skip: frozenset[int] = frozenset()) -> Iterator[list[Rows]]:
    """The same for a stream: every process reads the stream and keeps its own slices.

    Rows keep their position in the unshuffled stream for error messages; the
    shuffle is datasets' shard + buffer shuffle, seeded by seed and epoch.
    ``skip``: row positions left out (dropped over-long rows).
    """
    stream = ds.map(lambda row, i: {ROW_INDEX: i}, with_indices=True)
    if skip:
        stream = stream.filter(lambda row: row[ROW_INDEX] not in skip)
    if config.shuffle:
        stream = stream.shuffle(seed=config.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        stream.set_epoch(epoch)
    g = global_batch(config, processes)
    it = itertools.islice(iter(stream), start_step * g, None)
    while True:
        chunk = list(itertools.islice(it, g))
        if not chunk:
            return
        rows = [(r.pop(ROW_INDEX), r) for r in chunk]
        yield _split(rows, config, processes, rank)
