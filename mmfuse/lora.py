"""LoRA adapters over a checkpoint's LM: named and checked once, chosen per request on either backend.

An adapter is a peft LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)
made on the checkpoint's base LM, e.g. by ``mmfuse train --stage 2 --save-adapter``. It
changes the language model only: every request shares the checkpoint's projectors and
encoders, so one engine serves many fine-tunes of one base (ten adapters cost ten small
files, not ten models). The transformers backend applies adapters with peft (mixed-adapter
batches); the vLLM backend with vLLM's LoRA kernels (``enable_lora``, one ``LoRARequest``
per request).

Names: a request picks an adapter by name (``"lora"`` in a request dict, the ``model`` field on
the server); ``None`` is the bare checkpoint.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .inputs import InputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # safetensors only: nothing is unpickled
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM 0.32 sizes its LoRA buffers for


@dataclass(frozen=True)
class LoraAdapter:
    """One checked adapter directory."""

    name: str
    path: Path
    rank: int


def open_adapters(lora: str | os.PathLike | Mapping[str, str | os.PathLike] | Sequence[str] | None,
                  field: str = "lora") -> dict[str, LoraAdapter]:
    """Adapters by name from ``lora``: a directory (named after it), ``{name: directory}``, or
    ``["NAME=DIR", ...]`` (the command line's form); ``open_adapters``' own result passes through.
    ConfigError naming ``field`` for a bad one."""
    if lora is None:
        return {}
    if isinstance(lora, (str, os.PathLike)):
        pairs = [(Path(lora).name, lora)]
    elif isinstance(lora, Mapping):
        pairs = list(lora.items())
    elif isinstance(lora, Sequence):
        pairs = []
        for entry in lora:
            name, sep, path = str(entry).partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"{field}: expected NAME=PATH, got {entry!r}")
            pairs.append((name, path))
    else:
        raise ConfigError(f"{field}: expected a directory, a {{name: directory}} dict or NAME=PATH strings, got "
                          f"{type(lora).__name__}")
    adapters: dict[str, LoraAdapter] = {}
    for name, path in pairs:
        if isinstance(path, LoraAdapter) and path.name == name:  # already checked
            adapters[name] = path
            continue
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{field}: adapter name {name!r}: expected letters, digits and ._:/- (not first)")
        if name in adapters:
            raise ConfigError(f"{field}: adapter name {name!r} given twice")
        adapters[name] = LoraAdapter(name, Path(path), _check_dir(f"{field}[{name!r}]", Path(path)))
    return adapters


def _check_dir(where: str, path: Path) -> int:
    """The adapter's rank, once its directory is a peft LoRA adapter in safetensors."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{where}: {path} is not a peft adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {config_file} is not readable JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{where}: {CONFIG_FILE} has rank r={rank!r}, expected a positive integer")
    if config.get("modules_to_save"):
        # full copies of LM modules (e.g. the head) are not LoRA: vLLM cannot swap them per request
        raise ConfigError(f"{where}: modules_to_save {config['modules_to_save']} is not supported; LoRA weights only")
    if not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{where}: no {WEIGHTS_FILE} in {path} (adapters are read from safetensors only)")
    return rank


def check_request_lora(name, adapters: Mapping[str, LoraAdapter], field: str = "lora") -> str | None:
    """A request's adapter name, or None for the bare checkpoint; InputError naming ``field`` otherwise."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InputError(f"{field}: expected an adapter name (str) or None, got {type(name).__name__}", field)
    if name not in adapters:
        known = sorted(adapters) or "none"
        raise InputError(f"{field}: no adapter named {name!r}; this model has adapters {known}", field)
    return name


def vllm_lora_args(adapters: Mapping[str, LoraAdapter], cpu: bool) -> dict:
    """Engine arguments that let every adapter run in one batch (none when there are no adapters).

    On CPU one more slot than adapters, left empty: vLLM 0.32's CPU LoRA ops (``lora/ops/torch_ops``)
    select each token's adapter as ``weights[index]`` and a token with no adapter has index -1, so it
    got the *last* slot's adapter (measured: a bare-model request batched with two adapters ran the
    second one). With the last slot never filled (slots fill first-free), index -1 reads zeros."""
    if not adapters:
        return {}
    rank = max(a.rank for a in adapters.values())
    fit = next((r for r in VLLM_RANKS if r >= rank), None)
    if fit is None:
        raise ConfigError(f"lora: rank {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters) + (1 if cpu else 0), "max_lora_rank": fit}


def vllm_lora_requests(adapters: Mapping[str, LoraAdapter]) -> dict:
    """``{name: vllm.lora.request.LoRARequest}`` with stable ids 1.. in the order given."""
    from vllm.lora.request import LoRARequest

    return {a.name: LoRARequest(a.name, i, str(a.path.resolve())) for i, a in enumerate(adapters.values(), 1)}


def merge_adapter(ckpt: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``ckpt`` with ``adapter`` merged into its LM weights (W + scale * B @ A) to ``out``: a plain
    checkpoint that runs with no adapter support; projectors, encoders and config otherwise unchanged."""
    from peft import PeftModel

    from .backends.hf import load

    from .training.stages import _carry_encoders

    open_adapters({"adapter": adapter})  # the same checks as serving it
    model = load(ckpt)
    model.lm = PeftModel.from_pretrained(model.lm, adapter).merge_and_unload()
    model.save(out)
    _carry_encoders(model.checkpoint.path, Path(out))  # local encoders (encoders/NAME), as a training export does
    return Path(out)
