"""The vLLM engine: ``AsyncLLM`` (vLLM's async engine), continuous batching across requests.

Requests are checked and tokenized exactly as ``VLLMBackend`` does (the shared
``to_vllm_prompt``), so a bad one fails with InputError before the engine sees
it. Non-streaming requests ask vLLM for the final output only; streaming ones
for deltas, which vLLM detokenizes incrementally (stop strings held back).
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from ..checkpoint import placeholder_token_ids, read_config, resolve
from ..config import MMFuseConfig
from ..inputs import InputError, PreparedPrompt
from ..sampling import Completion, SamplingConfig
from ..vllm_plugin.engine import check_prompt_length, to_completion, to_sampling_params, to_vllm_prompt
from .engine import Delta


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str | os.PathLike, dtype: str = "float32", max_model_len: int | None = None,
                 **engine_kwargs: Any):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve(model)
        self.specs = MMFuseConfig.from_hf_config(read_config(path)).modalities
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the HF backend's tokenizer: same ids
        self.placeholder_ids = placeholder_token_ids(self.tokenizer, self.specs)
        if current_platform.is_cpu():
            engine_kwargs.setdefault("enforce_eager", True)  # graph capture only costs time on CPU
        args = AsyncEngineArgs(model=str(path), dtype=dtype, max_model_len=max_model_len,
                               enable_prefix_caching=True, disable_log_stats=True, **engine_kwargs)
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = self.engine.model_config.max_model_len

    def _request(self, prepared: PreparedPrompt) -> dict[str, Any]:
        return to_vllm_prompt(prepared, self.tokenizer, self.specs, self.max_model_len, self.placeholder_ids)

    def prompt_length(self, prepared: PreparedPrompt) -> int:
        ids = list(self.tokenizer(prepared.text)["input_ids"])
        return check_prompt_length(ids, prepared, self.specs, self.placeholder_ids, self.max_model_len)

    async def _outputs(self, prepared: PreparedPrompt, sampling: SamplingConfig, kind):
        from vllm.exceptions import VLLMValidationError

        try:
            params = to_sampling_params(sampling)
            params.output_kind = kind
            # render (multimodal processing included) off the event loop, as vLLM's own server does
            (engine_input,) = await self.engine.renderer.render_cmpl_async([self._request(prepared)])
            outputs = self.engine.generate(engine_input, params, request_id=uuid.uuid4().hex)
            first = await anext(outputs)
        except VLLMValidationError as e:  # a request vLLM refuses is the client's to fix
            raise InputError(str(e)) from None
        yield first
        async for out in outputs:
            yield out

    async def generate(self, prepared: PreparedPrompt, sampling: SamplingConfig) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        final = None
        async for out in self._outputs(prepared, sampling, RequestOutputKind.FINAL_ONLY):
            final = out
        return [to_completion(c, self.tokenizer, sampling) for c in sorted(final.outputs, key=lambda c: c.index)]

    async def stream(self, prepared: PreparedPrompt, sampling: SamplingConfig) -> AsyncIterator[Delta]:
        """vLLM's incremental text per choice; the last delta also carries what vLLM held back (a trailing
        partial character), so the joined deltas equal the non-streamed text exactly."""
        from vllm.sampling_params import RequestOutputKind

        sent: dict[int, str] = {}
        tokens: dict[int, list[int]] = {}
        async for out in self._outputs(prepared, sampling, RequestOutputKind.DELTA):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [step[t].logprob for t, step in zip(toks, c.logprobs)] if sampling.logprobs and c.logprobs else None
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
                yield Delta(c.index, text, toks, lps, finish)

    async def close(self) -> None:
        self.engine.shutdown()
