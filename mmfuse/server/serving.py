"""The serving object: validated OpenAI requests in, responses (or SSE chunks) out.

Order of checks, cheapest first, before anything is queued: model name (the served
checkpoint or one of its LoRA adapters, whose name then rides on the encoded prompt),
sampling limits, the modality of each image/audio part and item counts per
modality (before any embedding or medium is decoded), wire decoding (image and
audio parts decoded and run through their encoder's preprocessor on the media
threads: ``parts.decode``), the shared input rules (``chat.render_messages`` and
``inputs.prepare``), then the prompt is tokenized once, off the event loop
(``engine.encode``: placeholders and prompt length). Only then does a request take a slot in
the engine (429 when the server already holds ``max_queue`` requests, 503 once
it is shutting down).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from ..chat import ChatOptions, read_chat_template, render_messages
from ..inputs import EncodedPrompt, InputError, prepare, user_text
from ..sampling import Completion, SamplingConfig, check_room, check_token_ids, engine_sampling
from . import parts
from . import protocol as P
from .engines import Delta
from .errors import APIError, error_body
from .metrics import Metrics
from .settings import ServerSettings
from .wire import decode_embedding

log = logging.getLogger("mmfuse.server")

# threads decoding media parts and running their encoders' preprocessors: Pillow, libsndfile and numpy
# release the GIL while they work, so a few run side by side; more would only compete with the engine for cores
MEDIA_THREADS = min(4, os.cpu_count() or 1)


@dataclasses.dataclass
class Job:
    """One accepted request: what to generate and what the answer needs to know."""

    encoded: EncodedPrompt  # .lora: the adapter the request's `model` named, if any
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    model: str  # the id the request asked for (the served model or an adapter), echoed in the answer

    @property
    def prompt_tokens(self) -> int:
        return self.encoded.num_tokens


class Serving:
    def __init__(self, engine, settings: ServerSettings, metrics: Metrics | None = None):
        self.engine, self.settings = engine, settings
        self.metrics = metrics or Metrics()
        cap = settings.max_items_per_modality
        # the server's item cap, applied through the shared input rules
        self.specs = {n: dataclasses.replace(s, max_items=min(s.max_items, cap or s.max_items))
                      for n, s in engine.specs.items()}
        self.media = parts.modality_media(self.specs)  # what each modality takes as raw media
        # --chat-template, read and test-rendered once (a ConfigError stops the server before it serves)
        self.chat_template = (read_chat_template(settings.chat_template, engine.tokenizer)
                              if settings.chat_template is not None else None)
        self._media_threads = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="mmfuse-media")
        self.in_flight = 0
        self.closing = False

    # -- models -----------------------------------------------------------------------------------------

    def models(self) -> P.ModelList:
        cards = [P.ModalityCard(name=n, input_dim=s.input_dim, tokens_per_item=s.tokens_per_item,
                                max_items=s.max_items, placeholder=s.placeholder, projector=s.projector,
                                media=self.media[n])
                 for n, s in self.specs.items()]
        base = self.settings.served_model_name
        # each LoRA adapter is a model of its own, as on vLLM's server: same modalities, `parent` the base
        return P.ModelList(data=[P.ModelCard(id=name, created=P.now(), backend=self.engine.name,
                                             max_model_len=self.engine.max_model_len, modalities=cards,
                                             root=base, parent=None if name == base else base)
                                 for name in (base, *self.settings.adapters)])

    # -- validation -------------------------------------------------------------------------------------

    def _model(self, req: P.ChatCompletionRequest | P.CompletionRequest) -> tuple[str, str | None]:
        """The model a request asked for, and the LoRA adapter that runs it (None: the checkpoint's own LM)."""
        base = self.settings.served_model_name
        if req.model is None or req.model == base:
            return base, None
        if req.model in self.settings.adapters:
            return req.model, req.model
        served = [base, *self.settings.adapters]
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {served}", "model",
                       "model_not_found")

    def _sampling(self, req: P.ChatCompletionRequest | P.CompletionRequest, max_tokens: int | None,
                  logprobs: bool, top_logprobs: int) -> SamplingConfig:
        limit = self.settings.max_tokens_limit
        max_tokens = max_tokens or self.settings.default_max_tokens
        if max_tokens > limit:
            raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {limit}", "max_tokens")
        if req.n > self.settings.max_n:
            raise APIError(400, f"n: {req.n} exceeds this server's limit of {self.settings.max_n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        most, chars = self.settings.max_stop_strings, self.settings.max_stop_chars
        if len(stop) > most or any(len(s) > chars for s in stop):
            raise APIError(400, f"stop: expected at most {most} strings of at most {chars} characters, got "
                                f"{len(stop)} of up to {max(map(len, stop))}", "stop")
        try:  # the one validation layer (types, ranges, UTF-8), shared with the Python API
            sampling = SamplingConfig(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids, n=req.n,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                logit_bias=_token_keys(req.logit_bias), logprobs=logprobs, top_logprobs=top_logprobs,
                response_format=req.response_format.model_dump() if req.response_format else None)
            check_token_ids(sampling, self.engine.vocab_size)
            return sampling
        except InputError as e:
            raise APIError(400, str(e), e.param, "invalid_value") from None

    def _check_counts(self, counts: Mapping[str, int], param: str) -> None:
        """Too many items is refused before any of them is decoded."""
        for name, count in counts.items():
            spec = self.specs.get(name)
            if spec is not None and count > spec.max_items:
                raise APIError(400, f"modality {name!r}: too many items, expected at most {spec.max_items}, "
                                    f"got {count}", param, "too_many_items")

    def _decode_map(self, embeddings: Mapping[str, list] | None, param: str) -> dict[str, list] | None:
        if embeddings is None:
            return None
        self._check_counts({n: len(v) for n, v in embeddings.items()}, param)
        return {n: [decode_embedding(f"{param}.{n}[{i}]", _plain(e)) for i, e in enumerate(v)]
                for n, v in embeddings.items()}

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._media_threads, fn, *args)

    async def _finish(self, text: str, items, param: str, sampling: SamplingConfig, req,
                      explicit_max_tokens: bool, model: tuple[str, str | None]) -> Job:
        try:
            encoded = await self.engine.encode(prepare(text, items, self.specs))
        except InputError as e:
            raise APIError(400, str(e), param, "input_error") from None
        encoded.lora = model[1]
        length = encoded.num_tokens
        if self.settings.max_prompt_tokens and length > self.settings.max_prompt_tokens:
            raise APIError(400, f"prompt too long: {length} tokens (items count as their soft tokens), this "
                                f"server takes at most {self.settings.max_prompt_tokens}", param, "prompt_too_long")
        room = self.engine.max_model_len - length
        if room < 1:
            raise APIError(400, f"prompt too long: {length} tokens leave no room to generate in the model's "
                                f"{self.engine.max_model_len}", param, "prompt_too_long")
        if explicit_max_tokens:
            try:
                check_room(sampling, length, self.engine.max_model_len)  # the same rule as the Python API
            except InputError as e:
                raise APIError(400, str(e), "max_tokens") from None
        elif sampling.max_tokens > room:
            if sampling.min_tokens > room:
                raise APIError(400, f"min_tokens: the prompt has {length} tokens, so at most {room} more fit in "
                                    f"the model's {self.engine.max_model_len}; asked for {sampling.min_tokens}",
                               "min_tokens")
            sampling = dataclasses.replace(sampling, max_tokens=room)  # the default shrinks to fit
        for name, its in encoded.items.items():
            self.metrics.items.labels(modality=name).inc(len(its))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Job(encoded, sampling, req.stream, usage, model[0])

    async def check_chat(self, req: P.ChatCompletionRequest) -> Job:
        model = self._model(req)
        sampling = self._sampling(req, req.max_completion_tokens or req.max_tokens, req.logprobs,
                                  req.top_logprobs or 0)
        media = await self._decode_media(req.messages, self._route_parts(req.messages))
        try:
            messages = [{"role": m.role, "content": self._content(i, m.content, media)}
                        for i, m in enumerate(req.messages)]
            extra = self._decode_map(req.multimodal_embeddings, "multimodal_embeddings")
            options = ChatOptions(self.chat_template, req.chat_template_kwargs or {}, req.add_generation_prompt,
                                  req.continue_final_message)
            text, items = render_messages(messages, self.engine.tokenizer, self.specs, extra,
                                          req.allow_special_tokens, options)
        except InputError as e:
            raise APIError(400, str(e), e.param or "messages", "input_error") from None
        return await self._finish(text, items, "messages", sampling, req,
                                  (req.max_completion_tokens or req.max_tokens) is not None, model)

    def _route_parts(self, messages: list[P.ChatMessage]) -> dict[tuple[int, int], tuple[str, int]]:
        """(modality, item index) of each image/audio part, by (message, part); items per modality counted, all
        before anything is decoded. Items are indexed in part order, as ``chat.render_messages`` collects them."""
        counts: dict[str, int] = {}
        routes: dict[tuple[int, int], tuple[str, int]] = {}
        for i, msg in enumerate(messages):
            for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
                if isinstance(part, P.EmbeddingPart):
                    name = part.modality
                elif parts.part_media(part):
                    try:
                        name = parts.route(f"messages[{i}].content[{j}]", part, self.media)
                    except InputError as e:
                        raise APIError(400, str(e), e.param, "input_error") from None
                    routes[i, j] = (name, counts.get(name, 0))
                else:
                    continue
                counts[name] = counts.get(name, 0) + 1
        self._check_counts(counts, "messages")
        return routes

    async def _decode_media(self, messages: list[P.ChatMessage], routes: Mapping[tuple[int, int], tuple[str, int]]
                            ) -> dict[tuple[int, int], tuple[str, object]]:
        """Image and audio parts -> (modality, preprocessed raw item), on the media threads."""
        if not routes:
            return {}
        limits, domains = self.settings.media_limits, self.settings.allowed_media_domains

        def decode_all():
            return {(i, j): (name, parts.decode(f"messages[{i}].content[{j}]", messages[i].content[j],
                                                self.specs[name], index, limits, domains))
                    for (i, j), (name, index) in routes.items()}
        try:
            return await self._off_loop(decode_all)
        except InputError as e:
            raise APIError(400, str(e), e.param, "input_error") from None

    def _content(self, i: int, content, media: Mapping[tuple[int, int], tuple[str, object]]) -> str | list | None:
        if not isinstance(content, list):
            return content
        out = []
        for j, part in enumerate(content):
            if isinstance(part, P.TextPart):
                out.append({"type": "text", "text": part.text})
            elif isinstance(part, P.EmbeddingPart):
                out.append({"type": "input_embedding", "modality": part.modality, "embedding": decode_embedding(
                    f"messages[{i}].content[{j}].embedding", _plain(part.embedding))})
            else:  # a decoded image/audio part: an item of its modality, standing where the part stood
                name, item = media[i, j]
                out.append({"type": "input_embedding", "modality": name, "embedding": item})
        return out

    async def check_completion(self, req: P.CompletionRequest) -> Job:
        model = self._model(req)
        sampling = self._sampling(req, req.max_tokens, req.logprobs is not None, req.logprobs or 0)
        try:
            items = self._decode_map(req.multimodal_embeddings, "multimodal_embeddings")
        except InputError as e:
            raise APIError(400, str(e), "multimodal_embeddings", "input_error") from None
        try:
            prompt = user_text("prompt", req.prompt, self.engine.tokenizer, self.specs, req.allow_special_tokens)
        except InputError as e:
            raise APIError(400, str(e), "prompt", "input_error") from None
        return await self._finish(prompt, items, "prompt" if not items else "multimodal_embeddings", sampling, req,
                                  req.max_tokens is not None, model)

    # -- generation -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.in_flight >= self.settings.max_queue:
            raise APIError(429, f"the server is at its limit of {self.settings.max_queue} requests in flight; "
                                "retry later", code="queue_full")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    async def generate(self, job: Job) -> list[Completion]:
        self._admit()
        try:
            completions = await self.engine.generate(job.encoded, engine_sampling(job.sampling))
        except InputError as e:  # the engine's own parameter checks
            raise APIError(400, str(e), e.param, "input_error") from None
        finally:
            self._release()
        if len(completions) < job.sampling.n:  # greedy n > 1: identical copies
            completions = [dataclasses.replace(completions[0]) for _ in range(job.sampling.n)]
        self._count_tokens(job, sum(len(c.token_ids) for c in completions))
        return completions

    async def stream(self, job: Job) -> AsyncIterator[Delta]:
        """Deltas of the job's choices. The slot is taken and the first delta awaited here, so that
        refusals are still HTTP errors; the slot is held until the last delta is sent."""
        self._admit()
        source = self.engine.stream(job.encoded, engine_sampling(job.sampling))
        copies = job.sampling.n if job.sampling.greedy else 1
        try:
            first = await anext(source)
        except StopAsyncIteration:
            first = None
        except InputError as e:
            self._release()
            raise APIError(400, str(e), e.param, "input_error") from None
        except BaseException:
            self._release()
            raise

        async def deltas():
            generated = 0
            try:
                if first is None:
                    return
                async for delta in _prepend(first, source):
                    generated += len(delta.token_ids) * copies
                    for i in range(copies):
                        yield dataclasses.replace(delta, index=i) if copies > 1 else delta
            finally:
                self._release()
                self._count_tokens(job, generated)
        return deltas()

    def _count_tokens(self, job: Job, generated: int) -> None:
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self.metrics.generation_tokens.inc(generated)

    async def shutdown(self) -> None:
        """Refuse new requests, let accepted ones finish, stop the engine."""
        self.closing = True
        while self.in_flight:
            await asyncio.sleep(0.05)
        self._media_threads.shutdown(wait=False, cancel_futures=True)
        await self.engine.close()


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for delta in rest:
        yield delta


def _token_keys(logit_bias: Mapping[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written as JSON strings ("50256")."""
    if logit_bias is None:
        return None
    out = {}
    for key, bias in logit_bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise InputError(f"logit_bias: key {key[:20]!r} is not a token id (a decimal integer)", "logit_bias")
        out[int(key)] = bias
    return out


def _plain(value):
    return value.model_dump() if isinstance(value, BaseModel) else value


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


def sse_error(e: Exception) -> str:
    log.exception("stream failed")
    return sse(error_body(500, f"generation failed ({type(e).__name__})", code="internal"))
