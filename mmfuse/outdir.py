"""Output directories of ``mmfuse init``, ``mmfuse train``, ``mmfuse tiny-base`` and ``mmfuse data encode``:
never clobber silently.

- OUT missing or empty: used as it is.
- OUT not empty, no ``--overwrite`` (``overwrite=True``): refused before anything is
  read or written, with an error naming OUT and the flag; OUT stays byte-identical.
- OUT not empty, with ``--overwrite``: every entry mmfuse itself writes there is removed
  first (weights, ``config.json`` and the other JSON files, tokenizer files,
  ``metrics.json``, ``loss_curve.png``, ``train_state/``, ``encoders/``, ``adapter/``), so nothing of an
  earlier checkpoint or run survives next to the new one (no stale metrics, no old
  training state that a later ``--resume`` would pick up). Anything mmfuse never
  writes (``notes.md``, a ``data/`` folder, dotfiles...) makes even ``--overwrite``
  refuse: mmfuse deletes only what it could have written. (``mmfuse data encode`` passes its own
  ``owned`` rule: its shards and manifest.)
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

# what a checkpoint or training run may hold in its root: init copies the base's *.json, *.txt, *.model,
# *.jinja, *.tiktoken files and writes *.safetensors; training adds the report and its state directory
OWN_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
OWN_NAMES = ("loss_curve.png", "train_state", "encoders", "adapter")  # adapter/: stage 2 --save-adapter
FLAG = "--overwrite"


def _listing(entries: list[Path], most: int = 4) -> str:
    names = sorted(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in entries)
    more = f", and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _ours(entry: Path) -> bool:
    if entry.name in OWN_NAMES:
        return True
    return entry.suffix in OWN_SUFFIXES and not entry.name.startswith(".") and \
        (entry.is_symlink() or entry.is_file())


def claim_output_dir(out: str | os.PathLike, overwrite: bool = False, *, error: type[Exception] = ConfigError,
                     label: str = "", hint: str = "", owned: Callable[[Path], bool] = _ours) -> list[Path]:
    """Check that ``out`` may be written; returns the entries to remove first (``clear_entries``).

    Raises ``error`` (message: ``{label}output directory OUT is not empty (...){hint}; pass --overwrite ...``)
    when ``out`` is a non-empty directory and ``overwrite`` is false, or when it holds entries that mmfuse
    does not write (``owned(entry)`` false; default: a checkpoint's or training run's files). Reads the
    directory listing only; nothing is changed.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir():
        raise error(f"{label}{out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise error(f"{label}output directory {out} is not empty ({_listing(entries)}){hint}; pass {FLAG} "
                    f"(overwrite=True in Python) to replace its contents, or choose another directory")
    foreign = [e for e in entries if not owned(e)]
    if foreign:
        raise error(f"{label}output directory {out} holds entries mmfuse does not write ({_listing(foreign)}); "
                    f"{FLAG} only replaces mmfuse's own files: move those away or choose another directory")
    return entries


def clear_entries(entries: list[Path]) -> None:
    """Remove what ``claim_output_dir`` returned (symlinks are removed, never followed)."""
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink(missing_ok=True)


__all__ = ["claim_output_dir", "clear_entries", "FLAG"]
