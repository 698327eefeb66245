"""Modality specs and the `mmfuse` section of a checkpoint's config.json.

A checkpoint is a normal Hugging Face model directory; what makes it mmfuse is
one extra section, ``{"format_version": 1, "modalities": {NAME: spec}}``, and an
``architectures`` entry naming the wrapper class for the base (``MMFuse`` +
the base architecture). Everything here is plain data, validated once.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from typing import Any

FORMAT_VERSION = 1
ARCH_PREFIX = "MMFuse"
NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
# projector kinds (built in mmfuse.projectors): mlp{N}x_{act} is a family, matched by MLP_KIND
PROJECTOR_KINDS = ("linear", "mlp2x_gelu", "mlp{N}x_{act}", "identity", "resampler")
MLP_KIND = re.compile(r"mlp(\d+)x_(gelu|silu|relu|tanh|quick_gelu)\Z")
RESAMPLER_DEFAULTS = {"resampler_layers": 2, "resampler_heads": 8}  # small: 2 blocks, 8 heads


def check_projector_kind(kind: object) -> str | None:
    """Why ``kind`` is not a projector kind (None when it is): ``linear``, ``identity``, ``resampler``,
    or ``mlp{N}x_{act}`` with N >= 2 linear layers and act in gelu, silu, relu, tanh, quick_gelu."""
    if kind in ("linear", "identity", "resampler"):
        return None
    m = MLP_KIND.match(kind) if isinstance(kind, str) else None
    if m is None:
        return ("is not one of linear, mlp{N}x_{act} (e.g. mlp2x_gelu; act: gelu, silu, relu, tanh, quick_gelu), "
                "identity, resampler")
    return None if int(m.group(1)) >= 2 else "needs N >= 2 linear layers (one layer is `linear`)"


class ConfigError(ValueError):
    """A checkpoint or modality spec is malformed."""


# encoder kinds (built in mmfuse.encoders) -> the raw media they take; `auto` reads it off the model's
# preprocessor when loaded (image processor -> image, audio feature extractor -> audio, else text)
ENCODER_MEDIA = {"clip_vision": "image", "siglip_vision": "image", "whisper": "audio",
                 "sentence_transformers": "text", "auto": None}
ENCODER_OUTPUTS = ("pooled", "sequence")


@dataclass
class EncoderSpec:
    """A frozen encoder that turns a modality's raw media into its vectors.

    ``source``: a hub id, an absolute path, or a path relative to the checkpoint directory
    (``encoders/NAME``, where ``mmfuse init`` copies a local encoder). ``output``: ``pooled`` (one
    vector per item) or ``sequence`` (one vector per patch / audio frame / token).
    """

    source: str
    kind: str
    output: str = "pooled"
    # where `source` was found (the checkpoint's directory for a relative source); set when a checkpoint
    # is opened, never written to config.json
    root: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"encoder source must be a hub id or path, got {self.source!r}")
        if self.kind not in ENCODER_MEDIA:
            raise ConfigError(f"encoder kind {self.kind!r} is not one of {', '.join(ENCODER_MEDIA)}")
        if self.output not in ENCODER_OUTPUTS:
            raise ConfigError(f"encoder output {self.output!r} is not one of {', '.join(ENCODER_OUTPUTS)}")

    @classmethod
    def from_dict(cls, data: Any) -> "EncoderSpec":
        if isinstance(data, EncoderSpec):
            return data
        if not isinstance(data, dict) or set(data) - {"source", "kind", "output"} or not {"source", "kind"} <= set(data):
            raise ConfigError(f"encoder must be {{'source': ..., 'kind': ..., 'output': 'pooled'|'sequence'}}, "
                              f"got {data!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "kind": self.kind, "output": self.output}


@dataclass
class ModalitySpec:
    """One named embedding modality: what its vectors look like and how they enter the LM."""

    name: str
    input_dim: int  # size of one vector from the user's encoder
    projector: str = "mlp2x_gelu"  # LLaVA-1.5 default: Linear-GELU-Linear
    hidden_dim: int | None = None  # MLP intermediate size; None = LM hidden size (resolved at init)
    tokens_per_item: int = 1  # soft tokens per input vector
    placeholder: str | None = None  # None = "<|NAME|>"
    max_items: int = 16  # bounds prompt growth and engine memory per request
    # resampler only (None for other kinds; RESAMPLER_DEFAULTS when omitted): cross-attention blocks, heads
    resampler_layers: int | None = None
    resampler_heads: int | None = None
    encoder: EncoderSpec | None = None  # raw media in (images, audio, text) besides vectors

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ConfigError(f"modality name {self.name!r} must match [a-z][a-z0-9_]*")
        if self.encoder is not None:
            try:
                self.encoder = EncoderSpec.from_dict(self.encoder)
            except ConfigError as e:
                raise ConfigError(f"modality {self.name!r}: {e}") from None
        if self.placeholder is None:
            self.placeholder = f"<|{self.name}|>"
        for key in ("input_dim", "tokens_per_item", "max_items"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"modality {self.name!r}: {key} must be a positive int, got {value!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim < 1):
            raise ConfigError(f"modality {self.name!r}: hidden_dim must be a positive int, got {self.hidden_dim!r}")
        why = check_projector_kind(self.projector)
        if why:
            raise ConfigError(f"modality {self.name!r}: projector {self.projector!r} {why}")
        for key in RESAMPLER_DEFAULTS:
            value = getattr(self, key)
            if value is not None and (self.projector != "resampler" or not isinstance(value, int)
                                      or isinstance(value, bool) or value < 1):
                raise ConfigError(f"modality {self.name!r}: {key} must be a positive int for a resampler "
                                  f"(and unset for other kinds), got {value!r} with projector {self.projector!r}")
        if self.projector == "identity" and (self.tokens_per_item != 1 or self.hidden_dim is not None):
            raise ConfigError(f"modality {self.name!r}: an identity projector passes vectors through: "
                              f"tokens_per_item must be 1 and hidden_dim unset")
        if not self.placeholder or any(ch.isspace() for ch in self.placeholder):
            raise ConfigError(f"modality {self.name!r}: placeholder {self.placeholder!r} must be non-empty without spaces")

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> "ModalitySpec":
        unknown = set(data) - {f for f in cls.__dataclass_fields__ if f != "name"}
        if unknown:
            raise ConfigError(f"modality {name!r}: unknown fields {sorted(unknown)}")
        return cls(name=name, **data)

    @property
    def resamples(self) -> bool:
        """True when any (n, d) item becomes exactly ``tokens_per_item`` rows (else n * tokens_per_item)."""
        return self.projector == "resampler"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        if self.encoder is None:  # written only when set: checkpoints without encoders stay as they were
            d.pop("encoder")
        else:
            d["encoder"] = self.encoder.to_dict()
        for key in RESAMPLER_DEFAULTS:  # written only for a resampler: other kinds' files stay as they were
            if d[key] is None:
                d.pop(key)
        return d


@dataclass
class MMFuseConfig:
    """The ``mmfuse`` section: the ordered modalities of one checkpoint."""

    modalities: dict[str, ModalitySpec] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"mmfuse format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if not self.modalities:
            raise ConfigError("an mmfuse checkpoint needs at least one modality")
        placeholders = [s.placeholder for s in self.modalities.values()]
        if len(set(placeholders)) != len(placeholders):
            raise ConfigError(f"placeholders must be unique, got {placeholders}")
        for name, spec in self.modalities.items():
            if spec.name != name:
                raise ConfigError(f"modality key {name!r} does not match spec name {spec.name!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MMFuseConfig":
        if not isinstance(data, dict) or "modalities" not in data:
            raise ConfigError("config.json has no valid 'mmfuse' section with 'modalities'")
        mods = {n: ModalitySpec.from_dict(n, s) for n, s in data["modalities"].items()}
        return cls(modalities=mods, format_version=data.get("format_version", FORMAT_VERSION))

    @classmethod
    def from_hf_config(cls, hf_config: Any, root: str | None = None) -> "MMFuseConfig":
        """Read the section from a transformers ``PretrainedConfig`` (or a dict).

        ``root``: the checkpoint's directory, against which encoder sources are resolved (default: the
        directory the config was loaded from, its ``name_or_path``)."""
        section = hf_config.get("mmfuse") if isinstance(hf_config, dict) else getattr(hf_config, "mmfuse", None)
        if section is None:
            raise ConfigError("not an mmfuse checkpoint: config.json has no 'mmfuse' section (run `mmfuse init`)")
        config = cls.from_dict(section)
        root = root or getattr(hf_config, "name_or_path", None)
        for spec in config.modalities.values():
            if spec.encoder is not None:
                spec.encoder.root = str(root) if root else None
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version,
                "modalities": {n: s.to_dict() for n, s in self.modalities.items()}}


MODALITY_SYNTAX = "NAME:DIM[:PROJECTOR][,tokens=K][,hidden=H][,placeholder=P][,max_items=N]"
# option keys of the CLI form -> ModalitySpec fields (the field names are accepted too)
MODALITY_OPTIONS = {"tokens": "tokens_per_item", "tokens_per_item": "tokens_per_item", "hidden": "hidden_dim",
                    "hidden_dim": "hidden_dim", "placeholder": "placeholder", "max_items": "max_items",
                    "layers": "resampler_layers", "resampler_layers": "resampler_layers",
                    "heads": "resampler_heads", "resampler_heads": "resampler_heads"}


def parse_modality_arg(arg: str, dims: Mapping[str, int] | None = None) -> ModalitySpec:
    """Parse the CLI form ``NAME:DIM[:PROJECTOR][,tokens=K][,hidden=H][,placeholder=P][,max_items=N]``.

    ``vision:768`` -> 768-d vectors, mlp2x_gelu, 1 token each; ``audio:128:linear,tokens=4,max_items=8``;
    ``protein:1280,hidden=2048,placeholder=<prot>``. Options come after commas as ``key=value``
    (``tokens``/``tokens_per_item``, ``hidden``/``hidden_dim``, ``placeholder``, ``max_items``), in any order.
    A malformed piece raises ``ConfigError`` naming that piece and the expected form. ``dims``: the
    input size of modalities whose DIM may be left out (those with an encoder: ``image``, ``image::resampler``).
    """
    def bad(piece: str, why: str) -> ConfigError:
        return ConfigError(f"--modality {arg!r}: {piece!r} {why}; expected {MODALITY_SYNTAX}, "
                           f"e.g. vision:768 or audio:128:linear,tokens=4")

    if not isinstance(arg, str) or not arg.strip():
        raise ConfigError(f"--modality {arg!r}: empty; expected {MODALITY_SYNTAX}")
    head, *options = [piece.strip() for piece in arg.split(",")]
    parts = head.split(":")
    dims = dims or {}
    if parts[0] in dims and (len(parts) == 1 or not parts[1]):
        parts = [parts[0], str(dims[parts[0]]), *parts[2:]]
    if len(parts) < 2:
        raise bad(head, "has no DIM (write NAME:DIM, or attach an encoder with --encoder NAME=SOURCE)")
    if len(parts) > 3:
        raise bad(head, "has more than NAME:DIM:PROJECTOR")
    name, dim = parts[0], parts[1]
    if not NAME_RE.match(name):
        raise bad(name, "is not a valid modality name ([a-z][a-z0-9_]*)")
    if not dim.isdigit() or int(dim) < 1:
        raise bad(dim, "is not a positive integer DIM")
    kwargs: dict[str, Any] = {"name": name, "input_dim": int(dim)}
    if len(parts) == 3:
        kwargs["projector"] = parts[2]  # checked by ModalitySpec (the error names it)
    for piece in options:
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise bad(piece, "is not key=value")
        if key not in MODALITY_OPTIONS:
            raise bad(piece, f"has an unknown key {key!r} (known: {', '.join(MODALITY_OPTIONS)})")
        field_name = MODALITY_OPTIONS[key]
        if field_name in kwargs:
            raise bad(piece, f"sets {field_name} a second time")
        if not value:
            raise bad(piece, "has no value")
        if field_name == "placeholder":
            kwargs[field_name] = value
        elif value.isdigit() and int(value) >= 1:
            kwargs[field_name] = int(value)
        else:
            raise bad(piece, f"needs a positive integer for {field_name}")
    try:
        return ModalitySpec(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"--modality {arg!r}: {e}") from None


ENCODER_SYNTAX = "NAME=SOURCE[:pooled|sequence]"


def parse_encoder_arg(arg: str) -> tuple[str, str, str]:
    """The CLI form ``NAME=SOURCE[:pooled|sequence]`` -> (name, source, output); the kind is read off the
    source later (``mmfuse.encoders.encoder_spec``)."""
    name, sep, source = arg.partition("=")
    output = "pooled"
    head, colon, tail = source.rpartition(":")
    if colon and tail in ENCODER_OUTPUTS:
        source, output = head, tail
    if not sep or not NAME_RE.match(name.strip()) or not source.strip():
        raise ConfigError(f"--encoder {arg!r}: expected {ENCODER_SYNTAX}, e.g. image=openai/clip-vit-base-patch32 "
                          f"or audio=./whisper-tiny:sequence")
    return name.strip(), source.strip(), output


def wrapper_architecture(base_architecture: str) -> str:
    """``Qwen3ForCausalLM`` -> ``MMFuseQwen3ForCausalLM``."""
    return base_architecture if base_architecture.startswith(ARCH_PREFIX) else ARCH_PREFIX + base_architecture


def base_architecture(architecture: str) -> str:
    return architecture[len(ARCH_PREFIX):] if architecture.startswith(ARCH_PREFIX) else architecture
