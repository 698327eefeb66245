"""Projector modules: one per modality, mapping (n, input_dim) vectors to
(n * tokens_per_item, lm_hidden) rows. Shared by the transformers and vLLM
backends, so both compute exactly the same rows from the same weights.

Weights are saved as ``mm_projectors.NAME.<index>.weight`` (nn.Sequential
numbering, as in LLaVA's ``mm_projector.0.weight``).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModalitySpec


class Projector(nn.Sequential):
    """An nn.Sequential whose last layer emits ``tokens_per_item`` rows per vector."""

    def __init__(self, layers: list[nn.Module], tokens_per_item: int, out_dim: int):
        super().__init__(*layers)
        self.tokens_per_item = tokens_per_item
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, input_dim] -> [n, k * H] -> [n * k, H]; rows of one vector stay contiguous
        return super().forward(x).reshape(-1, self.out_dim)


def _linear(spec: ModalitySpec, lm_hidden: int) -> list[nn.Module]:
    return [nn.Linear(spec.input_dim, lm_hidden * spec.tokens_per_item)]


def _mlp2x_gelu(spec: ModalitySpec, lm_hidden: int) -> list[nn.Module]:
    mid = spec.hidden_dim or lm_hidden
    return [nn.Linear(spec.input_dim, mid), nn.GELU(), nn.Linear(mid, lm_hidden * spec.tokens_per_item)]


PROJECTORS = {"linear": _linear, "mlp2x_gelu": _mlp2x_gelu}


def build_projector(spec: ModalitySpec, lm_hidden: int) -> Projector:
    """Build the (randomly initialised) projector a spec describes."""
    return Projector(PROJECTORS[spec.projector](spec, lm_hidden), spec.tokens_per_item, lm_hidden)


def build_projectors(specs: dict[str, ModalitySpec], lm_hidden: int) -> nn.ModuleDict:
    return nn.ModuleDict({name: build_projector(spec, lm_hidden) for name, spec in specs.items()})
