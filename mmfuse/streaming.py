"""Streaming: generated tokens in, text deltas out, the same way on every backend.

A backend hands each new token of a choice to that choice's ``TextDeltas``, which releases
text only once it is final: never a partial UTF-8 character (a trailing U+FFFD), never the
text of a stop token, never what a stop string may still cut (the last ``len(longest stop) - 1``
characters are held back). When the backend's whole ``Completion`` is known, ``finish``
releases the rest, so the joined deltas equal the non-streamed text exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from .sampling import Completion, SamplingConfig

log = logging.getLogger("mmfuse")


@dataclass
class Delta:
    """New output of choice ``index``: text, its tokens (and their logprobs); ``finish_reason`` on the last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per token, the most likely ones, best first


class TextDeltas:
    """One choice's tokens in (``push``), its text deltas out; ``finish`` with the final ``Completion``.

    ``stop_ids``: EOS and ``stop_token_ids``; the token that ends the choice is not shown, and tokens
    after the end (a batch's padding for a finished row) are ignored.
    """

    def __init__(self, tokenizer, sampling: SamplingConfig, stop_ids: Collection[int], index: int = 0):
        self.tokenizer, self.sampling, self.stop_ids, self.index = tokenizer, sampling, stop_ids, index
        self.hold = max((len(s) for s in sampling.stop), default=1) - 1  # characters a stop string may still cut
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.sent_text, self.sent_tokens = "", 0  # released so far
        self.ended = False  # a stop token or stop string was seen: later tokens are padding

    def push(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> Delta | None:
        """One new token; a delta when there is new final text."""
        if self.ended:
            return None
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top.append(top or {})
        if token in self.stop_ids:
            self.ended = True
            return None
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.ended = True
            return None
        upto = len(text) - self.hold
        if text.endswith("\ufffd") or upto <= len(self.sent_text):
            return None
        return self._release(text[:upto], len(self.tokens))

    def finish(self, completion: Completion) -> Delta:
        """The rest of the final text and tokens, with the finish reason."""
        if not completion.text.startswith(self.sent_text):  # a tokenizer whose decode is not prefix-stable
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent_text, completion.text)
        self.tokens, self.logprobs = completion.token_ids, completion.logprobs or []
        self.top = completion.top_logprobs or []
        delta = self._release(completion.text, max(len(completion.token_ids), self.sent_tokens))
        delta.finish_reason = completion.finish_reason
        return delta

    def _release(self, text: str, upto: int) -> Delta:
        start = self.sent_tokens
        delta = Delta(self.index, text[len(self.sent_text):], self.tokens[start:upto],
                      self.logprobs[start:upto] if self.sampling.logprobs else None,
                      top_logprobs=self.top[start:upto] if self.sampling.top_logprobs else None)
        self.sent_text, self.sent_tokens = text, upto
        return delta
