"""Backends: what runs the LM. One protocol, two implementations, one way to pick.

- ``hf.py``: plain transformers, the reference (and what training uses);
- ``vllm.py``: a client of a vLLM engine running ``mmfuse.vllm_plugin``'s model.

Both take the same ``EncodedPrompt`` (``Checkpoint.encode``: tokenized and
expanded once) and return the same ``Completion`` records. The server wraps
them in async engines (``mmfuse.server.engines``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..checkpoint import Checkpoint
from ..config import ConfigError, ModalitySpec
from ..inputs import EncodedPrompt, PreparedPrompt
from ..logs import status
from ..lora import LoraAdapter, check_request_lora
from ..sampling import Completion, SamplingConfig
from ..streaming import Delta
from .vllm_defaults import EngineOptions

BACKENDS = ("auto", "hf", "vllm")


class Backend(Protocol):
    """A loaded checkpoint that generates. ``encode`` raises InputError before anything runs."""

    name: str
    checkpoint: Checkpoint
    max_model_len: int  # the model's context length (prompt + generated tokens)
    adapters: dict[str, LoraAdapter]  # LoRA adapters a prompt may name (EncodedPrompt.lora)

    @property
    def specs(self) -> dict[str, ModalitySpec]: ...

    @property
    def tokenizer(self): ...

    def encode(self, prepared: PreparedPrompt, lora: str | None = None) -> EncodedPrompt: ...

    def generate(self, prompts: Sequence[EncodedPrompt], sampling: SamplingConfig) -> list[list[Completion]]: ...

    def stream(self, prompt: EncodedPrompt, sampling: SamplingConfig) -> Iterator[Delta]:
        """The ``n`` choices' text deltas as they are generated; joined, each equals the non-streamed text."""
        ...

    def close(self) -> None: ...


class CheckpointBackend:
    """What both backends share: the checkpoint they serve, and encoding a prompt for it."""

    checkpoint: Checkpoint
    prompt_limit: int  # most prompt tokens after items expand
    adapters: dict[str, LoraAdapter] = {}  # set per instance by backends that were given adapters

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.checkpoint.specs

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    def encode(self, prepared: PreparedPrompt, lora: str | None = None) -> EncodedPrompt:
        """Tokenize once and expand the items (``Checkpoint.encode``); InputError if the prompt can't run
        or names an adapter this backend was not given."""
        name = check_request_lora(lora, self.adapters)
        encoded = self.checkpoint.encode(prepared, self.prompt_limit)
        encoded.lora = name
        return encoded


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_backend(backend: str = "auto") -> str:
    """``"hf"`` or ``"vllm"`` for a requested backend name; ``auto`` is vLLM when importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return backend


# vLLM engine options that mean nothing to transformers, with the values that ask for nothing
ENGINE_ONLY = {f.name: f.default for f in dataclasses.fields(EngineOptions) if f.name != "dtype"}


def open_backend(model: str | os.PathLike, backend: str = "auto", **options: Any) -> Backend:
    """Load ``model`` (checkpoint directory or hub id) in the selected backend; ``options`` go to its constructor.

    vLLM engine options (``kv_cache_gb``, ``max_model_len``, ...) are refused with ``backend="hf"``
    and dropped, with a status line, when ``auto`` finds no vLLM to give them to. ``lora`` (adapters
    a request may name, ``mmfuse.lora.open_adapters``) works on both.
    """
    name = select_backend(backend)
    status(f"loading {model} ({name} backend)")
    if name == "vllm":
        from .vllm import VLLMBackend
        return VLLMBackend(model, **options)
    engine_only = sorted(k for k, v in options.items() if k in ENGINE_ONLY and v != ENGINE_ONLY[k])
    if engine_only and backend == "hf":
        raise ConfigError(f"{engine_only[0]}: a vLLM engine option; the transformers backend (backend='hf') "
                          f"does not take it")
    if engine_only:
        status(f"vLLM is not installed: running on transformers without {', '.join(engine_only)}")
    from .hf import HFBackend
    return HFBackend(model, **{k: v for k, v in options.items() if k not in ENGINE_ONLY})
