"""The vLLM backend: prepared prompts in, ``Completion`` records out, like ``HFBackend``.

Every request is checked before anything reaches the engine (items by
``mmfuse.inputs``, then placeholder tokens and prompt length by
``expand_token_ids``), so one bad request raises ``InputError`` without
touching the requests beside it or the engine.

The pure helpers ``to_vllm_prompt`` and ``to_sampling_params`` build what to
submit to ``vllm.LLM.generate`` or ``AsyncLLM.generate``; ``to_completion`` reads a
result back with the HF backend's conventions (token ids include a final EOS,
text decoded without special tokens, stop strings cut OpenAI-style).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..checkpoint import placeholder_token_ids, read_config, resolve
from ..config import MMFuseConfig, ModalitySpec
from ..inputs import InputError, PreparedPrompt, expand_token_ids
from ..sampling import Completion, SamplingConfig, truncate_at_stop


def check_prompt_length(ids: Sequence[int], prepared: PreparedPrompt, specs: Mapping[str, ModalitySpec],
                        placeholder_ids: Mapping[str, int], max_model_len: int) -> int:
    """Length of the prompt once items are expanded into soft tokens; InputError unless it fits.

    vLLM needs room for at least one generated token, so the prompt may use ``max_model_len - 1``.
    Also checks that every item has exactly one placeholder token after tokenization.
    """
    if not ids:
        raise InputError("text: the prompt is empty (no text and no items); give some text or an item")
    return len(expand_token_ids(ids, prepared, specs, placeholder_ids, max_model_len - 1))


def to_vllm_prompt(prepared: PreparedPrompt, tokenizer, specs: Mapping[str, ModalitySpec], max_model_len: int,
                   placeholder_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The request to submit to vLLM: ``{"prompt_token_ids": [...], "multi_modal_data": {NAME: [items]}}``.

    Token ids hold one placeholder id per item (vLLM's processor expands them); they are
    tokenized exactly as the HF backend does, so both backends see the same prompt.
    Raises InputError (placeholder tokens, empty or too long prompt) before the engine sees it.
    """
    placeholder_ids = placeholder_ids or placeholder_token_ids(tokenizer, specs)
    ids = list(tokenizer(prepared.text)["input_ids"])
    check_prompt_length(ids, prepared, specs, placeholder_ids, max_model_len)
    request: dict[str, Any] = {"prompt_token_ids": ids}
    mm = {name: list(items) for name, items in prepared.items.items() if items}
    if mm:
        request["multi_modal_data"] = mm
    return request


def to_sampling_params(sampling: SamplingConfig):
    """``SamplingConfig`` -> ``vllm.SamplingParams`` (logprobs of the chosen tokens only, when asked)."""
    from vllm import SamplingParams

    return SamplingParams(n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k,  # 0 = off in both
                          seed=sampling.seed, stop=list(sampling.stop) or None,
                          logprobs=0 if sampling.logprobs else None)


def to_completion(output, tokenizer, sampling: SamplingConfig) -> Completion:
    """One vLLM ``CompletionOutput`` as a ``Completion`` with the HF backend's conventions."""
    toks = list(output.token_ids)  # vLLM keeps a generated EOS, as the HF backend does
    logprobs = None
    if sampling.logprobs and output.logprobs is not None:
        logprobs = [step[t].logprob for t, step in zip(toks, output.logprobs)]
    text, stopped = truncate_at_stop(tokenizer.decode(toks, skip_special_tokens=True), sampling.stop)
    finish = "stop" if stopped or output.finish_reason == "stop" else "length"
    return Completion(text=text, token_ids=toks, finish_reason=finish, logprobs=logprobs)


class VLLMBackend:
    """An mmfuse checkpoint served by a vLLM engine (continuous batching, paged KV, prefix caching).

    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_num_seqs``, ``gpu_memory_utilization``).
    On CPU the engine runs eager (no graph capture) and, by default, in float32.
    """

    name = "vllm"

    def __init__(self, model_path: str | os.PathLike, dtype: str = "float32", max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, device: str | None = None, **engine_kwargs: Any):
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        if device is not None and str(device).split(":")[0] != current_platform.device_type:
            raise ValueError(f"device: this vLLM build runs on {current_platform.device_type!r}, got {device!r}")
        if current_platform.is_cpu():
            engine_kwargs.setdefault("enforce_eager", True)  # graph capture only costs time on CPU
        path = resolve(model_path)
        self.specs = MMFuseConfig.from_hf_config(read_config(path)).modalities
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the HF backend's tokenizer: same ids
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.placeholder_ids = placeholder_token_ids(self.tokenizer, self.specs)
        self.llm = LLM(model=str(path), dtype=dtype, max_model_len=max_model_len,
                       enable_prefix_caching=enable_prefix_caching, **engine_kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def to_vllm_prompt(self, prepared: PreparedPrompt) -> dict[str, Any]:
        return to_vllm_prompt(prepared, self.tokenizer, self.specs, self.max_model_len, self.placeholder_ids)

    def generate_outputs(self, prompts: Sequence[PreparedPrompt], sampling: SamplingConfig) -> list:
        """vLLM's own ``RequestOutput`` per prompt (with e.g. ``num_cached_tokens``)."""
        requests = [self.to_vllm_prompt(p) for p in prompts]  # all checked before any is submitted
        return self.llm.generate(requests, to_sampling_params(sampling), use_tqdm=False)

    def generate(self, prompts: Sequence[PreparedPrompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order; InputError before the engine for a bad prompt."""
        return [[to_completion(c, self.tokenizer, sampling) for c in out.outputs]
                for out in self.generate_outputs(prompts, sampling)]

    def close(self) -> None:
        """Stop the engine's processes now (otherwise this happens at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()
