"""Sampling settings and completion records, the same for every backend.

``SamplingConfig`` is the one validation layer for sampling: the Python API, the
server and both backends build one, so a value is refused (``InputError`` naming
the field) before anything reaches an engine. Types are exact (no bool as a
number, no string to number, an int field takes no 2.5); ranges are below.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

from .inputs import InputError, check_text

# Accepted ranges (documented in README "Input rules" and docs/server.md)
TEMPERATURE_MIN = 1e-2  # temperature is 0 (greedy) or in [TEMPERATURE_MIN, TEMPERATURE_MAX]: below 1e-2
TEMPERATURE_MAX = 2.0   # logits / t overflow float32 for ordinary logits; vLLM takes at most 2
INT32_MAX = 2**31 - 1   # max_tokens and top_k travel to the engine as int32
SEED_MAX = 2**63 - 1    # seeds travel as int64
MAX_N = 256             # completions per request (Python API; the server caps lower, --max-n)
MAX_STOP_STRINGS = 16   # stop strings per request
MAX_STOP_CHARS = 512    # characters per stop string (stop matching costs grow with their length)
PENALTY_MAX = 2.0       # presence/frequency penalties in [-2, 2] and repetition_penalty at most 2 (OpenAI's, vLLM's)
REPETITION_PENALTY_MIN = 1e-2  # vLLM takes any > 0, but logits / 5e-324 overflow float32: as temperature's bound
LOGIT_BIAS_MAX = 100.0  # |bias| per token (OpenAI's range; vLLM clamps to it)
MAX_LOGIT_BIAS = 1024   # tokens in one logit_bias map
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids per request
MAX_TOP_LOGPROBS = 20   # alternatives per position (OpenAI's cap, vLLM's default max_logprobs)
MAX_SCHEMA_CHARS = 65536  # a response_format JSON schema, serialized (grammar compilation grows with it)


def _fail(name: str, message: str):
    raise InputError(f"{name}: {message}", name.split("[")[0])


def check_int(name: str, value: object, low: int, high: int) -> int:
    """An exact integer (Python or numpy, never a bool, float or string) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, f"expected an integer, got {type(value).__name__} {_short(value)}")
    value = int(value)
    if not low <= value <= high:
        _fail(name, f"expected an integer in [{low}, {high}], got {value}")
    return value


def check_float(name: str, value: object) -> float:
    """A real number (int or float, Python or numpy; never a bool or string), finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, f"expected a number, got {type(value).__name__} {_short(value)}")
    value = float(value)
    if not math.isfinite(value):
        _fail(name, f"expected a finite number, got {value}")
    return value


def check_stop(value: object) -> list[str]:
    """None, a string, or a list of up to MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        _fail("stop", f"expected a string or a list of strings, got {type(value).__name__}")
    if len(value) > MAX_STOP_STRINGS:
        _fail("stop", f"expected at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    out = []
    for i, s in enumerate(value):
        s = check_text(f"stop[{i}]", s)
        if not s:
            _fail(f"stop[{i}]", "expected a non-empty string")
        if len(s) > MAX_STOP_CHARS:
            _fail(f"stop[{i}]", f"expected at most {MAX_STOP_CHARS} characters, got {len(s)}")
        out.append(s)
    return out


def check_token_id(name: str, value: object) -> int:
    """A token id: an exact non-negative integer (its upper bound, the vocabulary, is ``check_token_ids``')."""
    return check_int(name, value, 0, INT32_MAX)


def check_logit_bias(value: object) -> dict[int, float]:
    """None or {token id: bias in [-100, 100]} with at most MAX_LOGIT_BIAS entries."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail("logit_bias", f"expected a mapping of token id to bias, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS:
        _fail("logit_bias", f"expected at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
    out = {}
    for token, bias in value.items():
        token = check_token_id(f"logit_bias[{token!r:.20}]", token)
        bias = check_float(f"logit_bias[{token}]", bias)
        if abs(bias) > LOGIT_BIAS_MAX:
            _fail(f"logit_bias[{token}]", f"expected a bias in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], got {bias!r}")
        out[token] = bias
    return out


def check_token_list(name: str, value: object, most: int) -> list[int]:
    """None or a list of at most ``most`` token ids."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        _fail(name, f"expected a list of token ids, got {type(value).__name__}")
    if len(value) > most:
        _fail(name, f"expected at most {most} token ids, got {len(value)}")
    return [check_token_id(f"{name}[{i}]", t) for i, t in enumerate(value)]


def _in_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    value = check_float(name, value)
    if not (low < value if low_open else low <= value) or value > high:
        _fail(name, f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ResponseFormat:
    """The answer must be JSON: any JSON object (``json_object``) or one valid against ``schema``
    (``json_schema``). ``parse`` takes OpenAI's ``response_format`` object."""

    type: str  # "json_object" or "json_schema"
    schema: str | None = None  # the JSON schema as canonical JSON text (hashable; what engines take)

    @classmethod
    def parse(cls, value: object) -> "ResponseFormat | None":
        """None, a ``ResponseFormat``, or OpenAI's ``{"type": "text" | "json_object" | "json_schema", ...}``
        (``json_schema``: ``{"json_schema": {"name": ..., "schema": {...}, "strict": ...}}``)."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, Mapping) or value.get("type") not in ("text", "json_object", "json_schema"):
            _fail("response_format", "expected {'type': 'text' | 'json_object' | 'json_schema', ...}")
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            _fail("response_format.json_schema.schema", "expected a JSON schema object")
        try:
            text = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            _fail("response_format.json_schema.schema", f"not JSON: {e}")
        if len(text) > MAX_SCHEMA_CHARS:
            _fail("response_format.json_schema.schema", f"expected at most {MAX_SCHEMA_CHARS} characters of JSON, "
                                                        f"got {len(text)}")
        return cls("json_schema", text)


@dataclass
class SamplingConfig:
    """What to generate. Greedy when ``temperature == 0``. The fields and their meaning are vLLM's
    ``SamplingParams`` (and OpenAI's), and both backends apply them in vLLM's order: ``min_tokens`` and
    ``logit_bias``, then the penalties, then (sampling only) temperature, ``top_k``/``top_p``/``min_p``.

    Checked on construction (``InputError`` naming the field): ``max_tokens`` int in
    [1, 2**31-1] (and, once the prompt is known, within the model length: ``check_room``),
    ``temperature`` 0 or in [0.01, 2], ``top_p`` in (0, 1], ``top_k`` int in [0, 2**31-1]
    (0 = off; above the vocabulary means all tokens), ``min_p`` in [0, 1], ``seed`` None or int in
    [0, 2**63-1], ``stop`` a string or up to 16 non-empty valid-UTF-8 strings of at most 512 characters,
    ``stop_token_ids`` up to 64 token ids, ``n`` int in [1, 256], ``presence_penalty`` and
    ``frequency_penalty`` in [-2, 2], ``repetition_penalty`` in [0.01, 2], ``min_tokens`` int in
    [0, max_tokens], ``logit_bias`` {token id: bias in [-100, 100]} (up to 1024 tokens), ``logprobs``
    a bool, ``top_logprobs`` int in [0, 20] (needs ``logprobs``), ``response_format`` a ``ResponseFormat``
    or OpenAI's object. Token ids are checked against the model's vocabulary once it is known
    (``check_token_ids``).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1)
    min_p: float = 0.0  # 0 = off; keep tokens with probability >= min_p * the top token's
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # end the completion (the token is not in the text)
    n: int = 1
    presence_penalty: float = 0.0  # subtracted from each token's logit once it was generated
    frequency_penalty: float = 0.0  # subtracted once per time the token was generated
    repetition_penalty: float = 1.0  # tokens of prompt or output: positive logits / it, negative ones * it
    min_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens were generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the token's logit before the penalties
    logprobs: bool = False  # return the chosen tokens' logprobs (of the raw model distribution, as vLLM)
    top_logprobs: int = 0  # and this many most likely alternatives per position
    response_format: ResponseFormat | None = None  # constrain the answer to JSON (a grammar over the tokens)

    def __post_init__(self) -> None:
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        t = self.temperature = check_float("temperature", self.temperature)
        if t != 0 and not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
            _fail("temperature", f"expected 0 (greedy) or a number in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}], "
                                 f"got {t!r}")
        self.top_p = _in_range("top_p", self.top_p, 0, 1, low_open=True)
        self.top_k = check_int("top_k", self.top_k, 0, INT32_MAX)
        self.min_p = _in_range("min_p", self.min_p, 0, 1)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, SEED_MAX)
        self.stop = check_stop(self.stop)
        self.stop_token_ids = check_token_list("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
        self.n = check_int("n", self.n, 1, MAX_N)
        self.presence_penalty = _in_range("presence_penalty", self.presence_penalty, -PENALTY_MAX, PENALTY_MAX)
        self.frequency_penalty = _in_range("frequency_penalty", self.frequency_penalty, -PENALTY_MAX, PENALTY_MAX)
        self.repetition_penalty = _in_range("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY_MIN,
                                            PENALTY_MAX)
        self.min_tokens = check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        self.logit_bias = check_logit_bias(self.logit_bias)
        if not isinstance(self.logprobs, bool):
            _fail("logprobs", f"expected true or false, got {type(self.logprobs).__name__}")
        self.top_logprobs = check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            _fail("top_logprobs", "needs logprobs=True")
        self.response_format = ResponseFormat.parse(self.response_format)

    @classmethod
    def from_fields(cls, **fields: object) -> "SamplingConfig":
        """``SamplingConfig(**fields)`` with an unknown name refused as an ``InputError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            _fail(unknown[0], f"not a sampling option; expected one of {sorted(known)}")
        return cls(**fields)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the penalties need the token history)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_room(sampling: SamplingConfig, prompt_tokens: int, max_len: int) -> None:
    """``max_tokens`` must fit in the model's length after a prompt of ``prompt_tokens`` tokens."""
    room = max_len - prompt_tokens
    if sampling.max_tokens > room:
        _fail("max_tokens", f"the prompt has {prompt_tokens} tokens, so at most {max(room, 0)} more fit in the "
                            f"model's {max_len}; asked for {sampling.max_tokens}")


def check_token_ids(sampling: SamplingConfig, vocab_size: int) -> None:
    """The token ids of ``logit_bias`` and ``stop_token_ids`` must be in the model's vocabulary."""
    for name, ids in (("logit_bias", sampling.logit_bias), ("stop_token_ids", sampling.stop_token_ids)):
        for i, token in enumerate(ids):
            if token >= vocab_size:
                where = f"logit_bias[{token}]" if name == "logit_bias" else f"stop_token_ids[{i}]"
                _fail(where, f"token id {token} is outside the model's vocabulary of {vocab_size}")


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None = None  # per generated token, when asked
    top_logprobs: list[dict[int, float]] | None = None  # per generated token, the most likely ones, best first


def visible_tokens(token_ids: list[int], sampling: SamplingConfig) -> list[int]:
    """The tokens whose text is returned: a final stop token id ended the completion and is not shown
    (vLLM's rule; EOS is a special token, skipped when decoding anyway)."""
    if token_ids and token_ids[-1] in sampling.stop_token_ids:
        return token_ids[:-1]
    return token_ids


def engine_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """What to ask an engine for: greedy draws are identical, and neither transformers nor vLLM
    takes n > 1 without sampling, so greedy n > 1 is asked once (callers copy the answer n times)."""
    return dataclasses.replace(sampling, n=1) if sampling.greedy and sampling.n > 1 else sampling


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut at the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
