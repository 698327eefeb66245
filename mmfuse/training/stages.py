"""What each stage trains, and how the result becomes a checkpoint again.

- stage 1: projectors only (with ``train_modalities``, only those named); the LM is frozen, and the
  export reuses the input checkpoint's LM files (hard links when possible) plus a new projector file.
- stage 2: projectors + LoRA adapters on every linear layer of the LM's blocks
  (peft ``all-linear``: attention and MLP, never the output head), merged into
  the LM weights at export; or, with ``full``, every LM weight. ``freeze_projectors``
  trains the LM alone; ``save_adapter`` (with it) also writes the LoRA unmerged to
  ``OUT/adapter``, so many fine-tunes of one checkpoint are served by one engine
  (``mmfuse serve CKPT --lora NAME=OUT/adapter``, ``mmfuse.lora``).
- encoders (a modality's frozen ``encoder``) are never trained: they run outside the model's parameters
  (``mmfuse.encoders.get_tower``), so the optimiser and the saved state never see them, and the export
  carries the input's ``encoders/`` over unchanged (hard links).

The exported directory is a plain mmfuse checkpoint: both backends open it with
no adapter support. Training state lives in ``OUT/train_state/``, a sub-directory,
so no stray ``*.safetensors`` ever sits in OUT's root (vLLM loads every weight
file the index lists, and the index lists every ``*.safetensors`` in the root).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import INDEX_FILE, PROJECTOR_FILE, PROJECTOR_PREFIX, read_config, save_projectors, weight_files
from .config import TrainConfig, TrainConfigError

STATE_DIR = "train_state"
ADAPTER_DIR = "adapter"  # stage 2 --save-adapter: the LoRA unmerged (mmfuse.lora serves it)
ENCODERS_DIR = "encoders"  # a checkpoint's local encoders (mmfuse init copies them to encoders/NAME)
REPORT_FILES = ("metrics.json", "loss_curve.png")  # written by a run into OUT; never carried over


def setup_trainable(model, config: TrainConfig):
    """Freeze what the stage does not train; add LoRA adapters for stage 2.

    Returns (the trainable parameters in a fixed order as [(name, param)], the peft model or None).
    The names are those of ``model.named_parameters()`` and key the saved training state.
    """
    model.requires_grad_(False)
    names = [] if config.freeze_projectors else config.train_modalities or list(model.mm_projectors)
    unknown = sorted(set(names) - set(model.mm_projectors))
    if unknown:
        raise TrainConfigError(f"train_modalities: {unknown} not in this checkpoint's modalities "
                               f"{list(model.mm_projectors)}")
    for name in names:  # the other projectors stay frozen: their weights are exported bit-identical
        model.mm_projectors[name].requires_grad_(True)
    peft_model = None
    if config.trainable == "full":
        model.lm.requires_grad_(True)
    elif config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        # injects LoRA layers into model.lm in place; model.lm stays the transformers model object
        peft_model = get_peft_model(model.lm, lora)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad], peft_model


def _clear_weights(out: Path) -> None:
    """Remove weight files of an earlier export so the index lists only this one's."""
    for f in weight_files(out):
        f.unlink()
    (out / INDEX_FILE).unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    src = src.resolve()  # hub snapshots hold symlinks into the blob store
    try:
        os.link(src, dst)
    except OSError:  # other filesystem, or links not allowed
        shutil.copy2(src, dst)


def export_checkpoint(model, peft_model, config: TrainConfig, ckpt: Path, out: Path) -> Path:
    """Write the trained model to ``out`` as a checkpoint both backends load directly."""
    out.mkdir(parents=True, exist_ok=True)
    _clear_weights(out)
    _carry_encoders(ckpt, out)
    if config.trainable == "projectors":
        _export_projectors_only(model, ckpt, out)
        return out
    if peft_model is not None and config.save_adapter:
        _save_adapter(peft_model, ckpt, out / ADAPTER_DIR)
    if peft_model is not None:
        model.lm = peft_model.merge_and_unload()  # W + scale * B @ A, adapters removed
    source_dtype = _checkpoint_dtype(ckpt)
    if source_dtype is not None:
        model.lm.to(source_dtype)  # export in the checkpoint's own precision (fp32 training master copy)
    model.save(out, lm_weights=True)
    return out


def _save_adapter(peft_model, ckpt: Path, adapter_dir: Path) -> None:
    """The LoRA as trained, unmerged, in peft's format (adapter_config.json + adapter_model.safetensors): served
    over the input checkpoint with ``--lora NAME=OUT/adapter``, it equals the merged export (same projectors)."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.peft_config["default"].base_model_name_or_path = str(ckpt)  # what it adapts, for the reader
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)


def _carry_encoders(ckpt: Path, out: Path) -> None:
    """The input checkpoint's ``encoders/`` (local encoders ``mmfuse init`` placed there; the config names them
    ``encoders/NAME``) into ``out``: files hard-linked (nothing ever writes to them), symlinks kept as links.
    Encoders are frozen and never trained, so the output holds them exactly as the input did."""
    src, dst = ckpt / ENCODERS_DIR, out / ENCODERS_DIR
    if not src.is_dir():
        return
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True, copy_function=lambda a, b: _link_or_copy(Path(a), Path(b)))


def _export_projectors_only(model, ckpt: Path, out: Path) -> None:
    """Stage 1: the input checkpoint's files with a new projector file (the LM is unchanged)."""
    for f in ckpt.iterdir():
        if not f.is_file() or f.name in REPORT_FILES or f.name == INDEX_FILE:
            continue
        target = out / f.name
        if f.suffix == ".safetensors":
            if f.name == PROJECTOR_FILE:
                continue
            _check_no_projectors(f)
            target.unlink(missing_ok=True)
            _link_or_copy(f, target)
        elif f.suffix in (".json", ".model", ".txt", ".jinja", ".tiktoken"):
            shutil.copy2(f, target)
    save_projectors(model.mm_projectors, out)  # also rewrites the index over all weight files


def _check_no_projectors(f: Path) -> None:
    from safetensors import safe_open

    with safe_open(f, framework="pt") as st:
        if any(k.startswith(PROJECTOR_PREFIX) for k in st.keys()):
            raise ValueError(f"{f}: holds mm_projectors.* tensors besides {PROJECTOR_FILE}; a stage-1 export "
                             f"would list them twice. Re-save the checkpoint with mmfuse first.")


def _checkpoint_dtype(ckpt: Path) -> torch.dtype | None:
    config = read_config(ckpt)
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else None


def trainable_state(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in params}
