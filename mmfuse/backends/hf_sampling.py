"""vLLM's sampling fields on the transformers backend: which logits processors, in which order.

vLLM's sampler applies, in order: ``min_tokens`` and ``logit_bias``, then the penalties
(repetition, frequency, presence), then, when sampling, temperature, ``min_p`` and
``top_k``/``top_p`` (``vllm/v1/sample/sampler.py``). ``logits_processors`` builds the first
group from transformers' own processors (``MinNewTokensLengthLogitsProcessor``,
``SequenceBiasLogitsProcessor``, ``RepetitionPenaltyLogitsProcessor``) plus ``OutputPenalties``
(presence and frequency have no transformers processor); transformers runs these custom
processors before its warpers, which ``GenerationConfig`` builds (temperature, top_k, top_p,
min_p). Greedy answers therefore equal vLLM's with the same fields.

``response_format`` is a grammar over the tokens, compiled by xgrammar exactly as vLLM's
xgrammar backend compiles it (compact JSON), and applied first, as vLLM masks the logits
before its sampler (``JSONGrammar``).

Generation starts from ``inputs_embeds``, so transformers' ``input_ids`` hold only the
generated tokens: the repetition penalty, which vLLM applies to prompt and output tokens,
gets the prompt's ids prepended (``WithPrompt``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..inputs import EncodedPrompt, InputError
from ..sampling import ResponseFormat, SamplingConfig

# on_token(prompt, choice, token, logprob, top): a token just chosen (logprob and top None unless asked)
OnToken = Callable[[int, int, int, "float | None", "dict[int, float] | None"], None]


class OutputPenalties:
    """vLLM's frequency and presence penalties over the generated tokens:
    ``logits -= frequency * count(token) + presence * (count(token) > 0)``."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, generated so far]; scores: [B, V]
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class WithPrompt:
    """Runs ``processor`` over prompt + generated ids: transformers passes only the generated ones when
    generation starts from embeddings. ``prompt_ids``: [B, P], each row left-padded with its own first
    token (a repeat of a prompt token changes no set of seen tokens, unlike a pad id)."""

    def __init__(self, processor, prompt_ids: torch.Tensor):
        self.processor, self.prompt_ids = processor, prompt_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(torch.cat([self.prompt_ids, input_ids], dim=1), scores)


def prompt_ids(prompts: Sequence[EncodedPrompt], n: int, device) -> torch.Tensor:
    """[B * n, P]: each prompt's expanded ids (the tokens vLLM's penalties see), once per returned sequence."""
    width = max(len(p.expanded_ids) for p in prompts)
    rows = [[p.expanded_ids[0]] * (width - len(p.expanded_ids)) + list(p.expanded_ids) for p in prompts]
    return torch.tensor(rows, device=device).repeat_interleave(n, dim=0)


class JSONGrammar:
    """Masks every token the JSON grammar does not allow next, per row (xgrammar's matcher). A row that
    ended (EOS, a stop token or string: transformers then feeds it padding) is left alone."""

    def __init__(self, compiled, rows: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        self.ended = [False] * rows
        self.bitmask = xgr.allocate_token_bitmask(rows, compiled.tokenizer_info.vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [rows, generated so far]; the last column is the token chosen at the previous step
        live = []
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] and not self.ended[row]:
                # a token the grammar refuses came from outside it: the row has ended (padding)
                self.ended[row] = matcher.is_terminated() or not matcher.accept_token(int(input_ids[row, -1]))
            if not self.ended[row] and not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
                live.append(row)
        if live:
            masked = scores.float().cpu()
            self.xgr.apply_token_bitmask_inplace(masked, self.bitmask, indices=live)
            scores = masked.to(scores.device, scores.dtype)
        return scores


def grammar_compiler(checkpoint):
    """An xgrammar compiler for the checkpoint's tokenizer, as vLLM's xgrammar backend makes it (the
    grammar ends on the checkpoint's EOS ids)."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise InputError("response_format: the transformers backend constrains answers with xgrammar, which "
                         "is not installed (pip install xgrammar)", "response_format") from None
    info = xgr.TokenizerInfo.from_huggingface(checkpoint.tokenizer, vocab_size=checkpoint.vocab_size,
                                              stop_token_ids=sorted(checkpoint.eos_token_ids))
    return xgr.GrammarCompiler(info, cache_enabled=True)


def compile_json(compiler, fmt: ResponseFormat):
    """vLLM's xgrammar compilation of a response format, compact (``vllm.structured_outputs_config``)."""
    try:
        return compiler.compile_json_schema(fmt.schema or '{"type": "object"}', any_whitespace=False,
                                            separators=(",", ":"))
    except RuntimeError as e:  # xgrammar's refusal of a schema it cannot turn into a grammar
        raise InputError(f"response_format.json_schema.schema: {e}", "response_format") from None


def logits_processors(sampling: SamplingConfig, prompts: Sequence[EncodedPrompt], stop_ids: Iterable[int],
                      device, grammar=None) -> list:
    """The processors vLLM applies before temperature, for ``sampling``'s fields that are set.

    ``stop_ids``: the EOS ids plus ``stop_token_ids``, which ``min_tokens`` holds back.
    ``grammar``: the compiled ``response_format`` grammar, if any."""
    from transformers import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              SequenceBiasLogitsProcessor)

    out = []
    if grammar is not None:
        out.append(JSONGrammar(grammar, len(prompts) * sampling.n))
    if sampling.min_tokens:
        # prompt_length_to_skip=0: input_ids hold only the generated tokens
        out.append(MinNewTokensLengthLogitsProcessor(0, sampling.min_tokens, sorted(stop_ids), device=device))
    if sampling.logit_bias:
        out.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in sampling.logit_bias.items()]))
    if sampling.repetition_penalty != 1:
        out.append(WithPrompt(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty),
                              prompt_ids(prompts, sampling.n, device)))
    if sampling.presence_penalty or sampling.frequency_penalty:
        out.append(OutputPenalties(sampling.presence_penalty, sampling.frequency_penalty))
    return out


class StepTap:
    """Hands ``on_row(row, token, logprob, top)`` each row's token as soon as a decoding step has chosen it.
    It is the first logits processor (so it sees the raw logits, whose logprobs are returned, as vLLM's)
    and generate's streamer (called once the step's tokens are chosen)."""

    def __init__(self, on_row, sampling: SamplingConfig):
        self.on_row, self.sampling = on_row, sampling
        self.raw: torch.Tensor | None = None  # [B * n, V] logprobs of the current step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.sampling.logprobs:
            self.raw = scores.float().log_softmax(-1)
        return scores

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 1:  # generate's first call hands over the prompt ids (none: it starts from embeddings)
            return
        ids = tokens.tolist()
        lps: list = [None] * len(ids)
        top: list = [None] * len(ids)
        if self.raw is not None:
            lps = self.raw.gather(-1, tokens.to(self.raw.device).unsqueeze(-1)).squeeze(-1).tolist()
            if self.sampling.top_logprobs:
                top = top_logprobs(self.raw, self.sampling.top_logprobs)
        for row, (t, lp, tp) in enumerate(zip(ids, lps, top)):
            self.on_row(row, t, lp, tp)

    def end(self) -> None:
        pass


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[dict[int, float]]:
    """logprobs: [steps, V] -> per step, the ``k`` most likely tokens and their logprobs, best first."""
    values, ids = logprobs.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
