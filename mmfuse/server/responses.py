"""Completions and deltas -> OpenAI response bodies and SSE chunks (chat and text completions)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from ..sampling import Completion
from . import protocol as P
from .engines import Delta
from .serving import Job, sse, sse_error


def _usage(job: Job, generated: int) -> P.Usage:
    return P.Usage(prompt_tokens=job.prompt_tokens, completion_tokens=generated,
                   total_tokens=job.prompt_tokens + generated)


def _chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float] | None,
                   top: list[dict[int, float]] | None) -> P.ChoiceLogprobs | None:
    if logprobs is None:
        return None
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        s = tokenizer.decode([t])
        alternatives = [P.TopLogprob(token=a, logprob=v, bytes=list(a.encode()))
                        for a, v in ((tokenizer.decode([u]), v) for u, v in top[i].items())] if top else []
        content.append(P.TokenLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=alternatives))
    return P.ChoiceLogprobs(content=content)


def _text_logprobs(tokenizer, token_ids: list[int], logprobs: list[float] | None,
                   top: list[dict[int, float]] | None, offset: int = 0) -> P.CompletionLogprobs | None:
    if logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    # OpenAI's shape: {token text: logprob}; two ids that decode alike keep the likelier one (listed first)
    alternatives = [_by_text(tokenizer, step) for step in top] if top else None
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=list(logprobs), top_logprobs=alternatives,
                                text_offset=offsets)


def _by_text(tokenizer, step: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, logprob in step.items():  # best first: a later id with the same text is dropped
        out.setdefault(tokenizer.decode([token]), logprob)
    return out


def chat_response(job: Job, completions: list[Completion], model: str, tokenizer) -> P.ChatCompletionResponse:
    choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                            logprobs=_chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs))
               for i, c in enumerate(completions)]
    return P.ChatCompletionResponse(id=P.new_id("chatcmpl"), created=P.now(), model=model, choices=choices,
                                    usage=_usage(job, sum(len(c.token_ids) for c in completions)))


def completion_response(job: Job, completions: list[Completion], model: str, tokenizer) -> P.CompletionResponse:
    choices = [P.CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                  logprobs=_text_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs))
               for i, c in enumerate(completions)]
    return P.CompletionResponse(id=P.new_id("cmpl"), created=P.now(), model=model, choices=choices,
                                usage=_usage(job, sum(len(c.token_ids) for c in completions)))


async def chat_chunks(job: Job, deltas: AsyncIterator[Delta], model: str, tokenizer) -> AsyncIterator[str]:
    """SSE: a role chunk per choice, content deltas, usage last when asked, then ``[DONE]``."""
    rid, created, generated = P.new_id("chatcmpl"), P.now(), 0

    def chunk(choices, usage=None):
        return sse(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    for i in range(job.sampling.n):
        yield chunk([P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))])
    try:
        async for d in deltas:
            generated += len(d.token_ids)
            yield chunk([P.ChatChunkChoice(index=d.index, delta=P.DeltaMessage(content=d.text),
                                           finish_reason=d.finish_reason,
                                           logprobs=_chat_logprobs(tokenizer, d.token_ids, d.logprobs,
                                                                   d.top_logprobs))])
    except Exception as e:  # noqa: BLE001 - headers are gone: report in-band, end the stream cleanly
        yield sse_error(e)
    else:
        if job.include_usage:
            yield chunk([], _usage(job, generated))
    yield "data: [DONE]\n\n"


async def completion_chunks(job: Job, deltas: AsyncIterator[Delta], model: str, tokenizer) -> AsyncIterator[str]:
    rid, created, generated = P.new_id("cmpl"), P.now(), 0
    offsets = [0] * job.sampling.n
    try:
        async for d in deltas:
            generated += len(d.token_ids)
            choice = P.CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                                        logprobs=_text_logprobs(tokenizer, d.token_ids, d.logprobs, d.top_logprobs,
                                                                offsets[d.index]))
            offsets[d.index] += len(d.text)
            yield sse(P.CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
    except Exception as e:  # noqa: BLE001
        yield sse_error(e)
    else:
        if job.include_usage:
            yield sse(P.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                           usage=_usage(job, generated)))
    yield "data: [DONE]\n\n"
