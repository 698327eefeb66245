"""``MultimodalPipeline``: one call for text + embeddings -> text, on either backend."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .backends import open_backend
from .chat import ChatOptions, read_chat_template, render_messages
from .inputs import EncodedPrompt, InputError, PreparedPrompt, prepare, user_text
from .streaming import Delta
from .sampling import Completion, SamplingConfig, check_room, check_token_ids, engine_sampling


class MultimodalPipeline:
    """Text plus named embedding modalities in, text out.

    >>> pipe = MultimodalPipeline("ckpt", backend="hf")
    >>> pipe.generate({"text": "Describe <|m1|>.",
    ...                "multimodal_data": {"multimodal_embeddings": {"m1": [vec]}}}, max_tokens=32)

    ``backend``: ``"hf"`` (transformers), ``"vllm"``, or ``"auto"`` (vLLM when importable).
    Backend options are passed through: ``device``, ``dtype``, ``lora`` (both); for vLLM
    ``max_model_len``, ``kv_cache_gb`` / ``gpu_memory_utilization``, ``tensor_parallel_size``,
    ``pipeline_parallel_size`` and any other ``vllm.LLM`` argument; for transformers
    ``quantization_config`` (quantize the LM on load: ``"torchao-int8"``, ``"bnb-8bit"``, ``"bnb-4bit"``
    or a transformers config object). ``chat_template``: a Jinja chat
    template (text or file path) for ``messages`` instead of the tokenizer's own.

    ``lora``: LoRA adapters over the checkpoint's LM, ``{name: adapter directory}`` (or one directory,
    named after it). A request runs with the adapter its ``"lora"`` field names, else the one given to
    ``generate(..., lora=NAME)``, else none; requests with different adapters share one batch.

    A request dict with ``messages`` may also carry ``chat_template_kwargs`` (e.g.
    ``{"enable_thinking": False}``), ``add_generation_prompt`` and ``continue_final_message``
    (``chat.ChatOptions``).
    """

    def __init__(self, model: str | os.PathLike, backend: str = "auto", *, chat_template: str | None = None,
                 **options: Any):
        self.backend = open_backend(model, backend, **options)
        self.specs = self.backend.specs
        self.tokenizer = self.backend.tokenizer
        self.chat_template = None if chat_template is None else read_chat_template(chat_template, self.tokenizer)

    def prepare(self, request: Mapping) -> PreparedPrompt:
        """Validate one request dict (``text`` or ``messages``, plus ``multimodal_data``)."""
        if not isinstance(request, Mapping):
            raise InputError(f"input: expected a dict with 'text' or 'messages', got {type(request).__name__}")
        mm = request.get("multimodal_data") or {}
        if not isinstance(mm, Mapping):
            raise InputError("multimodal_data: expected a dict like {'multimodal_embeddings': {NAME: [items]}}")
        embeddings = mm.get("multimodal_embeddings")
        allow = request.get("allow_special_tokens", False)  # special-token strings in the text act as such
        if not isinstance(allow, bool):
            raise InputError(f"allow_special_tokens: expected True or False, got {type(allow).__name__}")
        if "messages" in request:
            options = ChatOptions(self.chat_template, request.get("chat_template_kwargs") or {},
                                  request.get("add_generation_prompt"), request.get("continue_final_message", False))
            text, embeddings = render_messages(request["messages"], self.tokenizer, self.specs, embeddings, allow,
                                               options)
        elif "text" in request:
            text = user_text("text", request["text"], self.tokenizer, self.specs, allow)
        else:
            raise InputError("input: expected a 'text' or a 'messages' field")
        return prepare(text, embeddings, self.specs)

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters a request may pick."""
        return list(self.backend.adapters)

    def encode(self, request: Mapping, lora: str | None = None) -> EncodedPrompt:
        """Validate and tokenize one request dict: what the backend runs (with its adapter: the request's
        ``"lora"`` field, else ``lora``)."""
        prepared = self.prepare(request)
        return self.backend.encode(prepared, request.get("lora", lora))

    def generate_completions(self, inputs: Mapping | Sequence[Mapping], sampling: SamplingConfig,
                             lora: str | None = None) -> list[list[Completion]]:
        """Full records (text, token ids, finish reason, logprobs) for each input, ``n`` each."""
        batch = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        encoded = [self.encode(r, lora) for r in batch]
        for e in encoded:  # max_tokens must fit after each prompt
            check_room(sampling, e.num_tokens, self.backend.max_model_len)
        check_token_ids(sampling, self.backend.checkpoint.vocab_size)
        results = self.backend.generate(encoded, engine_sampling(sampling))
        return [cs if len(cs) == sampling.n else [dataclasses.replace(cs[0]) for _ in range(sampling.n)]
                for cs in results]

    def generate(self, inputs: Mapping | Sequence[Mapping], max_tokens: int | None = None, *,
                 max_new_tokens: int | None = None, lora: str | None = None, **sampling: Any) -> Any:
        """Generate text. One dict in -> a str (a list of n str when n > 1); a list in -> a list of those.

        ``sampling``: any ``SamplingConfig`` field (``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
        ``presence_penalty``, ``logit_bias``, ...); an unknown name is an ``InputError`` naming it.
        ``lora``: the adapter for inputs that name none themselves (their ``"lora"`` field)."""
        config = self._sampling(max_tokens, max_new_tokens, sampling)
        results = self.generate_completions(inputs, config, lora)
        texts = [[c.text for c in cs] if config.n > 1 else cs[0].text for cs in results]
        return texts[0] if isinstance(inputs, Mapping) else texts

    def stream(self, inputs: Mapping, max_tokens: int | None = None, *, max_new_tokens: int | None = None,
               lora: str | None = None, **sampling: Any) -> Iterator[str]:
        """Generate text for one input dict, yielding it in pieces as it is generated; the pieces join to
        what ``generate`` returns for the same input and options (``n`` must be 1)."""
        config = self._sampling(max_tokens, max_new_tokens, sampling)
        if config.n != 1:
            raise InputError(f"n: stream yields one completion's text, got n={config.n}; use generate", "n")
        for delta in self.stream_deltas(inputs, config, lora):
            if delta.text:
                yield delta.text

    def stream_deltas(self, inputs: Mapping, sampling: SamplingConfig, lora: str | None = None) -> Iterator[Delta]:
        """Full deltas (choice index, text, token ids, logprobs, finish reason) for one input, ``n`` choices."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"input: stream takes one dict, got {type(inputs).__name__}")
        encoded = self.encode(inputs, lora)
        check_room(sampling, encoded.num_tokens, self.backend.max_model_len)
        check_token_ids(sampling, self.backend.checkpoint.vocab_size)
        deltas = self.backend.stream(encoded, engine_sampling(sampling))
        if engine_sampling(sampling).n == sampling.n:
            return deltas
        # greedy n > 1 is generated once: each delta stands for every choice
        return (dataclasses.replace(d, index=i) for d in deltas for i in range(sampling.n))

    @staticmethod
    def _sampling(max_tokens: int | None, max_new_tokens: int | None, fields: dict) -> SamplingConfig:
        if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
            raise InputError("max_tokens: give max_tokens or max_new_tokens, not both", "max_tokens")
        limit = max_tokens if max_tokens is not None else max_new_tokens
        # SamplingConfig checks every value (exact types and ranges) and raises InputError naming it
        return SamplingConfig.from_fields(max_tokens=64 if limit is None else limit, **fields)

    def close(self) -> None:
        """Release the backend (stops a vLLM engine's processes now rather than at exit)."""
        self.backend.close()

    def __enter__(self) -> "MultimodalPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
