"""Checkpoint directories: make one from a base LM, write updates, find and validate files.

Layout (a normal Hugging Face model directory, so vLLM opens it too)::

    config.json                  base config + architectures=[MMFuse<Base>] + "mmfuse" section
    tokenizer files              every placeholder added as a special token
    model*.safetensors           the base LM's tensors, untouched (copied or linked)
    mm_projectors.safetensors    mm_projectors.NAME.* only
    model.safetensors.index.json weight map over all of the above

Keeping projectors in their own file means a stage-1 update rewrites a few MB,
never the LM, and ``init`` never holds a second copy of the base in memory.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, MMFuseConfig, ModalitySpec, wrapper_architecture
from .projectors import build_projectors

PROJECTOR_FILE = "mm_projectors.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROJECTOR_PREFIX = "mm_projectors."
SUPPORTED_BASES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
# files of the base that a checkpoint carries over besides weights and config
_CARRIED = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is, else a hub id through the local hub cache / download."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{path} is a file, expected a model directory or hub id")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as e:  # offline, unknown id, auth: all read the same to a user
        raise ConfigError(f"{path_or_id!r} is neither a local directory nor a reachable hub model: {e}") from e


def read_config(path: Path) -> dict:
    with open(path / "config.json") as f:
        return json.load(f)


def write_config(path: Path, config: dict) -> None:
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.safetensors"))


def write_index(path: Path) -> None:
    """Rebuild the weight map from the safetensors files present (reads headers only)."""
    weight_map: dict[str, str] = {}
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                weight_map[key] = f.name
    with open(path / INDEX_FILE, "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def save_projectors(projectors: torch.nn.Module, path: Path) -> None:
    """Write ``mm_projectors.*`` to its own file; the LM's files are not touched."""
    state = {PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in projectors.state_dict().items()}
    save_file(state, str(path / PROJECTOR_FILE), metadata={"format": "pt"})
    write_index(path)


def load_projector_state(path: Path) -> dict[str, torch.Tensor]:
    """Collect ``mm_projectors.*`` tensors from whichever safetensors files hold them."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.startswith(PROJECTOR_PREFIX):
                    state[key[len(PROJECTOR_PREFIX):]] = st.get_tensor(key)
    return state


def placeholder_token_ids(tokenizer, specs: Mapping[str, ModalitySpec]) -> dict[str, int]:
    """{modality: id of its placeholder}; each placeholder must encode to exactly one token."""
    ids = {}
    for name, spec in specs.items():
        enc = tokenizer.encode(spec.placeholder, add_special_tokens=False)
        if len(enc) != 1:
            raise ConfigError(f"modality {name!r}: placeholder {spec.placeholder} is not a single special token in "
                              f"the tokenizer (encodes to {enc}); was the checkpoint made with `mmfuse init`?")
        ids[name] = enc[0]
    return ids


def _resolve_specs(specs: Iterable[ModalitySpec], lm_hidden: int) -> dict[str, ModalitySpec]:
    out: dict[str, ModalitySpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ConfigError(f"modality {spec.name!r} given twice")
        if spec.projector == "mlp2x_gelu" and spec.hidden_dim is None:
            spec.hidden_dim = lm_hidden  # store the resolved size so the file says what the weights are
        out[spec.name] = spec
    return out


def init_checkpoint(base: str | os.PathLike, out: str | os.PathLike, modalities: Iterable[ModalitySpec] | dict,
                    seed: int = 0, link: bool = False) -> Path:
    """Make an mmfuse checkpoint at ``out`` from a base causal LM, with fresh projectors.

    ``modalities`` is a list of ``ModalitySpec`` or ``{name: {input_dim: ..., ...}}``.
    ``link=True`` symlinks the base weight files instead of copying them.
    """
    from transformers import AddedToken, AutoTokenizer

    src, dst = resolve(base), Path(out)
    if isinstance(modalities, dict):
        modalities = [ModalitySpec.from_dict(n, dict(s)) for n, s in modalities.items()]
    config = read_config(src)
    arch = (config.get("architectures") or ["?"])[0]
    if "mmfuse" in config:
        raise ConfigError(f"{src} is already an mmfuse checkpoint")
    if arch not in SUPPORTED_BASES:
        raise ConfigError(f"base architecture {arch!r} is not supported yet; supported: {SUPPORTED_BASES}")
    hidden = config.get("text_config", config)["hidden_size"]
    mm = MMFuseConfig(modalities=_resolve_specs(modalities, hidden))

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in _CARRIED and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, dst / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens([AddedToken(s.placeholder, special=True, normalized=False) for s in mm.modalities.values()],
                   special_tokens=True)
    tok.save_pretrained(dst)
    if len(tok) > config["vocab_size"]:
        # No spare embedding rows: grow the matrix once (placeholder rows are never read).
        _resize_and_save(src, dst, len(tok))
        config = read_config(dst)
    else:
        for f in weight_files(src):
            target = dst / f.name
            if target.exists() or target.is_symlink():
                target.unlink()
            if link:
                target.symlink_to(f.resolve())
            else:
                shutil.copy2(f, target)
    config["architectures"] = [wrapper_architecture(arch)]
    config["mmfuse"] = mm.to_dict()
    write_config(dst, config)
    torch.manual_seed(seed)
    save_projectors(build_projectors(mm.modalities, hidden), dst)
    return dst


def _resize_and_save(src: Path, dst: Path, vocab: int) -> None:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    lm.resize_token_embeddings(vocab, pad_to_multiple_of=64)
    lm.save_pretrained(dst)
