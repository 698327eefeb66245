"""Sampling settings and completion records, the same for every backend."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    """What to generate. Greedy when ``temperature == 0``."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False  # return the chosen tokens' logprobs

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = {"max_tokens": self.max_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "n": self.n >= 1}
        for name, ok in checks.items():
            if not ok:
                from .inputs import InputError
                raise InputError(f"{name}: invalid value {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
