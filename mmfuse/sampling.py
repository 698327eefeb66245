"""Sampling settings and completion records, the same for every backend.

``SamplingConfig`` is the one validation layer for sampling: the Python API, the
server and both backends build one, so a value is refused (``InputError`` naming
the field) before anything reaches an engine. Types are exact (no bool as a
number, no string to number, an int field takes no 2.5); ranges are below.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class SamplingConfig:
    """What to generate. Greedy when ``temperature == 0``.

    Checked on construction (``InputError`` naming the field): ``max_tokens`` int in
    [1, 2**31-1] (and, once the prompt is known, within the model length: ``check_room``),
    ``temperature`` 0 or in [0.01, 2], ``top_p`` in (0, 1], ``top_k`` int in [0, 2**31-1]
    (0 = off; above the vocabulary means all tokens), ``seed`` None or int in [0, 2**63-1],
    ``stop`` a string or up to 16 non-empty valid-UTF-8 strings of at most 512 characters,
    ``n`` int in [1, 256], ``logprobs`` a bool.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False  # return the chosen tokens' logprobs

    def __post_init__(self) -> None:
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        t = self.temperature = check_float("temperature", self.temperature)
        if t != 0 and not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
            _fail("temperature", f"expected 0 (greedy) or a number in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}], "
                                 f"got {t!r}")
        self.top_p = check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            _fail("top_p", f"expected a number in (0, 1], got {self.top_p!r}")
        self.top_k = check_int("top_k", self.top_k, 0, INT32_MAX)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, SEED_MAX)
        self.stop = check_stop(self.stop)
        self.n = check_int("n", self.n, 1, MAX_N)
        if not isinstance(self.logprobs, bool):
            _fail("logprobs", f"expected true or false, got {type(self.logprobs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_room(sampling: SamplingConfig, prompt_tokens: int, max_len: int) -> None:
    """``max_tokens`` must fit in the model's length after a prompt of ``prompt_tokens`` tokens."""
    room = max_len - prompt_tokens
    if sampling.max_tokens > room:
        _fail("max_tokens", f"the prompt has {prompt_tokens} tokens, so at most {max(room, 0)} more fit in the "
                            f"model's {max_len}; asked for {sampling.max_tokens}")


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None = None  # per generated token, when asked


def engine_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """What to ask an engine for: greedy draws are identical, and neither transformers nor vLLM
    takes n > 1 without sampling, so greedy n > 1 is asked once (callers copy the answer n times)."""
    return dataclasses.replace(sampling, n=1) if sampling.greedy and sampling.n > 1 else sampling


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut at the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
