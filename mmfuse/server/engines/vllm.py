"""The vLLM engine: ``AsyncLLM`` (vLLM's async engine), continuous batching across requests.

Requests are encoded by the same ``Checkpoint.encode`` as every backend and submitted
with ``mmfuse.backends.vllm``'s helpers (``engine_args``, ``to_request``,
``to_sampling_params``, ``to_completion``), so the server and ``VLLMBackend`` send vLLM
the same thing. Non-streaming requests ask vLLM for the final output only; streaming
ones for deltas, which vLLM detokenizes incrementally (stop strings held back).
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace
from typing import Any

from ...backends.vllm import engine_args, refused, step_logprobs, to_completion, to_request, to_sampling_params
from ...backends.vllm_defaults import EngineOptions, apply_process_defaults
from ...checkpoint import open_checkpoint
from ...inputs import EncodedPrompt
from ...logs import status
from ...lora import LoraAdapter, vllm_lora_args, vllm_lora_requests
from ...sampling import Completion, SamplingConfig
from . import Delta, PromptEncoder


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str | os.PathLike, options: EngineOptions, adapters: Mapping[str, LoraAdapter] = {},
                 **engine_kwargs: Any):
        apply_process_defaults(options.world_size)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.checkpoint = open_checkpoint(model)  # the HF backend's tokenizer: same ids
        self.specs, self.tokenizer = self.checkpoint.specs, self.checkpoint.tokenizer
        status(f"starting the vLLM engine for {model}")
        from vllm.platforms import current_platform

        self.lora_requests = vllm_lora_requests(adapters)  # EncodedPrompt.lora -> vLLM's LoRARequest
        args = AsyncEngineArgs(**engine_args(self.checkpoint, options, disable_log_stats=True,
                                             **vllm_lora_args(adapters, current_platform.is_cpu()), **engine_kwargs))
        # vLLM sizes its scheduler (max_num_seqs, max_num_batched_tokens) by usage context: a server's, as `vllm serve`
        self.engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        self.max_model_len = self.engine.model_config.max_model_len
        self.vocab_size = self.checkpoint.vocab_size
        self.encode = PromptEncoder(self.checkpoint, self.max_model_len - 1)  # room for one new token

    async def _outputs(self, encoded: EncodedPrompt, sampling: SamplingConfig, kind):
        from vllm.exceptions import VLLMValidationError

        try:
            params = to_sampling_params(sampling)
            params.output_kind = kind
            # render (multimodal processing included) off the event loop, as vLLM's own server does
            (engine_input,) = await self.engine.renderer.render_cmpl_async([to_request(encoded)])
            outputs = self.engine.generate(engine_input, params, request_id=uuid.uuid4().hex,
                                           lora_request=self.lora_requests.get(encoded.lora))
            first = await anext(outputs)
        except VLLMValidationError as e:  # a request vLLM refuses is the client's to fix
            raise refused(e, sampling) from None
        yield first
        async for out in outputs:
            yield out

    async def generate(self, encoded: EncodedPrompt, sampling: SamplingConfig) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        final = None
        async for out in self._outputs(encoded, sampling, RequestOutputKind.FINAL_ONLY):
            final = out
        return [to_completion(c, self.tokenizer, sampling) for c in sorted(final.outputs, key=lambda c: c.index)]

    async def stream(self, encoded: EncodedPrompt, sampling: SamplingConfig) -> AsyncIterator[Delta]:
        """vLLM's incremental text per choice; the last delta also carries what vLLM held back (a trailing
        partial character), so the joined deltas equal the non-streamed text exactly."""
        from vllm.sampling_params import RequestOutputKind

        sent: dict[int, str] = {}
        tokens: dict[int, list[int]] = {}
        async for out in self._outputs(encoded, sampling, RequestOutputKind.DELTA):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps, top = step_logprobs(toks, c.logprobs, sampling)
                text = c.text
                sent[c.index] = sent.get(c.index, "") + text
                tokens.setdefault(c.index, []).extend(toks)
                finish = None
                if c.finish_reason is not None:
                    whole = SimpleNamespace(token_ids=tokens[c.index], logprobs=None, finish_reason=c.finish_reason)
                    final = to_completion(whole, self.tokenizer, dataclasses.replace(sampling, logprobs=False))
                    if final.text.startswith(sent[c.index]):
                        text += final.text[len(sent[c.index]):]
                    finish = final.finish_reason
                yield Delta(c.index, text, toks, lps, finish, top)

    async def close(self) -> None:
        self.engine.shutdown()
