"""vLLM's input side for mmfuse checkpoints: parse items, expand placeholders, hash by content.

Data path inside vLLM (0.32 processor API):

    {"prompt" | "prompt_token_ids", "multi_modal_data": {NAME: item or [items]}}
      -> MMFuseDataParser: one subparser per modality of the checkpoint; every item goes
         through mmfuse.inputs.coerce_items (same checks and InputError as the HF backend)
         and becomes a float32 (n, input_dim) tensor, or for raw media (a modality with an
         encoder) a RawItem: the encoder's own HF preprocessor's tensors (mmfuse.encoders)
      -> MMFuseMultiModalProcessor.apply: the shared placeholder rule on token ids
         (mmfuse.inputs.place_placeholder_ids): no placeholder at all -> items first;
         otherwise placeholder/item counts must match
      -> PromptReplacement: each placeholder id becomes rows_of(spec, item) copies of itself
         (n * tokens_per_item; tokens_per_item for a resampler)
      -> the model gets {NAME}_feats per item (or {NAME}__pixel_values etc. for raw media, which
         its encoder tower turns into vectors) and projects it (see model.py)

Prefix caching: vLLM keys each item by ``hash(model_id, NAME=tensor)`` where a tensor
hashes as its dtype, shape and raw bytes (a raw item: its preprocessed tensors), and every KV block that overlaps an item
carries that item's hash. So identical text with different vectors shares KV only
before the first differing item.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        ProcessorInputs, PromptReplacement, PromptUpdate, TimingContext)

from ..config import MMFuseConfig, ModalitySpec
from ..checkpoint import placeholder_token_ids
from ..encoders import FEATURE_KEYS
from ..inputs import InputError, Item, RawItem, coerce_items, place_placeholder_ids, rows_of


def feats_key(name: str) -> str:
    """The model keyword argument that carries a modality's items."""
    return f"{name}_feats"


def raw_key(name: str, feature: str) -> str:
    """The model keyword argument that carries one preprocessed tensor of a modality's raw items."""
    return f"{name}__{feature}"


class MMFuseItems(ModalityDataItems[list[Item], Item]):
    """Validated items of one modality: float32 (n, input_dim) vectors, or raw media its encoder's HF
    preprocessor already turned into tensors (``RawItem``; one kind per request, see inputs.coerce_items)."""

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> Item:
        return self.data[index]

    def get_item_for_hash(self, index: int) -> object:
        item = self.data[index]
        # raw media hash as their preprocessed tensors: the same image gives the same key however it came
        return item.features if isinstance(item, RawItem) else item

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        if self.data and isinstance(self.data[0], RawItem):
            return {raw_key(self.modality, k): [it.features[k] for it in self.data] for k in self.data[0].features}
        return {feats_key(self.modality): self.data}


class MMFuseDataParser(MultiModalDataParser):
    """Accepts exactly the checkpoint's modality names; items shaped (d,) or (n, d), or lists of them."""

    def __init__(self, specs: Mapping[str, ModalitySpec], **kwargs) -> None:
        super().__init__(**kwargs)
        self.specs = specs

    def _parse_items(self, spec: ModalitySpec, data: object) -> MMFuseItems | None:
        if data is None:
            return None
        if isinstance(data, MediaWithBytes):  # vLLM's server wraps fetched media with their bytes
            data = data.media
        elif isinstance(data, list):
            data = [d.media if isinstance(d, MediaWithBytes) else d for d in data]
        return MMFuseItems(coerce_items({spec.name: spec}, {spec.name: data})[spec.name], spec.name)

    def _get_subparsers(self):
        return {name: (lambda data, spec=spec: self._parse_items(spec, data)) for name, spec in self.specs.items()}

    def parse_mm_data(self, mm_data: MultiModalDataDict) -> MultiModalDataItems:
        unknown = sorted(set(mm_data) - set(self.specs))
        if unknown:
            raise InputError(f"modality {unknown[0]!r} item 0: unknown modality, this checkpoint has "
                             f"{sorted(self.specs)}")
        return super().parse_mm_data(mm_data)


class MMFuseProcessingInfo(BaseProcessingInfo):
    """What the processor needs to know about a checkpoint: its modalities and placeholder ids."""

    @cached_property
    def specs(self) -> dict[str, ModalitySpec]:
        return MMFuseConfig.from_hf_config(self.get_hf_config()).modalities

    @cached_property
    def placeholder_ids(self) -> dict[str, int]:
        return placeholder_token_ids(self.get_tokenizer(), self.specs)

    def get_data_parser(self) -> MultiModalDataParser:
        return MMFuseDataParser(self.specs, expected_hidden_size=self._get_expected_hidden_size(),
                                allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {n: s.max_items for n, s in self.specs.items()}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set()}  # there is no HF processor to pass kwargs to

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # one (n, d) item may fill the whole context: n * tokens_per_item <= seq_len; a resampler's is K rows
        return {n: s.tokens_per_item if s.resamples else max(s.tokens_per_item,
                                                             seq_len // s.tokens_per_item * s.tokens_per_item)
                for n, s in self.specs.items()}


class MMFuseDummyInputsBuilder(BaseDummyInputsBuilder[MMFuseProcessingInfo]):
    """Profiling input: the largest items the context allows, one placeholder each."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(self.info.specs[n].placeholder * c for n, c in mm_counts.items())

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> MultiModalDataDict:
        data: dict[str, list[torch.Tensor]] = {}
        for name, count in mm_counts.items():
            if count:
                spec = self.info.specs[name]
                # a resampler's n is not bounded by the context: profile it with seq_len rows per item
                n = seq_len if spec.resamples else max(1, seq_len // (count * spec.tokens_per_item))
                data[name] = [torch.zeros(n, spec.input_dim)] * count
        return data


class MMFuseMultiModalProcessor(BaseMultiModalProcessor[MMFuseProcessingInfo]):
    """Checks placeholders against items, then expands each placeholder to its item's row count."""

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {key: MultiModalFieldConfig.batched(n) for n in self.info.specs
                for key in (feats_key(n), *(raw_key(n, f) for f in FEATURE_KEYS)) if key in hf_inputs}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        updates = []
        for name, items in mm_items.items():
            spec, pid = self.info.specs[name], self.info.placeholder_ids[name]
            updates.append(PromptReplacement(
                modality=name, target=[pid],
                replacement=lambda i, items=items, spec=spec, pid=pid: [pid] * rows_of(spec, items.get(i))))
        return updates

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        inputs.prompt = self._place_items(list(inputs.prompt), inputs.mm_data_items)
        return super().apply(inputs, timing_ctx)

    def _place_items(self, ids: list[int], mm_items: MultiModalDataItems) -> list[int]:
        """The shared placeholder rule (``mmfuse.inputs.place_placeholder_ids``) on token ids."""
        given = {n: len(items) for n, items in mm_items.items()}
        return place_placeholder_ids(ids, given, self.info.specs, self.info.placeholder_ids,
                                     self.info.get_tokenizer().bos_token_id)


# -- placeholders without items ----------------------------------------------------------------------------
# vLLM runs the multimodal processor above only for requests that carry multi_modal_data. A text-only
# request to vllm.LLM / AsyncLLM whose prompt (or prompt_token_ids) holds a placeholder id would otherwise
# reach the model and read the placeholder's embedding row, which the checkpoint format says is never read.
# vLLM validates every request's final token ids in InputProcessor._validate_model_input, in the frontend,
# before anything is queued: the guard below extends that check for mmfuse models (refused with the same
# InputError the transformers backend raises; the engine never sees the request).

def _placeholders_of(processor) -> dict[int, tuple[str, str]]:
    """{placeholder id: (modality, placeholder)} of an mmfuse model's InputProcessor ({} for other models)."""
    cached = getattr(processor, "_mmfuse_placeholders", None)
    if cached is None:
        hf_config = processor.model_config.hf_config
        cached = {}
        if getattr(hf_config, "mmfuse", None) is not None and processor.tokenizer is not None:
            specs = MMFuseConfig.from_hf_config(hf_config).modalities
            cached = {pid: (n, specs[n].placeholder)
                      for n, pid in placeholder_token_ids(processor.tokenizer, specs).items()}
        processor._mmfuse_placeholders = cached
    return cached


def install_placeholder_guard() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_model_input
    if getattr(original, "mmfuse_guard", False):
        return

    def _validate_model_input(self, prompt_input, prompt_type):
        original(self, prompt_input, prompt_type)
        if prompt_input.get("type") != "token":  # "multimodal": the processor checked placeholders and items
            return
        placeholders = _placeholders_of(self)
        if placeholders:
            found = placeholders.keys() & set(prompt_input["prompt_token_ids"])
            if found:
                name, text = placeholders[min(found)]
                raise InputError(f"modality {name!r} item 0: placeholder {text} #0 has no item (the request "
                                 f"carries no multi_modal_data; give the items, or remove the placeholder)")

    _validate_model_input.mmfuse_guard = True
    InputProcessor._validate_model_input = _validate_model_input


install_placeholder_guard()
