"""Which rows train: every row is encoded once before step 1, on every process.

A bad row must stop a distributed run on every process with the same message and
never leave one process waiting in a collective for another that died. Checking
lazily, batch by batch, would find a bad row on one process only (the one whose
slice holds it). So each process encodes the whole dataset itself, in file order,
before training starts: the result is a pure function of the data and the
checkpoint, hence identical on every process without any communication, and the
trainer stops all processes at once when it is an error.

``overlength="drop"`` rows are left out here (counted), so that every process
agrees on the rows that make up an epoch; the batch order (``batches``) is then
over the kept rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import iter_rows
from .encode import DataError, OverLength, RowEncoder

MAX_REPORTED = 3  # bad rows quoted in the error; `mmfuse data check` lists more


@dataclass
class DataPlan:
    """The rows that train, in dataset order, and what the checks found."""

    rows: list[int]  # indices of the rows kept (every row but the dropped ones)
    dropped: list[int]  # over-long rows left out (overlength="drop")
    total: int  # rows in the dataset

    def summary(self) -> dict:
        """For metrics.json: rows in the data, rows trained on, the dropped rows' indices."""
        return {"rows": self.total, "kept": len(self.rows), "dropped": self.dropped}

    def describe(self) -> str:
        if not self.dropped:
            return f"{self.total} rows"
        return (f"{len(self.rows)} of {self.total} rows ({len(self.dropped)} over the length limit dropped: rows "
                f"{', '.join(map(str, self.dropped[:5]))}{', ...' if len(self.dropped) > 5 else ''})")


def plan_dataset(encoder: RowEncoder, ds, name: str = "data") -> DataPlan:
    """Encode every row (memory-mapped or streamed) with ``encoder``'s rules and keep none of the results.

    ``name``: the data's path, for messages. Raises ``DataError`` naming the first bad row (and how many
    there are) when any row is invalid, or when no row is left to train on."""
    kept, dropped, errors, bad, total = [], [], [], 0, 0
    for index, row in iter_rows(ds):
        total += 1
        try:
            encoder.encode(row, index)
        except OverLength:
            dropped.append(index)
            continue
        except DataError as e:
            bad += 1
            if len(errors) < MAX_REPORTED:
                errors.append(str(e))
            continue
        kept.append(index)
    if errors:
        more = f" ({bad} bad rows in all: {'; '.join(errors[1:])}{'; ...' if bad > len(errors) else ''})"
        raise DataError(errors[0] + (more if bad > 1 else ""))
    if not kept:
        raise DataError(f"{name}: the dataset has no rows" if not total else
                        f"{name}: every one of the {total} rows is over the length limit (overlength=drop "
                        f"dropped them all)")
    return DataPlan(rows=kept, dropped=dropped, total=total)
