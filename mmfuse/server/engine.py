"""What the server needs from a backend, and how one is picked.

An engine takes one validated request at a time, asynchronously:
``prompt_length(prepared)`` (tokens after items expand; raises InputError when
the model cannot take it), ``await generate(prepared, sampling)`` -> ``n``
``Completion``s, ``stream(prepared, sampling)`` -> ``Delta``s, ``await close()``
(finishes what was accepted, then stops). Batching across requests is the
engine's business: a queue that runs equal-settings requests as one batch for
transformers (``batching.HFEngine``), vLLM's own continuous batching for vLLM
(``vllm_engine.VLLMEngine``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling import Completion
from .settings import ServerSettings


@dataclass
class Delta:
    """New output of choice ``index``: text, its tokens (and their logprobs); ``finish_reason`` on the last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None


def completion_deltas(tokenizer, index: int, completion: Completion) -> list[Delta]:
    """A finished completion as per-token deltas whose texts join to exactly ``completion.text``.

    Text is released only when the decoded prefix is stable (no partial UTF-8 character)
    and never past the final, stop-truncated text.
    """
    final, toks, lps = completion.text, completion.token_ids, completion.logprobs
    out: list[Delta] = []
    sent, start = 0, 0  # characters released; first token not yet attached to a delta
    for i in range(1, len(toks) + 1):
        text = tokenizer.decode(toks[:i], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        upto = min(len(text), len(final))
        if upto > sent and final.startswith(text[:upto]):
            out.append(Delta(index, final[sent:upto], toks[start:i], lps[start:i] if lps else None))
            sent, start = upto, i
    if sent < len(final) or start < len(toks) or not out:
        out.append(Delta(index, final[sent:], toks[start:], lps[start:] if lps else None))
    out[-1].finish_reason = completion.finish_reason
    return out


def make_engine(settings: ServerSettings, on_batch=None):
    """The engine for ``settings.backend`` (``auto``: vLLM when importable).

    ``on_batch(requests, seconds)``: called after each transformers batch (vLLM batches per step itself).
    """
    from ..pipeline import vllm_available

    backend = settings.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        from .vllm_engine import VLLMEngine
        return VLLMEngine(settings.model, dtype=settings.dtype, max_model_len=settings.max_model_len,
                          max_num_seqs=settings.max_batch_size)
    from ..pipeline import HFBackend
    from .batching import HFEngine
    if settings.torch_threads is not None:
        import torch
        torch.set_num_threads(settings.torch_threads)
    return HFEngine(HFBackend(settings.model, device=settings.device, dtype=settings.dtype),
                    max_batch_size=settings.max_batch_size, on_batch=on_batch)
