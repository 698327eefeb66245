"""The transformers backend: the reference forward and batched generation.

Data path: ``EncodedPrompt.expanded_ids`` (one placeholder id per soft row) -> the LM's input
embeddings -> projected rows scattered over the placeholder positions (one
``masked_scatter`` per modality) -> ``inputs_embeds`` into the unchanged LM.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import CheckpointBackend
from ..checkpoint import Checkpoint, load_projector_state, open_checkpoint, read_config, save_projectors, write_config
from ..config import ConfigError, wrapper_architecture
from ..encoders import encode_items
from ..inputs import EncodedPrompt, InputError, Item, PreparedPrompt
from ..lora import LoraAdapter, open_adapters
from ..projectors import build_projectors, project_items
from ..quantization import hf_quantization_config
from ..sampling import Completion, SamplingConfig, truncate_at_stop, visible_tokens
from ..streaming import Delta, TextDeltas
from .hf_sampling import OnToken, StepTap, compile_json, grammar_compiler, logits_processors, top_logprobs


def merge_rows(embeds: torch.Tensor, input_ids: torch.Tensor, rows: Mapping[str, torch.Tensor],
               placeholder_ids: Mapping[str, int]) -> torch.Tensor:
    """Put each modality's rows, in order, at its placeholder positions.

    embeds: [B, S, H]; input_ids: [B, S]; rows[name]: [R_name, H] in batch-major prompt order.
    """
    for name, r in rows.items():
        mask = input_ids == placeholder_ids[name]
        n = int(mask.sum())
        if n != r.shape[0]:
            raise InputError(f"modality {name!r}: {n} placeholder positions but {r.shape[0]} projected rows")
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), r.to(embeds.dtype))
    return embeds


class MMFuseModel(nn.Module):
    """A causal LM plus one projector per modality; the weights of one checkpoint."""

    def __init__(self, lm: nn.Module, checkpoint: Checkpoint):
        super().__init__()
        self.lm = lm
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.mm_config = checkpoint.mm_config
        self.specs = checkpoint.specs
        self.placeholder_ids = checkpoint.placeholder_ids
        self.max_len = checkpoint.max_len
        self.eos_token_ids = checkpoint.eos_token_ids
        self.mm_projectors = build_projectors(self.specs, lm.config.get_text_config().hidden_size)
        self.adapters: dict[str, LoraAdapter] = {}  # LoRA adapters loaded into self.lm (attach_adapters)
        self.grammar_compiler = None  # xgrammar's, made on the first response_format request (hf_sampling)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def project(self, items: Mapping[str, Sequence[Item]]) -> dict[str, torch.Tensor]:
        """Raw items through their frozen encoder (batched), then one projector call per modality over
        all its items (``project_items``): {name: [rows, H]}."""
        out = {}
        for name, its in items.items():
            if its:
                proj = self.mm_projectors[name]
                param = next(proj.parameters(), None)
                device, dtype = (param.device, param.dtype) if param is not None else (self.device, torch.float32)
                out[name] = torch.cat(project_items(proj, encode_items(self.specs[name], list(its), device, dtype)))
        return out

    def embed(self, input_ids: torch.Tensor, items: Mapping[str, Sequence[Item]]) -> torch.Tensor:
        """inputs_embeds [B, S, H] with the projected rows in place of the placeholders."""
        return self.embed_rows(input_ids, self.project(items))

    def embed_rows(self, input_ids: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``embed`` for rows already projected ({name: [R, H]} in batch-major prompt order)."""
        is_mm = torch.zeros_like(input_ids, dtype=torch.bool)
        for pid in self.placeholder_ids.values():
            is_mm |= input_ids == pid
        # placeholder rows of the embedding matrix are never read (they may not exist)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_mm, 0))
        return merge_rows(embeds, input_ids, rows, self.placeholder_ids)

    def forward(self, input_ids: torch.Tensor, items: Mapping[str, Sequence[Item]],
                attention_mask: torch.Tensor | None = None, **kwargs):
        return self.lm(inputs_embeds=self.embed(input_ids, items), attention_mask=attention_mask, **kwargs)

    def encode(self, prepared: PreparedPrompt) -> EncodedPrompt:
        """Tokenize once, place and expand the items (``Checkpoint.encode``)."""
        return self.checkpoint.encode(prepared)

    def save(self, out: str | os.PathLike, lm_weights: bool = True) -> None:
        """Write a checkpoint directory. ``lm_weights=False`` updates an existing checkpoint at
        ``out`` by rewriting only its projector file and config (the stage-1 case)."""
        out = Path(out)
        if lm_weights:
            out.mkdir(parents=True, exist_ok=True)
            self.lm.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            config = self.lm.config.to_dict()
        elif (out / "config.json").exists():
            config = read_config(out)
        else:
            raise ConfigError(f"{out}: no checkpoint to update; save with lm_weights=True")
        config["architectures"] = [wrapper_architecture(type(self.lm).__name__)]
        config["mmfuse"] = self.mm_config.to_dict()
        write_config(out, config)
        save_projectors(self.mm_projectors, out)


# transformers attention kernels the backend may load the LM with. "eager" stays the default: it is the
# reference the vLLM parity tests were measured against; "sdpa" (torch's fused attention) is faster on long
# prompts and is what a fair transformers baseline runs (mmfuse bench throughput --hf-attn).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def load(path_or_id: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
         quantization_config=None) -> MMFuseModel:
    """Open an mmfuse checkpoint (local directory or hub id) with transformers and validate it.

    ``attn_implementation``: one of ``ATTN_IMPLEMENTATIONS`` (transformers' name for the attention kernel).
    ``quantization_config`` quantizes the LM as it loads (``mmfuse.quantization.hf_quantization_config``:
    ``"torchao-int8"``, ``"bnb-8bit"``, ``"bnb-4bit"`` or a transformers config object); the projectors
    and encoders stay in ``dtype``."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    ckpt = open_checkpoint(path_or_id)
    path = ckpt.path
    hf_config = AutoConfig.from_pretrained(path)
    quantize = hf_quantization_config(quantization_config)
    if quantize is not None and getattr(hf_config, "quantization_config", None) is not None:
        raise ConfigError(f"quantization_config: {path} is already quantized (its config.json has one); "
                          f"it runs as stored")
    extra = {} if quantize is None else {"quantization_config": quantize, "device_map": str(device)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mm_projectors.* keys are "unexpected" to the bare LM by design
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype,
                                                  attn_implementation=attn_implementation, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = MMFuseModel(lm, ckpt)
    _load_projectors(model, path)
    return model.to(device=device, dtype=dtype).eval()


def attach_adapters(model: MMFuseModel, adapters: Mapping[str, LoraAdapter]) -> None:
    """Load LoRA adapters into the LM with peft, unmerged, each under its name; the projectors are untouched.

    Each prompt then picks its adapter (or none) in one batch (``EncodedPrompt.lora``, peft's
    ``adapter_names``)."""
    if not adapters:
        return
    from peft import PeftModel

    first, *rest = adapters.values()
    try:
        lm = PeftModel.from_pretrained(model.lm, first.path, adapter_name=first.name, is_trainable=False)
        for a in rest:
            lm.load_adapter(a.path, adapter_name=a.name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another base
        raise ConfigError(f"lora: an adapter does not fit this checkpoint's LM: {e}") from None
    model.lm = lm.eval()
    model.adapters = dict(adapters)


def _load_projectors(model: MMFuseModel, path) -> None:
    state = load_projector_state(path)
    expected = model.mm_projectors.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"{path}: projector weights missing: {['mm_projectors.' + k for k in missing]}")
    for key, t in expected.items():
        if state[key].shape != t.shape:
            raise ConfigError(f"{path}: mm_projectors.{key} has shape {tuple(state[key].shape)}, "
                              f"the config implies {tuple(t.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"{path}: projector weights for no configured modality: {extra}")
    model.mm_projectors.load_state_dict(state)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once (tied weights are one tensor); a
    quantized tensor subclass (torchao) counts at the width of the tensors it holds, not its nominal dtype."""
    seen: set[int] = set()

    def stored(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass: its data lives in its inner tensors
            return sum(stored(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        if t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    return sum(stored(t.data if isinstance(t, nn.Parameter) else t)
               for t in module.state_dict(keep_vars=True).values())


class RequestsFailed(InputError):
    """Some prompts of a batch could not run (their own input made the model's numbers non-finite);
    ``results[i]`` holds the others' completions, ``failed[i]`` the reason for each failed prompt i."""

    def __init__(self, results: list[list[Completion] | None], failed: dict[int, str]):
        first = min(failed)
        super().__init__(f"prompt {first}: {failed[first]}" if len(results) > 1 else failed[first])
        self.results, self.failed = results, failed


class _FiniteScores:
    """A logits processor: a row whose scores hold NaN or +inf (or are all -inf) would make sampling fail
    for the whole batch; it gets a finite (uniform) row instead and is remembered, so only its request fails."""

    def __init__(self) -> None:
        self.bad: set[int] = set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = scores.isnan().any(-1) | scores.isposinf().any(-1) | scores.isneginf().all(-1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            self.bad.update(rows)
            scores = scores.clone()
            scores[bad] = 0.0
        return scores


@torch.inference_mode()
def generate(model: MMFuseModel, prompts: Sequence[EncodedPrompt], sampling: SamplingConfig,
             on_token: OnToken | None = None) -> list[list[Completion]]:
    """Generate for a batch of encoded prompts at once (left padding); ``n`` completions each.

    ``on_token(prompt, choice, token, logprob, top)``: called from the decoding loop for each token as
    soon as it is chosen (``logprob``/``top`` None unless asked for), for streaming. A choice that
    has ended gets padding tokens until the batch ends.

    A prompt whose projected rows or scores are not finite fails alone: the others are generated
    and returned in ``RequestsFailed.results`` (raised when any prompt failed).
    """
    failed: dict[int, str] = {}
    grammar = None
    if sampling.response_format is not None:  # compiled before any work: a schema it refuses is the caller's
        if model.grammar_compiler is None:
            model.grammar_compiler = grammar_compiler(model.checkpoint)
        grammar = compile_json(model.grammar_compiler, sampling.response_format)
    projected = [model.project(p.items) for p in prompts]  # per prompt, so that a bad one fails alone
    for i, rows in enumerate(projected):
        bad = next((name for name, r in rows.items() if not torch.isfinite(r).all()), None)
        if bad is not None:
            failed[i] = (f"modality {bad!r}: the projected rows hold NaN or Inf (the items' values overflow "
                         f"the projector in {rows[bad].dtype}); send smaller values")
    keep = [i for i in range(len(prompts)) if i not in failed]
    results: list[list[Completion] | None] = [None] * len(prompts)
    guard = _FiniteScores()
    if keep:
        rows = {name: torch.cat([projected[i][name] for i in keep if name in projected[i]])
                for name in model.specs if any(name in projected[i] for i in keep)}
        tap = None
        if on_token is not None:  # a row of this batch is choice row % n of kept prompt row // n
            n = sampling.n
            tap = StepTap(lambda row, *token: on_token(keep[row // n], row % n, *token), sampling)
        for i, r in zip(keep, _generate([prompts[i] for i in keep], rows, model, sampling, guard, tap, grammar)):
            results[i] = r
    for row in guard.bad:
        failed[keep[row // sampling.n]] = ("the model's scores became NaN or Inf while generating (this request's "
                                           "items drive it out of range); refused")
    if failed:
        raise RequestsFailed([None if i in failed else r for i, r in enumerate(results)], failed)
    return results


def _generate(prompts: Sequence[EncodedPrompt], rows: Mapping[str, torch.Tensor], model: MMFuseModel,
              sampling: SamplingConfig, guard: _FiniteScores, tap: StepTap | None, grammar) -> list[list[Completion]]:
    from transformers import GenerationConfig, LogitsProcessorList

    tok = model.tokenizer
    ids = [p.expanded_ids for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    embeds = model.embed_rows(input_ids, rows)  # each prompt's items projected once, by generate
    stop_ids = model.eos_token_ids | set(sampling.stop_token_ids)
    gen = GenerationConfig(
        max_new_tokens=sampling.max_tokens, do_sample=not sampling.greedy,
        temperature=sampling.temperature if not sampling.greedy else None,
        top_p=sampling.top_p if not sampling.greedy else None,
        top_k=sampling.top_k if not sampling.greedy else None,
        min_p=sampling.min_p if not sampling.greedy and sampling.min_p else None,
        repetition_penalty=1.0,  # SamplingConfig is the whole truth: no defaults from generation_config.json
        num_return_sequences=sampling.n, pad_token_id=pad, eos_token_id=sorted(stop_ids),
        stop_strings=sampling.stop or None, return_dict_in_generate=True, output_logits=sampling.logprobs)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    lora = {}
    if model.adapters:  # peft's mixed batch: one adapter (or the bare LM) per row, rows repeated n times
        lora["adapter_names"] = [p.lora or "__base__" for p in prompts for _ in range(sampling.n)]
    # the tap sees the raw logits; the guard, after vLLM's processors, also catches what a penalty made non-finite
    processors = LogitsProcessorList([*([tap] if tap else []),
                                      *logits_processors(sampling, prompts, stop_ids, model.device, grammar), guard])
    out = model.lm.generate(inputs_embeds=embeds, attention_mask=attention, generation_config=gen,
                            logits_processor=processors, tokenizer=tok if sampling.stop else None, streamer=tap,
                            **lora)
    seqs = out.sequences  # [B * n, new]: with inputs_embeds only new tokens come back
    steps = None
    if sampling.logprobs:  # of the raw logits, before any processor (vLLM's default logprobs mode)
        steps = torch.stack(out.logits, 1).float().log_softmax(-1)  # [B * n, new, V]
    results: list[list[Completion]] = [[] for _ in prompts]
    for row in range(seqs.shape[0]):
        lp = steps[row] if steps is not None else None
        results[row // sampling.n].append(_completion(tok, stop_ids, seqs[row], lp, sampling))
    return results


def _completion(tok, stop_ids: set[int], seq: torch.Tensor, steps: torch.Tensor | None,
                sampling: SamplingConfig) -> Completion:
    """Token ids up to and including the first EOS or stop token (what follows is padding).
    ``steps``: [new, V] logprobs of every position, when asked."""
    toks = seq.tolist()
    end = next((i for i, t in enumerate(toks) if t in stop_ids), None)
    finish = "stop" if end is not None else "length"
    toks = toks if end is None else toks[: end + 1]
    text, stopped = truncate_at_stop(tok.decode(visible_tokens(toks, sampling), skip_special_tokens=True),
                                     sampling.stop)
    if stopped:
        finish = "stop"
    lp = top = None
    if steps is not None:
        steps = steps[: len(toks)]
        lp = steps.gather(-1, torch.tensor(toks, device=steps.device).unsqueeze(-1)).squeeze(-1).tolist()
        top = top_logprobs(steps, sampling.top_logprobs) if sampling.top_logprobs else None
    return Completion(text=text, token_ids=toks, finish_reason=finish, logprobs=lp, top_logprobs=top)


class HFBackend(CheckpointBackend):
    """The transformers reference behind the ``Backend`` protocol.

    ``lora``: LoRA adapters a prompt may name (``mmfuse.lora.open_adapters``), applied with peft.
    ``attn_implementation``: transformers' attention kernel, ``"eager"`` (the reference) or ``"sdpa"``.
    ``quantization_config``: quantize the LM as it loads (``mmfuse.quantization``, e.g. ``"torchao-int8"``)."""

    name = "hf"

    def __init__(self, model_path: str | os.PathLike, device: str | None = None, dtype: str = "float32",
                 lora=None, attn_implementation: str = "eager", quantization_config=None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        adapters = open_adapters(lora)  # checked before the model loads
        self.model = load(model_path, device=device, dtype=getattr(torch, dtype),
                          attn_implementation=attn_implementation, quantization_config=quantization_config)
        attach_adapters(self.model, adapters)
        self.model.to(device)
        self.adapters = adapters
        self.checkpoint = self.model.checkpoint
        self.max_model_len = self.prompt_limit = self.checkpoint.max_len

    def generate(self, prompts: Sequence[EncodedPrompt], sampling: SamplingConfig,
                 on_token: OnToken | None = None) -> list[list[Completion]]:
        """``n`` completions per prompt; ``on_token`` sees each token as it is chosen (``generate``)."""
        return generate(self.model, prompts, sampling, on_token)

    def stream(self, prompt: EncodedPrompt, sampling: SamplingConfig) -> Iterator[Delta]:
        """The ``n`` choices' deltas as tokens are generated (on a worker thread); their texts join to the
        non-streamed ones. A stream abandoned early lets its batch run to the end."""
        stop_ids = self.checkpoint.eos_token_ids | set(sampling.stop_token_ids)
        texts = [TextDeltas(self.tokenizer, sampling, stop_ids, i) for i in range(sampling.n)]
        events: queue.Queue = queue.Queue()

        def on_token(_prompt, choice, token, logprob, top):
            delta = texts[choice].push(token, logprob, top)
            if delta is not None:
                events.put(delta)

        def run():
            try:
                events.put(generate(self.model, [prompt], sampling, on_token)[0])
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                events.put(e)

        threading.Thread(target=run, name="mmfuse-hf-stream", daemon=True).start()
        while isinstance(item := events.get(), Delta):
            yield item
        if isinstance(item, RequestsFailed):
            raise InputError(item.failed[0]) from None
        if isinstance(item, BaseException):
            raise item
        for text, completion in zip(texts, item):
            yield text.finish(completion)

    def weight_bytes(self) -> int:
        """Bytes of the weights as loaded (LM, projectors, adapters): a quantized base's weights count at their
        stored width (transformers keeps compressed-tensors weights packed and unpacks them per call)."""
        return weight_bytes(self.model)

    def close(self) -> None:
        """Nothing to stop: the model is freed with this object."""
