"""The vLLM backend: encoded prompts in, ``Completion`` records out, like ``HFBackend``.

This is a client of a vLLM engine; the model it runs (``mmfuse.vllm_plugin``)
is what vLLM itself loads. The pure helpers here are shared with the server's
async engine (``mmfuse.server.engines.vllm``):

- ``engine_args``: the engine arguments, with working defaults for the machine
  (``vllm_defaults``) where the caller set none;
- ``to_request``: an ``EncodedPrompt`` as vLLM's ``{"prompt_token_ids", "multi_modal_data"}``;
- ``to_sampling_params`` / ``to_completion``: sampling in, results out with the
  HF backend's conventions (token ids include a final EOS, text decoded without
  special tokens, stop strings cut OpenAI-style).
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from ..config import ConfigError
from ..checkpoint import Checkpoint, open_checkpoint
from ..inputs import EncodedPrompt, InputError
from ..logs import status, verbose
from ..lora import open_adapters, vllm_lora_args, vllm_lora_requests
from ..sampling import Completion, SamplingConfig, truncate_at_stop, visible_tokens
from ..streaming import Delta, TextDeltas
from . import CheckpointBackend
from .vllm_defaults import EngineOptions, apply_process_defaults, check_can_spawn, offline_engine_core


def engine_args(checkpoint: Checkpoint, options: EngineOptions, **engine_kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` (``engine_kwargs`` win over mmfuse's)."""
    from vllm.platforms import current_platform

    args: dict[str, Any] = dict(model=str(checkpoint.path), dtype=options.dtype, max_model_len=options.max_model_len,
                                enable_prefix_caching=True, tensor_parallel_size=options.tensor_parallel_size,
                                pipeline_parallel_size=options.pipeline_parallel_size,
                                distributed_executor_backend=options.distributed_executor_backend,
                                use_tqdm_on_load=verbose())  # a weight-loading bar per start, behind -v
    if current_platform.is_cpu() and options.pipeline_parallel_size == 1:
        # graph capture only costs time on CPU. Not with pipeline ranks: vLLM 0.32's CPU runner allocates the
        # buffer that receives the previous stage's hidden states only in its compile warm-up, so an eager
        # pipeline-parallel engine fails its first step (AssertionError in sync_and_gather_intermediate_tensors)
        args["enforce_eager"] = True
    args.update(options.memory_args(current_platform.is_cpu()))
    args["structured_outputs_config"] = structured_outputs_config()
    args.update(engine_kwargs)
    return args


def structured_outputs_config():
    """response_format through xgrammar, with compact JSON: left free to put whitespace between tokens, a
    small or untrained model can spend every token on it and never close the object (measured on the tiny
    test models); the answer is the same JSON either way."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


def _describe(args: dict[str, Any]) -> str:
    """The engine settings a user may want to see or change, for the status line."""
    kv, env = args.get("kv_cache_memory_bytes"), os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if kv:
        memory = f"KV cache {kv / 2**30:.1f} GiB"
    elif env:
        memory = f"KV cache {env} GiB (VLLM_CPU_KVCACHE_SPACE)"
    else:
        memory = f"gpu_memory_utilization {args.get('gpu_memory_utilization', 'default')}"
    return f"{args['dtype']}, {memory}, max_model_len {args.get('max_model_len') or 'from the model'}"


def to_request(encoded: EncodedPrompt) -> dict[str, Any]:
    """What to submit to vLLM: token ids with one placeholder per item (vLLM's processor expands them)."""
    request: dict[str, Any] = {"prompt_token_ids": list(encoded.token_ids)}
    if encoded.items:
        request["multi_modal_data"] = {name: list(items) for name, items in encoded.items.items()}
    return request


def to_sampling_params(sampling: SamplingConfig):
    """``SamplingConfig`` -> ``vllm.SamplingParams`` (the same fields; logprobs of the chosen tokens
    plus ``top_logprobs`` alternatives, when asked)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if sampling.response_format is not None:
        fmt = sampling.response_format
        structured = (StructuredOutputsParams(json_object=True) if fmt.schema is None
                      else StructuredOutputsParams(json=json.loads(fmt.schema)))
    return SamplingParams(structured_outputs=structured, n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k,  # 0 = off in both
                          min_p=sampling.min_p, seed=sampling.seed, stop=list(sampling.stop) or None,
                          stop_token_ids=list(sampling.stop_token_ids) or None,
                          presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                          repetition_penalty=sampling.repetition_penalty, min_tokens=sampling.min_tokens,
                          logit_bias=dict(sampling.logit_bias) or None,
                          logprobs=sampling.top_logprobs if sampling.logprobs else None)


def refused(error, sampling: SamplingConfig) -> InputError:
    """vLLM's ``VLLMValidationError`` for a request as the ``InputError`` it is (the caller's to fix), naming
    the field: vLLM's own, or ``response_format`` when its grammar could not be built from the schema."""
    param = getattr(error, "parameter", None)
    if param is None and sampling.response_format is not None and "schema" in str(error):
        param = "response_format"
    return InputError(f"{param}: {error}" if param else str(error), param)


def step_logprobs(token_ids: Sequence[int], steps, sampling: SamplingConfig
                  ) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    """vLLM's per-position ``{token: Logprob}`` maps -> (chosen tokens' logprobs, top ``top_logprobs`` per
    position, best first). vLLM adds the chosen token to its top k (ranks 1..k): a worse one is dropped."""
    if not sampling.logprobs or steps is None:
        return None, None
    chosen = [step[t].logprob for t, step in zip(token_ids, steps)]
    k = sampling.top_logprobs
    top = [{t: lp.logprob for t, lp in sorted(step.items(), key=lambda e: e[1].rank)[:k]}
           for step in steps] if k else None
    return chosen, top


def to_completion(output, tokenizer, sampling: SamplingConfig) -> Completion:
    """One vLLM ``CompletionOutput`` as a ``Completion`` with the HF backend's conventions."""
    toks = list(output.token_ids)  # vLLM keeps a generated EOS (and a stop token id), as the HF backend does
    logprobs, top = step_logprobs(toks, output.logprobs, sampling)
    text, stopped = truncate_at_stop(tokenizer.decode(visible_tokens(toks, sampling), skip_special_tokens=True),
                                     sampling.stop)
    finish = "stop" if stopped or output.finish_reason == "stop" else "length"
    return Completion(text=text, token_ids=toks, finish_reason=finish, logprobs=logprobs, top_logprobs=top)


class VLLMBackend(CheckpointBackend):
    """An mmfuse checkpoint served by an offline ``vllm.LLM`` (continuous batching, paged KV, prefix caching).

    Options: ``dtype`` (float32 by default: exact parity with the HF backend), ``max_model_len``,
    ``kv_cache_gb`` or ``gpu_memory_utilization``, ``tensor_parallel_size``, ``pipeline_parallel_size``,
    ``distributed_executor_backend`` (``"ray"`` across nodes), ``lora`` (LoRA adapters a prompt may
    name, ``mmfuse.lora.open_adapters``); any other keyword goes to ``vllm.LLM`` as is (e.g. ``max_num_seqs``).
    """

    name = "vllm"

    def __init__(self, model_path: str | os.PathLike, dtype: str = "float32", max_model_len: int | None = None,
                 kv_cache_gb: float | None = None, gpu_memory_utilization: float | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 distributed_executor_backend: str | None = None, device: str | None = None, lora=None,
                 **engine_kwargs: Any):
        options = EngineOptions(dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
                                gpu_memory_utilization=gpu_memory_utilization,
                                tensor_parallel_size=tensor_parallel_size,
                                pipeline_parallel_size=pipeline_parallel_size,
                                distributed_executor_backend=distributed_executor_backend)
        if "quantization_config" in engine_kwargs:
            raise ConfigError("quantization_config: a transformers backend option; vLLM runs a quantized checkpoint "
                              "as stored (or takes its own `quantization` engine argument)")
        check_can_spawn(options.world_size)
        apply_process_defaults(options.world_size)
        from vllm import LLM
        from vllm.platforms import current_platform

        if device is not None and str(device).split(":")[0] != current_platform.device_type:
            raise ValueError(f"device: this vLLM build runs on {current_platform.device_type!r}, got {device!r}")
        self.checkpoint = open_checkpoint(model_path)  # the HF backend's tokenizer: same ids
        self.adapters = open_adapters(lora)
        self.lora_requests = vllm_lora_requests(self.adapters)
        args = engine_args(self.checkpoint, options, **vllm_lora_args(self.adapters, current_platform.is_cpu()),
                           **engine_kwargs)
        started = time.perf_counter()
        with offline_engine_core(options.world_size) as core:
            self.llm = LLM(**args)
        self.in_process = core == "in-process"
        if self.in_process:
            _IN_PROCESS.append(self.llm)
        status(f"vLLM engine ready in {time.perf_counter() - started:.0f} s ({_describe(args)}, engine core {core})")
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.prompt_limit = self.max_model_len - 1  # vLLM keeps room for one generated token
        # stop the engine before interpreter teardown: otherwise vLLM reports its exit as unexpected
        atexit.register(_close_ref, weakref.ref(self))

    def generate_outputs(self, prompts: Sequence[EncodedPrompt], sampling: SamplingConfig) -> list:
        """vLLM's own ``RequestOutput`` per prompt (with e.g. ``num_cached_tokens``)."""
        from vllm.exceptions import VLLMValidationError

        try:
            return self.llm.generate([to_request(p) for p in prompts], to_sampling_params(sampling), use_tqdm=False,
                                     lora_request=self._lora_requests(prompts))
        except VLLMValidationError as e:
            raise refused(e, sampling) from None

    def _lora_requests(self, prompts: Sequence[EncodedPrompt]) -> list | None:
        """vLLM's LoRARequest per prompt (None: the bare LM), or None when no adapter is loaded."""
        return [self.lora_requests[p.lora] if p.lora else None for p in prompts] if self.adapters else None

    def generate(self, prompts: Sequence[EncodedPrompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order."""
        return [[to_completion(c, self.tokenizer, sampling) for c in out.outputs]
                for out in self.generate_outputs(prompts, sampling)]

    def stream(self, prompt: EncodedPrompt, sampling: SamplingConfig) -> Iterator[Delta]:
        """The ``n`` choices' deltas as the engine generates them (its step loop, driven from here); their
        texts join to the non-streamed ones. Closing the iterator early aborts the request."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        params = to_sampling_params(sampling)
        params.output_kind = RequestOutputKind.DELTA  # only each step's new tokens
        stop_ids = self.checkpoint.eos_token_ids | set(sampling.stop_token_ids)
        texts = [TextDeltas(self.tokenizer, sampling, stop_ids, i) for i in range(sampling.n)]
        from vllm.exceptions import VLLMValidationError

        (engine_input,) = engine.renderer.render_cmpl([to_request(prompt)])
        request_id = uuid.uuid4().hex  # outputs carry the id given here (the engine keeps its own internally)
        try:
            lora = self._lora_requests([prompt])
            engine.add_request(request_id, engine_input, params, lora_request=lora[0] if lora else None)
        except VLLMValidationError as e:
            raise refused(e, sampling) from None
        tokens: dict[int, list] = {i: [] for i in range(sampling.n)}
        steps: dict[int, list] = {i: [] for i in range(sampling.n)}
        done = False
        try:
            while not done and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    for c in out.outputs:
                        lps, top = step_logprobs(c.token_ids, c.logprobs, sampling)
                        tokens[c.index] += c.token_ids
                        steps[c.index] += c.logprobs or []
                        for j, t in enumerate(c.token_ids):
                            delta = texts[c.index].push(t, lps[j] if lps else None, top[j] if top else None)
                            if delta is not None:
                                yield delta
                        if c.finish_reason is not None:
                            whole = SimpleNamespace(token_ids=tokens[c.index], finish_reason=c.finish_reason,
                                                    logprobs=steps[c.index] or None)
                            yield texts[c.index].finish(to_completion(whole, self.tokenizer, sampling))
                    done = out.finished
        finally:
            if not done:
                engine.abort_request([request_id])

    def close(self) -> None:
        """Stop the engine now (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        if not self.in_process:
            llm.llm_engine.engine_core.shutdown()
            return
        # Shutting down (or freeing) an in-process core tears down vLLM's process-wide distributed state,
        # which every other in-process engine here still uses: such an engine is retired, and all retired
        # ones are shut down with the last.
        _IN_PROCESS.remove(llm)
        _RETIRED.append(llm)
        if not _IN_PROCESS:
            while _RETIRED:
                _RETIRED.pop().llm_engine.engine_core.shutdown()
            gc.collect()


_IN_PROCESS: list = []  # vllm.LLM objects of open in-process engines in this process
_RETIRED: list = []  # closed in-process engines waiting for the last one to close


def _close_ref(ref: weakref.ref) -> None:
    backend = ref()
    if backend is not None:
        backend.close()
