"""Projector kinds: one module per modality, mapping an item's (n, input_dim) vectors to soft
tokens in the LM's hidden size. Shared by the transformers and vLLM backends through one
function, ``project_items``, so both compute exactly the same rows from the same weights.

Kinds (the ``projector`` field of a ModalitySpec; costs and measurements in docs/projectors.md):

- ``linear``: one Linear, n * K rows per item (K = tokens_per_item).
- ``mlp{N}x_{act}``: N Linears with act (gelu, silu, relu, tanh, quick_gelu) between them,
  n * K rows; ``mlp2x_gelu`` is LLaVA-1.5's projector and the default.
- ``identity``: vectors already in the LM's hidden size pass through unchanged, n rows.
- ``resampler``: K learned queries cross-attend over the item's n rows (Perceiver resampler /
  Q-Former style), exactly K rows whatever n is.

Weight names: the MLP kinds are an nn.Sequential (``mm_projectors.NAME.0.weight``, ``.2.weight``, ...,
as LLaVA's ``mm_projector.0.weight``); the resampler's are ``proj_in``, ``queries``,
``blocks.I.*``, ``norm_out``, ``proj_out``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import MLP_KIND, RESAMPLER_DEFAULTS, ConfigError, ModalitySpec


class Projector(nn.Sequential):
    """The per-vector kinds (linear, mlp{N}x_{act}, identity): each vector -> ``tokens_per_item`` rows."""

    def __init__(self, layers: list[nn.Module], tokens_per_item: int, out_dim: int):
        super().__init__(*layers)
        self.tokens_per_item = tokens_per_item
        self.out_dim = out_dim
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, input_dim] -> [n, k * H] -> [n * k, H]; rows of one vector stay contiguous
        return super().forward(x).reshape(-1, self.out_dim)

    def project_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        # one call over every row of every item (the fast path), then split back per item
        rows = self(torch.cat(items).to(self.anchor.device, self.anchor.dtype))
        return list(rows.split([x.shape[0] * self.tokens_per_item for x in items]))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's GELU approximation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "quick_gelu": QuickGELU}


def sinusoidal_positions(n: int, dim: int, device, dtype) -> torch.Tensor:
    """[n, dim] Transformer sinusoids over row index 0..n-1: no parameters and no largest n."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device, dtype=torch.float32)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe.to(dtype)


class CrossAttentionBlock(nn.Module):
    """Queries attend to an item's rows, then a feed-forward; pre-norm, residual around each."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.o = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # q: [B, K, D] queries; x: [B, n, D] rows; keep: [B, n] True for real rows, False for padding
        B, K, D = q.shape
        h = self.heads
        query = self.q(self.norm_q(q)).view(B, K, h, D // h).transpose(1, 2)  # [B, h, K, D/h]
        key, value = self.kv(self.norm_kv(x)).view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)  # [B, h, n, D/h]
        scores = query @ key.transpose(-1, -2) / math.sqrt(D // h)  # [B, h, K, n]
        # padding keys get exactly zero weight, so a padded batch equals each item alone
        attn = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        q = q + self.o((attn @ value).transpose(1, 2).reshape(B, K, D))
        return q + self.ff(self.norm_ff(q))


# the resampler's default width: its blocks cost ~12 D^2 parameters each, so D = 4096 (a 7B LM's
# hidden size) would make a 424M-parameter projector; 1024 keeps it near 30M whatever the LM
RESAMPLER_WIDTH = 1024


class Resampler(nn.Module):
    """K learned queries cross-attend over an item's rows for L blocks: (n, d) -> (K, H) for any n.

    Rows are projected to the width D (``hidden_dim``, default min(LM hidden size, 1024)), given
    sinusoidal positions over their index (order matters, no largest n), and read by the
    queries through ``resampler_layers`` blocks (``resampler_heads`` heads each); a final
    LayerNorm and Linear map the K queries to the LM's hidden size.
    """

    def __init__(self, spec: ModalitySpec, lm_hidden: int):
        super().__init__()
        dim = spec.hidden_dim or min(lm_hidden, RESAMPLER_WIDTH)
        layers = spec.resampler_layers or RESAMPLER_DEFAULTS["resampler_layers"]
        heads = spec.resampler_heads or RESAMPLER_DEFAULTS["resampler_heads"]
        if dim % heads or dim % 2:
            raise ConfigError(f"modality {spec.name!r}: resampler width hidden_dim={dim} must be even and "
                              f"divisible by resampler_heads={heads}")
        self.tokens_per_item, self.out_dim = spec.tokens_per_item, lm_hidden
        self.proj_in = nn.Linear(spec.input_dim, dim)
        self.queries = nn.Parameter(torch.randn(spec.tokens_per_item, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, lm_hidden)
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: [B, n, input_dim] (padded), keep: [B, n] -> [B, K, H]
        h = self.proj_in(x)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        q = self.queries.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, h, keep)
        return self.proj_out(self.norm_out(q))

    def project_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        # pad the batch to its longest item and mask the padding keys: one call for all items
        items = [x.to(self.anchor.device, self.anchor.dtype) for x in items]
        x = nn.utils.rnn.pad_sequence(items, batch_first=True)  # [B, n_max, d], zeros after each item
        lengths = torch.tensor([t.shape[0] for t in items], device=x.device)
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return list(self(x, keep).unbind(0))


def project_items(projector: nn.Module, items: list[torch.Tensor]) -> list[torch.Tensor]:
    """Soft-token rows of each item, in order: ``[rows_of(spec, item), H]`` per item (mmfuse.inputs.rows_of).

    items: float tensors ``[n_i, input_dim]``, cast to the projector's device and dtype. Both backends
    call this (``MMFuseModel.project``, the vLLM model's ``embed_multimodal``).
    """
    return projector.project_items(list(items)) if len(items) else []


def _mlp_layers(spec: ModalitySpec, lm_hidden: int) -> list[nn.Module]:
    depth, act = MLP_KIND.match(spec.projector).groups()
    mid = spec.hidden_dim or lm_hidden
    sizes = [spec.input_dim] + [mid] * (int(depth) - 1) + [lm_hidden * spec.tokens_per_item]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([ACTIVATIONS[act]()] if i < len(sizes) - 2 else [])
    return layers


def _identity_layers(spec: ModalitySpec, lm_hidden: int) -> list[nn.Module]:
    if spec.input_dim != lm_hidden:
        raise ConfigError(f"modality {spec.name!r}: an identity projector needs input_dim equal to the LM hidden "
                          f"size {lm_hidden}, got {spec.input_dim}")
    return []


# kind -> builder; mlp{N}x_{act} is matched by config.MLP_KIND (LLaVA builder.py style)
PROJECTORS = {
    "linear": lambda spec, h: Projector([nn.Linear(spec.input_dim, h * spec.tokens_per_item)], spec.tokens_per_item, h),
    "mlp": lambda spec, h: Projector(_mlp_layers(spec, h), spec.tokens_per_item, h),
    "identity": lambda spec, h: Projector(_identity_layers(spec, h), 1, h),
    "resampler": Resampler,
}


def build_projector(spec: ModalitySpec, lm_hidden: int) -> nn.Module:
    """Build the (randomly initialised) projector a spec describes."""
    return PROJECTORS["mlp" if MLP_KIND.match(spec.projector) else spec.projector](spec, lm_hidden)


def resolve_spec(spec: ModalitySpec, lm_hidden: int) -> ModalitySpec:
    """Fill the sizes a checkpoint's config should state (so the file says what the weights are) and
    check the spec against the LM: ``hidden_dim`` of MLPs and resamplers, the resampler's layers and heads."""
    if MLP_KIND.match(spec.projector):
        spec.hidden_dim = spec.hidden_dim or lm_hidden
    if spec.resamples:
        spec.hidden_dim = spec.hidden_dim or min(lm_hidden, RESAMPLER_WIDTH)
        for key, value in RESAMPLER_DEFAULTS.items():
            setattr(spec, key, getattr(spec, key) or value)
    with torch.device("meta"):  # the builders' checks (identity size, heads), without allocating
        build_projector(spec, lm_hidden)
    return spec


def build_projectors(specs: dict[str, ModalitySpec], lm_hidden: int) -> nn.ModuleDict:
    return nn.ModuleDict({name: build_projector(spec, lm_hidden) for name, spec in specs.items()})
