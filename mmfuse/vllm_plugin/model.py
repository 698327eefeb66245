"""The vLLM model for mmfuse checkpoints: vLLM's own base LM plus the shared projectors.

One class serves every supported base: the checkpoint's ``architectures`` entry
(``MMFuse<Base>``) names the base, and vLLM's registered model for that base is
built inside as ``language_model``. Weights map as

    model.*          -> language_model.model.*
    lm_head.*        -> language_model.lm_head.*   (skipped by the base when tied)
    mm_projectors.*  -> mm_projectors.*            (mmfuse.projectors.build_projectors)
    encoders.NAME.*  <- the encoder's own safetensors (encoders/NAME/ or its hub snapshot)

vLLM computes ``embed_multimodal`` per batch of items of one modality, caches the
rows by item hash, and scatters them over the placeholder positions
(``SupportsMultiModal.embed_input_ids``) before running the unchanged LM.

LoRA (``SupportsLoRA``) is the base's too: an adapter's ``base_model.model.model.*`` names map
like the weights, to ``language_model.model.*``; projectors and encoders are never adapted.

Parallelism is the base model's: under tensor parallelism vLLM shards ``language_model``
and every rank holds the (small) projectors and encoders whole; under pipeline
parallelism (``SupportsPP``) the embeddings and projected rows are made on the first
stage, which alone holds the embedding table, and the base's own layers are split
across stages, ``forward`` passing ``intermediate_tensors`` through.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper, init_vllm_registered_model,
                                              maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..checkpoint import SUPPORTED_BASES
from ..config import ConfigError, MMFuseConfig, base_architecture
from ..encoders import FEATURE_KEYS, EncoderTower, run_batched
from ..projectors import build_projectors, project_items
from .processing import (MMFuseDummyInputsBuilder, MMFuseMultiModalProcessor, MMFuseProcessingInfo, feats_key,
                         raw_key)


@MULTIMODAL_REGISTRY.register_processor(MMFuseMultiModalProcessor, info=MMFuseProcessingInfo,
                                        dummy_inputs=MMFuseDummyInputsBuilder)
class MMFuseForCausalLM(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    """A supported causal LM (Qwen3/Qwen2/Llama/Mistral) with one projector per named modality."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model.",
                                                          "lm_head.": "language_model.lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # vLLM's own chat server turns image_url / input_audio parts into the `image` / `audio` modality and
        # puts this string where the part was. Placeholders are per checkpoint (spec.placeholder), which a
        # class method can't see: this is the default one, <|NAME|>. With another, the items go first.
        return f"<|{modality}|>"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        base = base_architecture((config.architectures or ["?"])[0])
        if base not in SUPPORTED_BASES:
            raise ConfigError(f"mmfuse: base architecture {base!r} is not supported; supported: {SUPPORTED_BASES}")
        self.specs = MMFuseConfig.from_hf_config(config).modalities
        self.config = config  # vLLM's LoRA manager reads model.config
        with self._mark_tower_model(vllm_config, set(self.specs)):
            self.mm_projectors = build_projectors(self.specs, config.get_text_config().hidden_size)
            # frozen encoders, replicated on every rank; weights from their own files (load_weights)
            self.encoders = nn.ModuleDict({n: EncoderTower(s.encoder) for n, s in self.specs.items()
                                           if s.encoder is not None})
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config,
                                                             architectures=[base],
                                                             prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # LoRA is the base's: its embedding modules; packed_modules_mapping (qkv_proj <- q/k/v_proj ...) is left
        # empty here, so vLLM takes it from this child (vllm.model_executor.utils.get_packed_modules_mapping)
        self.embedding_modules = self.language_model.embedding_modules

    def get_mm_mapping(self) -> MultiModelKeys:
        """For vLLM's LoRA manager: adapters apply to ``language_model`` only, never to the projectors or
        encoders (their weights are the checkpoint's for every request)."""
        return MultiModelKeys.from_string_field(language_model="language_model", connector="mm_projectors",
                                                tower_model="encoders")

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Rows for each item in the batch, in item order: a list of [rows_of(spec, item), H].

        vLLM calls this per group of items of one modality with the same fields: vectors
        (``{NAME}_feats``) or raw media (``{NAME}__pixel_values`` ...), never both."""
        out: list[torch.Tensor] = []
        for name, proj in self.mm_projectors.items():
            feats = kwargs.get(feats_key(name))
            if feats is not None:
                # stacked [B, n, d] when all items have the same n, else a list of [n_i, d]
                out.extend(project_items(proj, list(feats)))
            raw = {f: kwargs[raw_key(name, f)] for f in FEATURE_KEYS if raw_key(name, f) in kwargs}
            if raw:
                count = len(next(iter(raw.values())))
                items = [{f: v[i] for f, v in raw.items()} for i in range(count)]
                out.extend(project_items(proj, run_batched(self.encoders[name], items)))
        return out

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        for name, tower in self.encoders.items():  # an encoder's weights live in its own directory
            loaded |= {f"encoders.{name}.{k}" for k in tower.load_weights()}
        return loaded
