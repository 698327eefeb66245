"""Request and response models of the OpenAI-compatible API (pydantic), plus mmfuse's extensions.

Parsing only: these models check JSON types and ranges. Embeddings are decoded
by ``wire``, image and audio parts by ``parts`` (through ``mmfuse.media``), and
checked against the checkpoint by ``mmfuse.inputs``.
Unknown fields are refused (400 naming the field) rather than silently ignored.
Types are strict: no string for a number (``"max_tokens": "2"``), no number or
string for a bool (``"stream": "yes"``), no float for an int (``2.0``). Lists have
length caps, and a JSON embedding array is checked by one pass that stops at its first
bad element (``_embedding_array``), so a malformed body yields a handful of errors, not
one per element.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WrapValidator
from pydantic_core import PydanticCustomError

from ..chat import MAX_TEMPLATE_KWARGS
from ..sampling import (INT32_MAX, LOGIT_BIAS_MAX, MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                        MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX)

MAX_MESSAGES = 1024  # messages per chat request
MAX_PARTS = 1024  # content parts per message
MAX_WIRE_ITEMS = 256  # embeddings per modality in multimodal_embeddings (the server's item caps are lower)
MAX_MODALITIES = 64  # keys of multimodal_embeddings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- embeddings on the wire ---------------------------------------------------------------------------------

class EncodedEmbedding(_Strict):
    """Raw little-endian values of ``shape`` (``[dim]`` or ``[n, dim]``), base64-encoded."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=2)  # vs. the data: wire.py
    data: str


_NUMBERS = {int, float}


def _first_bad(row: list) -> int:
    return next(i for i, v in enumerate(row) if type(v) not in _NUMBERS)


def _embedding_array(value, handler):
    """A JSON embedding array in one pass, stopping at the first element that cannot be valid
    (one error, not one per element and union branch); ``{dtype, shape, data}`` goes to pydantic."""
    if type(value) is list:
        if value and type(value[0]) is list:
            width = len(value[0])
            for i, row in enumerate(value):
                if type(row) is not list:
                    raise PydanticCustomError("embedding_row", "row {i}: expected an array of numbers, got {got}",
                                              {"i": i, "got": type(row).__name__})
                if not set(map(type, row)) <= _NUMBERS:
                    j = _first_bad(row)
                    raise PydanticCustomError("embedding_value", "[{i}][{j}]: expected a number, got {got}",
                                              {"i": i, "j": j, "got": _json_type(row[j])})
                if len(row) != width:
                    raise PydanticCustomError("embedding_ragged", "row {i} has {n} values, row 0 has {w}",
                                              {"i": i, "n": len(row), "w": width})
        elif not set(map(type, value)) <= _NUMBERS:
            j = _first_bad(value)
            raise PydanticCustomError("embedding_value", "[{j}]: expected a number, got {got}",
                                      {"j": j, "got": _json_type(value[j])})
        return value
    if type(value) is dict:
        return handler(value)
    raise PydanticCustomError("embedding_type", "expected an array of numbers, an array of such arrays, or "
                              "{{dtype, shape, data}}, got {got}", {"got": _json_type(value)})


def _json_type(value) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", list: "an array", type(None): "null"}.get(
        type(value), type(value).__name__)


Embedding = Annotated[EncodedEmbedding | list[float] | list[list[float]], WrapValidator(_embedding_array)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class EmbeddingPart(_Strict):
    """Stands where the modality's placeholder would be in the text."""

    type: Literal["input_embedding"]
    modality: str
    embedding: Embedding


class ImageURL(_Strict):
    url: str  # data:image/...;base64,... (or http(s) from an allowed domain): decoded by mmfuse.media
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; accepted, unused (the encoder sets the size)


class ImagePart(_Strict):
    """OpenAI's image part; goes to the modality whose encoder takes images (or the one named)."""

    type: Literal["image_url"]
    image_url: ImageURL
    modality: str | None = None  # extension: which modality, when several take images


class InputAudio(_Strict):
    data: str  # base64 of the encoded file
    format: Literal["wav", "mp3", "flac", "ogg"]  # OpenAI's wav/mp3, and what else mmfuse.media decodes


class AudioPart(_Strict):
    """OpenAI's audio part; goes to the modality whose encoder takes audio (or the one named)."""

    type: Literal["input_audio"]
    input_audio: InputAudio
    modality: str | None = None


MediaPart = ImagePart | AudioPart
ContentPart = Annotated[TextPart | EmbeddingPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: str | None = None


EmbeddingMap = Annotated[dict[str, Annotated[list[Embedding], Field(max_length=MAX_WIRE_ITEMS)]],
                         Field(max_length=MAX_MODALITIES)]


# -- requests -------------------------------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormatSpec(_Strict):
    """OpenAI's response_format; ``json_schema`` is ``{"name", "schema", "strict", "description"}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Strict):
    """Fields shared by both endpoints. ``max_tokens`` None = the server's default."""

    model: str | None = None  # None = the served model
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0, le=2)  # 0 or [0.01, 2] (SamplingConfig)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=INT32_MAX)  # extension (vLLM's): 0 = off
    n: int = Field(default=1, ge=1, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    allow_special_tokens: bool = False  # extension: let the text's special-token strings act as special tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused
    presence_penalty: float = Field(default=0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    frequency_penalty: float = Field(default=0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    # OpenAI's: token id (a decimal string, as JSON keys are) -> bias added to its logit
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_MAX, le=LOGIT_BIAS_MAX)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # extensions (vLLM's names and meanings)
    repetition_penalty: float = Field(default=1.0, ge=REPETITION_PENALTY_MIN, le=PENALTY_MAX)
    min_p: float = Field(default=0.0, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    response_format: ResponseFormatSpec | None = None  # JSON answers (both endpoints, as vLLM)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)  # newer name of max_tokens
    logprobs: bool = False  # the chosen tokens' logprobs
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # and this many alternatives
    multimodal_embeddings: EmbeddingMap | None = None  # for placeholders written as text
    # vLLM's chat extensions (mmfuse.chat.ChatOptions): template variables, and how the prompt ends
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None = None
    add_generation_prompt: bool | None = None  # None: true unless continue_final_message
    continue_final_message: bool = False


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the chosen tokens' and N alternatives
    echo: Literal[False] = False  # echoing the prompt is not supported
    multimodal_embeddings: EmbeddingMap | None = None


# -- responses ------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # best first


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
    top_logprobs: list[dict[str, float]] | None = None  # per token: {token text: logprob}, best first
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
    media: Literal["image", "audio", "text"] | None = None  # raw media its encoder takes; None: vectors only


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmfuse"
    root: str | None = None  # the served checkpoint's id (vLLM's convention)
    parent: str | None = None  # for a LoRA adapter: the model it adapts; None for the checkpoint itself
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
