"""The server's engines: thin async wrappers over the backends (``mmfuse.backends``).

An engine takes one validated request at a time, asynchronously:
``await encode(prepared)`` (tokenized once, off the event loop; InputError when
the model cannot take it), ``await generate(encoded, sampling)`` -> ``n``
``Completion``s, ``stream(encoded, sampling)`` -> ``Delta``s, ``await close()``
(finishes what was accepted, then stops). Batching across requests is the
engine's business: a queue that runs equal-settings requests as one batch over
``HFBackend`` (``hf.HFEngine``), vLLM's own continuous batching in ``AsyncLLM``
(``vllm.VLLMEngine``, sharing ``mmfuse.backends.vllm``'s request helpers).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor

from ...backends import select_backend
from ...backends.vllm_defaults import EngineOptions
from ...checkpoint import Checkpoint
from ...config import ConfigError
from ...inputs import EncodedPrompt, PreparedPrompt
from ...streaming import Delta  # noqa: F401  (the engines' stream unit, re-exported)
from ..settings import ServerSettings


class PromptEncoder:
    """``Checkpoint.encode`` off the event loop, on one thread that owns its own tokenizer copy
    (a fast tokenizer used from two threads at once can fail with "Already borrowed")."""

    def __init__(self, checkpoint: Checkpoint, max_len: int):
        self.checkpoint = dataclasses.replace(checkpoint, tokenizer=copy.deepcopy(checkpoint.tokenizer))
        self.max_len = max_len
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mmfuse-encode")

    async def __call__(self, prepared: PreparedPrompt) -> EncodedPrompt:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.checkpoint.encode, prepared,
                                                                self.max_len)


def engine_options(settings: ServerSettings) -> EngineOptions:
    """The vLLM engine settings of a server (checked by ``EngineOptions``)."""
    return EngineOptions(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(EngineOptions)})


def make_engine(settings: ServerSettings, on_batch=None):
    """The engine for ``settings.backend`` (``auto``: vLLM when importable).

    ``on_batch(requests, seconds)``: called after each transformers batch (vLLM batches per step itself).
    """
    if select_backend(settings.backend) == "vllm":
        if settings.quantization_config is not None:
            raise ConfigError("quantization_config: a transformers backend option; vLLM runs a quantized "
                              "checkpoint as stored (README: quantized bases)")
        from .vllm import VLLMEngine
        seqs = {} if settings.max_batch_size is None else {"max_num_seqs": settings.max_batch_size}
        return VLLMEngine(settings.model, engine_options(settings), adapters=settings.adapters, **seqs)
    from ...backends.hf import HFBackend
    from .hf import HFEngine
    if settings.torch_threads is not None:
        import torch
        torch.set_num_threads(settings.torch_threads)
    backend = HFBackend(settings.model, device=settings.device, dtype=settings.dtype, lora=settings.adapters,
                        quantization_config=settings.quantization_config)
    return HFEngine(backend, max_batch_size=settings.max_batch_size or HFEngine.DEFAULT_BATCH, on_batch=on_batch)
