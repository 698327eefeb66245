"""Training state on disk, for ``--resume``: exact continuation of an interrupted run.

``OUT/train_state/step_NNNNNNNN/`` holds

- ``trainable.safetensors``: the trained parameters (projectors, LoRA or LM), fp32;
- ``optimizer.pt``: the optimiser's state dict (read back with ``weights_only=True``);
- ``scheduler.json``: the lr scheduler's state;
- ``rng_rank{R}.safetensors``: each process's torch (and CUDA) RNG state;
- ``progress.json``: step, epoch, position in the epoch, the run's config and metric history.

A state is written to a hidden temporary directory and renamed into place, so a
run killed while saving leaves the previous state intact. All processes must see
the same OUT directory (one machine, or a shared filesystem).
"""
from __future__ import annotations


import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RESUME_INVARIANTS, TrainConfig, TrainConfigError
from .stages import STATE_DIR


@dataclass
class Progress:
    """Where a run stands: the data position is (epoch, epoch_step) with a deterministic order per epoch."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    epoch_step: int = 0  # optimiser steps done within the epoch
    history: list[dict] = field(default_factory=list)  # per-step records (loss, lr, tokens)
    evals: list[dict] = field(default_factory=list)  # eval records


def state_dirs(out: Path) -> list[Path]:
    root = out / STATE_DIR
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_state(out: Path, progress: Progress, config: TrainConfig, parallel, optimizer, scheduler,
               accelerator) -> Path:
    """Write one state (every process calls this; rank 0 writes the shared parts). ``parallel``:
    ``sharding.Parallel``, which gathers FSDP shards into the same whole tensors DDP holds, so the files
    are the same whatever the strategy (and a state resumes under either)."""
    root = out / STATE_DIR
    trainable, optimizer_state = parallel.trainable_state(), parallel.optimizer_state(optimizer)
    final, tmp = root / f"step_{progress.step:08d}", root / f".tmp_step_{progress.step:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_state(), str(tmp / f"rng_rank{accelerator.process_index}.safetensors"))
    if main:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "progress.json", {"step": progress.step, "epoch": progress.epoch,
                                            "epoch_step": progress.epoch_step, "history": progress.history,
                                            "evals": progress.evals, "config": config.to_dict(),
                                            "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in state_dirs(out)[:-config.keep_states]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_state(out: Path, config: TrainConfig, parallel, optimizer, scheduler, accelerator) -> Progress:
    """Restore the newest state in ``out``; the run's invariants must match the saved ones."""
    dirs = state_dirs(out)
    if not dirs:
        raise TrainConfigError(f"resume: no training state in {out / STATE_DIR} (was save_every set?)")
    state = dirs[-1]
    saved = json.loads((state / "progress.json").read_text())
    # a state saved before a setting existed was made with that setting's default
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    was = {k: saved["config"].get(k, defaults.get(k)) for k in RESUME_INVARIANTS}
    changed = {k: (was[k], getattr(config, k)) for k in RESUME_INVARIANTS if was[k] != getattr(config, k)}
    if saved["world_size"] != accelerator.num_processes:
        changed["processes"] = (saved["world_size"], accelerator.num_processes)
    if changed:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise TrainConfigError(f"resume: {state} was made with different settings ({detail})")
    tensors = load_file(str(state / "trainable.safetensors"))
    missing = sorted({n for n, _ in parallel.params} - set(tensors))
    if missing:
        raise TrainConfigError(f"resume: {state} lacks trained parameters {missing[:5]}")
    parallel.load_trainable(tensors)
    parallel.load_optimizer_state(optimizer, torch.load(state / "optimizer.pt", map_location="cpu",
                                                        weights_only=True))
    scheduler.load_state_dict(json.loads((state / "scheduler.json").read_text()))
    _set_rng_state(load_file(str(state / f"rng_rank{accelerator.process_index}.safetensors")))
    return Progress(step=saved["step"], epoch=saved["epoch"], epoch_step=saved["epoch_step"],
                    history=saved["history"], evals=saved["evals"])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
