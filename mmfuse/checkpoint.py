"""Checkpoint directories: make one from a base LM, write updates, find and validate files.

Layout (a normal Hugging Face model directory, so vLLM opens it too)::

    config.json                  base config + architectures=[MMFuse<Base>] + "mmfuse" section
    tokenizer files              every placeholder added as a special token
    model*.safetensors           the base LM's tensors, untouched (copied or linked)
    mm_projectors.safetensors    mm_projectors.NAME.* only
    model.safetensors.index.json weight map over all of the above

Keeping projectors in their own file means a stage-1 update rewrites a few MB,
never the LM, and ``init`` never holds a second copy of the base in memory.

``open_checkpoint`` is the one reader of a checkpoint's metadata (specs,
tokenizer, placeholder ids, lengths, EOS ids): both backends, the server and
training take what they need from the ``Checkpoint`` it returns, and
``Checkpoint.encode`` is the one place a prompt is tokenized and its
placeholders expanded.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, MMFuseConfig, ModalitySpec, base_architecture, wrapper_architecture
from .inputs import EncodedPrompt, PreparedPrompt, encode_token_ids, tokenize
from .projectors import build_projectors, resolve_spec

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


def stored_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the tensors in a checkpoint's weight files (from their headers): what a backend loads. A
    quantized base counts at its stored width (int8, packed int4, plus scales)."""
    import struct

    total = 0
    for f in weight_files(resolve(path)):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])
    return total


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


@dataclass
class Checkpoint:
    """Everything read from a checkpoint directory except weights: what backends, server and training share."""

    path: Path
    config: dict  # config.json as a dict (the base config plus the "mmfuse" section)
    mm_config: MMFuseConfig
    tokenizer: object  # a transformers tokenizer with every placeholder as a special token
    placeholder_ids: dict[str, int]  # {modality: placeholder token id}
    max_len: int  # the LM's max_position_embeddings
    eos_token_ids: frozenset[int]  # tokenizer EOS plus generation_config.json's eos_token_id(s)
    pad_token_id: int
    bos_token_id: int | None = field(default=None)

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.mm_config.modalities

    @property
    def hidden_size(self) -> int:
        return self.config.get("text_config", self.config)["hidden_size"]

    @property
    def vocab_size(self) -> int:
        """Rows of the LM's output layer: the token ids it can score (``logit_bias``, ``stop_token_ids``)."""
        return self.config.get("text_config", self.config)["vocab_size"]

    @property
    def base_architecture(self) -> str:
        return base_architecture((self.config.get("architectures") or ["?"])[0])

    def encode(self, prepared: PreparedPrompt, max_len: int | None = None) -> EncodedPrompt:
        """Tokenize a prepared prompt once and apply the placeholder rule on token ids.

        ``max_len``: the most tokens the prompt may have after items expand (default the LM's
        length); InputError when it does not fit, is empty, or placeholders and items disagree.
        """
        ids = tokenize(self.tokenizer, prepared.text)  # strings marked by inputs.user_text stay plain text
        return encode_token_ids(ids, prepared.items, self.specs, self.placeholder_ids,
                                self.max_len if max_len is None else max_len, self.bos_token_id)


def open_checkpoint(path_or_id: str | os.PathLike, tokenizer=None) -> Checkpoint:
    """Read a checkpoint's config and tokenizer (no weights) and validate them.

    ``tokenizer``: an already-loaded tokenizer for this checkpoint (skips loading one).
    """
    from transformers import AutoTokenizer

    from .thin import materialize

    path = materialize(resolve(path_or_id))  # a thin checkpoint: its view with the base's weights linked in
    config = read_config(path)
    mm_config = MMFuseConfig.from_hf_config(config, root=str(path))
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    text = config.get("text_config", config)
    eos = {tok.eos_token_id}
    gen_path = path / "generation_config.json"
    # generation_config.json may list more EOS ids than the tokenizer (Qwen3: <|im_end|>, <|endoftext|>)
    for source in (text, json.loads(gen_path.read_text()) if gen_path.exists() else {}):
        value = source.get("eos_token_id")
        eos |= set(value if isinstance(value, list) else [value])
    bos = tok.bos_token_id
    # a BOS the tokenizer adds by itself stays first when items are put before the text
    adds_bos = bos is not None and tok("x")["input_ids"][:1] == [bos]
    return Checkpoint(path=path, config=config, mm_config=mm_config, tokenizer=tok,
                      placeholder_ids=placeholder_token_ids(tok, mm_config.modalities),
                      max_len=text["max_position_embeddings"], eos_token_ids=frozenset(eos - {None}),
                      pad_token_id=tok.pad_token_id, bos_token_id=bos if adds_bos else None)


def _resolve_specs(specs: Iterable[ModalitySpec], lm_hidden: int) -> dict[str, ModalitySpec]:
    out: dict[str, ModalitySpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ConfigError(f"modality {spec.name!r} given twice")
        out[spec.name] = resolve_spec(spec, lm_hidden)  # the file says what the weights are; checks vs the LM
        if spec.encoder is not None:
            from .encoders import encoder_output_dim

            dim = encoder_output_dim(spec.encoder)
            if spec.input_dim != dim:
                raise ConfigError(f"modality {spec.name!r}: input_dim {spec.input_dim}, but its encoder "
                                  f"{spec.encoder.source!r} ({spec.encoder.kind}, {spec.encoder.output}) makes "
                                  f"{dim}-d vectors")
    return out


def _with_encoder_dim(spec: dict) -> dict:
    """A modality dict with an encoder and no input_dim gets the encoder's output size."""
    if "input_dim" not in spec and spec.get("encoder") is not None:
        from .config import EncoderSpec
        from .encoders import encoder_output_dim

        spec["input_dim"] = encoder_output_dim(EncoderSpec.from_dict(spec["encoder"]))
    return spec


def _place_encoders(specs: Mapping[str, ModalitySpec], dst: Path, link: bool) -> None:
    """Copy (or with ``link`` symlink) each local encoder directory to ``encoders/NAME`` in the checkpoint
    and point its spec there; hub ids stay references."""
    from .config import EncoderSpec

    for name, spec in specs.items():
        enc = spec.encoder
        if enc is None or not (Path(enc.source) / "config.json").is_file():
            continue
        target = dst / "encoders" / name
        target.parent.mkdir(exist_ok=True)
        if link:
            target.symlink_to(Path(enc.source).resolve(), target_is_directory=True)
        else:
            shutil.copytree(enc.source, target)
        spec.encoder = EncoderSpec(f"encoders/{name}", enc.kind, enc.output, root=str(dst))


def init_checkpoint(base: str | os.PathLike, out: str | os.PathLike, modalities: Iterable[ModalitySpec] | dict,
                    seed: int = 0, link: bool = False, overwrite: bool = False) -> Path:
    """Make an mmfuse checkpoint at ``out`` from a base causal LM, with fresh projectors.

    ``modalities`` is a list of ``ModalitySpec`` or ``{name: {input_dim: ..., ...}}``. A modality with an
    ``encoder`` may leave ``input_dim`` out (the encoder's output size); a local encoder directory is
    copied to ``encoders/NAME`` (symlinked with ``link``), a hub id stays a reference.
    ``link=True`` symlinks the base weight files instead of copying them. A quantized base (its
    ``quantization_config``, e.g. compressed-tensors, AWQ, GPTQ) keeps its weight files and config as
    they are; the projectors are written in float32.
    ``out`` must be missing or empty (``ConfigError`` naming it, nothing touched); ``overwrite=True``
    first removes what an earlier checkpoint or training run wrote there (``mmfuse.outdir``).
    """
    from transformers import AddedToken, AutoTokenizer

    from .outdir import claim_output_dir, clear_entries

    stale = claim_output_dir(out, overwrite)  # before anything is read or written
    src, dst = resolve(base), Path(out)
    if stale and dst.resolve() == src.resolve():
        raise ConfigError(f"{dst} is the base model itself; write the checkpoint to another directory")
    if isinstance(modalities, dict):
        modalities = [ModalitySpec.from_dict(n, _with_encoder_dim(dict(s))) for n, s in modalities.items()]
    config = read_config(src)
    arch = (config.get("architectures") or ["?"])[0]
    if "mmfuse" in config:
        raise ConfigError(f"{src} is already an mmfuse checkpoint")
    if arch not in SUPPORTED_BASES:
        raise ConfigError(f"base architecture {arch!r} is not supported yet; supported: {SUPPORTED_BASES}")
    hidden = config.get("text_config", config)["hidden_size"]
    mm = MMFuseConfig(modalities=_resolve_specs(modalities, hidden))

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens([AddedToken(s.placeholder, special=True, normalized=False) for s in mm.modalities.values()],
                   special_tokens=True)
    if len(tok) > config["vocab_size"] and "quantization_config" in config:  # before anything is written
        # growing the embedding matrix means re-saving the base, which needs the quantizer that made it
        raise ConfigError(f"quantization_config: {src} is quantized and has no spare embedding rows for "
                          f"{len(tok) - config['vocab_size']} placeholder token(s); use a base whose vocab_size "
                          f"exceeds its tokenizer, or quantize after `mmfuse init`")

    clear_entries(stale)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in _CARRIED and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, dst / f.name)
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
    _place_encoders(mm.modalities, dst, link)
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


def add_modality(ckpt: str | os.PathLike, modalities: Iterable[ModalitySpec], seed: int = 0) -> Path:
    """Grow a (trained) checkpoint in place: a placeholder token and a fresh projector per new modality.

    Every existing weight stays bit-identical: the LM files are not rewritten when the embedding
    matrix has spare rows (as ``init``), and the old projectors' tensors are copied as stored. Without
    spare rows the matrix grows once (old rows unchanged). Train only the new projectors with
    ``mmfuse train --train-modalities NAME``. The config is written last: it is what declares them.
    """
    from transformers import AddedToken, AutoTokenizer

    path = Path(ckpt)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a local checkpoint directory (add-modality changes it in place)")
    config = read_config(path)
    old = MMFuseConfig.from_hf_config(config)
    hidden = config.get("text_config", config)["hidden_size"]
    new = _resolve_specs(modalities, hidden)
    taken = sorted(set(new) & set(old.modalities))
    if taken:
        raise ConfigError(f"{path}: modality {taken[0]!r} is already in this checkpoint")
    mm = MMFuseConfig(modalities={**old.modalities, **new})  # checks placeholders are unique
    for f in weight_files(path):  # the old projector tensors are rewritten into PROJECTOR_FILE only
        if f.name != PROJECTOR_FILE and _holds_projectors(f):
            raise ConfigError(f"{f}: holds mm_projectors.* tensors besides {PROJECTOR_FILE}; re-save the "
                              f"checkpoint with mmfuse first")
    torch.manual_seed(seed)
    state = {PROJECTOR_PREFIX + k: v.contiguous()
             for k, v in build_projectors(new, hidden).state_dict().items()}
    old_state = load_projector_state(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([AddedToken(s.placeholder, special=True, normalized=False) for s in new.values()],
                   special_tokens=True)
    text = config.get("text_config", config)
    if len(tok) > text["vocab_size"]:
        text["vocab_size"] = _grow_embeddings(path, len(tok))
    tok.save_pretrained(path)
    state.update({PROJECTOR_PREFIX + k: v for k, v in old_state.items()})
    tmp = path / (PROJECTOR_FILE + ".tmp")  # not *.safetensors: never listed in the index
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / PROJECTOR_FILE)
    write_index(path)
    _place_encoders(new, path, link=False)
    config["mmfuse"] = mm.to_dict()
    write_config(path, config)
    return path


def _holds_projectors(f: Path) -> bool:
    with safe_open(f, framework="pt") as st:
        return any(k.startswith(PROJECTOR_PREFIX) for k in st.keys())


def _grow_embeddings(path: Path, vocab: int) -> int:
    """No spare embedding rows: resize once (old rows kept, placeholder rows never read), replace the LM
    weight files; returns the new vocab size."""
    import tempfile

    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    lm.resize_token_embeddings(vocab, pad_to_multiple_of=64)
    size = lm.get_input_embeddings().weight.shape[0]
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        lm.save_pretrained(tmp)
        del lm
        for f in weight_files(path):
            if f.name != PROJECTOR_FILE:
                f.unlink()  # a symlink (init --link) is removed, never written through
        for f in weight_files(Path(tmp)):
            os.replace(f, path / f.name)
    return size
