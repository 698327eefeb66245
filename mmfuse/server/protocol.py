"""Request and response models of the OpenAI-compatible API (pydantic), plus mmfuse's extensions.

Parsing only: these models check JSON types and ranges. Embeddings are decoded
by ``wire``, and checked against the checkpoint by ``mmfuse.inputs``.
Unknown fields are refused (400 naming the field) rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- embeddings on the wire ---------------------------------------------------------------------------------

class EncodedEmbedding(_Strict):
    """Raw little-endian values of ``shape`` (``[dim]`` or ``[n, dim]``), base64-encoded."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=2)
    data: str


Embedding = EncodedEmbedding | list[float] | list[list[float]]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class EmbeddingPart(_Strict):
    """Stands where the modality's placeholder would be in the text."""

    type: Literal["input_embedding"]
    modality: str
    embedding: Embedding


ContentPart = Annotated[TextPart | EmbeddingPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


# -- requests -------------------------------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints. ``max_tokens`` None = the server's default."""

    model: str | None = None  # None = the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # extension (vLLM's): 0 = off
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused
    presence_penalty: float = Field(default=0.0, ge=0, le=0)  # only the neutral value is supported
    frequency_penalty: float = Field(default=0.0, ge=0, le=0)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer name of max_tokens
    logprobs: bool = False  # the chosen tokens' logprobs
    top_logprobs: int | None = Field(default=None, ge=0, le=0)  # alternatives are not returned
    multimodal_embeddings: dict[str, list[Embedding]] | None = None  # for placeholders written as text


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=0)  # 0: the chosen tokens' logprobs only
    echo: Literal[False] = False  # echoing the prompt is not supported
    multimodal_embeddings: dict[str, list[Embedding]] | None = None


# -- responses ------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[Any] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[Any] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModalityCard(BaseModel):
    name: str
    input_dim: int
    tokens_per_item: int
    max_items: int
    placeholder: str
    projector: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmfuse"
    backend: str
    max_model_len: int
    modalities: list[ModalityCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
