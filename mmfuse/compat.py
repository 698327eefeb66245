"""The original sketch's API, on real parts.

``MultimodalQwen3Pipeline(model_name=..., modality_configs={...}, device=...)``:
``model_name`` may be an mmfuse checkpoint, or a plain base LM, in which case a
checkpoint with freshly initialised projectors is made once (base weights
symlinked, not copied) under ``$MMFUSE_CACHE`` (default ``~/.cache/mmfuse``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import init_checkpoint, read_config, resolve
from .config import ConfigError, MMFuseConfig, ModalitySpec
from .backends import select_backend
from .pipeline import MultimodalPipeline


def _cache_root() -> Path:
    return Path(os.environ.get("MMFUSE_CACHE", Path.home() / ".cache" / "mmfuse"))


def checkpoint_for(model_name: str | os.PathLike, modality_configs: dict[str, dict] | None) -> Path:
    """The mmfuse checkpoint to open for a sketch-style call (made on first use for a base LM)."""
    path = resolve(model_name)
    specs = [ModalitySpec(name=n, **dict(c)) for n, c in (modality_configs or {}).items()]
    config = read_config(path)
    if "mmfuse" in config:
        have = MMFuseConfig.from_dict(config["mmfuse"]).modalities
        for s in specs:
            if s.name not in have or have[s.name].input_dim != s.input_dim:
                raise ConfigError(f"modality_configs[{s.name!r}] does not match checkpoint {path}: "
                                  f"it has {{{', '.join(f'{n}: {m.input_dim}' for n, m in have.items())}}}")
        return path
    if not specs:
        raise ConfigError(f"{path} is a base LM: give modality_configs to attach projectors")
    key = json.dumps([str(path.resolve()), modality_configs], sort_keys=True, default=str)
    out = _cache_root() / "compat" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        init_checkpoint(path, tmp, specs, link=True)
        tmp.rename(out)  # atomic: a half-made checkpoint is never picked up
    return out


class MultimodalQwen3Pipeline(MultimodalPipeline):
    """Drop-in for the sketch: ``MultimodalQwen3Pipeline(model_name, modality_configs, device)``."""

    def __init__(self, model_name: str, modality_configs: dict[str, dict] | None = None,
                 device: str | None = None, backend: str = "auto", **options: Any):
        if select_backend(backend) == "hf":
            options["device"] = device
        super().__init__(checkpoint_for(model_name, modality_configs), backend=backend, **options)
