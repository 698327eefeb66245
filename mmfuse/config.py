"""Modality specs and the `mmfuse` section of a checkpoint's config.json.

A checkpoint is a normal Hugging Face model directory; what makes it mmfuse is
one extra section, ``{"format_version": 1, "modalities": {NAME: spec}}``, and an
``architectures`` entry naming the wrapper class for the base (``MMFuse`` +
the base architecture). Everything here is plain data, validated once.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
ARCH_PREFIX = "MMFuse"
NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")


class ConfigError(ValueError):
    """A checkpoint or modality spec is malformed."""


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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ConfigError(f"modality name {self.name!r} must match [a-z][a-z0-9_]*")
        if self.placeholder is None:
            self.placeholder = f"<|{self.name}|>"
        for key in ("input_dim", "tokens_per_item", "max_items"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"modality {self.name!r}: {key} must be a positive int, got {value!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim < 1):
            raise ConfigError(f"modality {self.name!r}: hidden_dim must be a positive int, got {self.hidden_dim!r}")
        if self.projector not in PROJECTOR_KINDS:
            raise ConfigError(f"modality {self.name!r}: projector {self.projector!r} is not one of {PROJECTOR_KINDS}")
        if not self.placeholder or any(ch.isspace() for ch in self.placeholder):
            raise ConfigError(f"modality {self.name!r}: placeholder {self.placeholder!r} must be non-empty without spaces")

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> "ModalitySpec":
        unknown = set(data) - {f for f in cls.__dataclass_fields__ if f != "name"}
        if unknown:
            raise ConfigError(f"modality {name!r}: unknown fields {sorted(unknown)}")
        return cls(name=name, **data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
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
    def from_hf_config(cls, hf_config: Any) -> "MMFuseConfig":
        """Read the section from a transformers ``PretrainedConfig`` (or a dict)."""
        section = hf_config.get("mmfuse") if isinstance(hf_config, dict) else getattr(hf_config, "mmfuse", None)
        if section is None:
            raise ConfigError("not an mmfuse checkpoint: config.json has no 'mmfuse' section (run `mmfuse init`)")
        return cls.from_dict(section)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version,
                "modalities": {n: s.to_dict() for n, s in self.modalities.items()}}


def parse_modality_arg(arg: str) -> ModalitySpec:
    """Parse the CLI form ``NAME:DIM[:PROJECTOR]``."""
    parts = arg.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise ConfigError(f"--modality {arg!r}: expected NAME:DIM[:PROJECTOR], e.g. vision:768:mlp2x_gelu")
    kwargs: dict[str, Any] = {"name": parts[0], "input_dim": int(parts[1])}
    if len(parts) == 3:
        kwargs["projector"] = parts[2]
    return ModalitySpec(**kwargs)


def wrapper_architecture(base_architecture: str) -> str:
    """``Qwen3ForCausalLM`` -> ``MMFuseQwen3ForCausalLM``."""
    return base_architecture if base_architecture.startswith(ARCH_PREFIX) else ARCH_PREFIX + base_architecture


def base_architecture(architecture: str) -> str:
    return architecture[len(ARCH_PREFIX):] if architecture.startswith(ARCH_PREFIX) else architecture
