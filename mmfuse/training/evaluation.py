"""Held-out metrics: teacher-forced loss on response tokens, and scores of greedy generations.

``token_loss_sum`` is the one loss of this package: training, in-training eval and
``mmfuse eval`` all sum cross-entropy over labelled (response) tokens, and divide
by the token count of the whole (global) batch only at the end. Generations are
scored by ``scores.text_scores`` (exact match, token F1, BLEU, ROUGE); ``--ablate``
re-scores them with a modality's vectors destroyed (``ablation``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..sampling import SamplingConfig
from .config import EvalConfig
from .data import column_names, iter_rows, open_dataset
from .encode import IGNORE, Batch, DataError, Example, RowEncoder
from .scores import is_exact, text_scores


def token_loss_sum(model, batch: Batch, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's labelled positions (a 0-dim fp32 tensor)."""
    device = model.device
    with autocast():
        logits = model(batch.input_ids.to(device), batch.items, **batch.lm_kwargs(device)).logits  # [B, S, V]
    logits = logits[:, :-1].float()  # position t predicts token t+1
    labels = batch.labels[:, 1:].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


@torch.no_grad()
def loss_totals(model, encoder: RowEncoder, examples: Sequence[Example], batch_size: int,
                autocast=contextlib.nullcontext) -> tuple[float, int]:
    """(summed loss, labelled tokens) over ``examples``."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = encoder.collate(list(examples[i:i + batch_size]))
        total += float(token_loss_sum(model, batch, autocast))
        tokens += batch.num_targets
    return total, tokens


@torch.no_grad()
def exact_match_hits(model, examples: Sequence[Example], max_tokens: int, batch_size: int) -> int:
    """Greedy generations from the HF reference that equal their response."""
    from ..backends.hf import generate

    sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0)
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        outs = generate(model, [e.prompt for e in chunk], sampling)
        hits += sum(is_exact(o[0].text, e.response) for o, e in zip(outs, chunk))
    return hits


def load_rows(encoder: RowEncoder, data: str | os.PathLike, limit: int | None = None) -> list[tuple[int, dict]]:
    """(row index, row) of a (held-out) dataset, the first ``limit`` rows, its columns checked."""
    ds = open_dataset(data)
    encoder.check_columns(column_names(ds))
    return list(itertools.islice(iter_rows(ds), limit))


def load_examples(encoder: RowEncoder, data: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """Encode a whole (held-out) dataset; the first bad row raises ``DataError``."""
    return [encoder.encode(row, i) for i, row in load_rows(encoder, data, limit)]


def generate_texts(backend, examples: Sequence[Example], sampling: SamplingConfig, batch_size: int) -> list[str]:
    """One generation per example on any backend, in order."""
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        out += [o[0].text for o in backend.generate([e.prompt for e in examples[i:i + batch_size]], sampling)]
    return out


def evaluate(ckpt: str | os.PathLike, data: str | os.PathLike, config: EvalConfig | None = None) -> dict:
    """Metrics of a checkpoint on a dataset: ``{"n", "exact_match", "token_f1", "bleu", "rouge1", "rouge2",
    "rougeL", "eval_loss"?, "backend", "max_tokens", "ablation"?}``.

    Generations (greedy) run on the selected backend (so ``backend="vllm"`` measures the vLLM
    plugin); eval loss needs the transformers model and is reported for hf. With ``config.ablate``,
    ``"ablation"`` holds ``{mode: {modality or "all": {"scores": ..., "drops": ...}}}`` (``ablation``).
    """
    from ..backends import open_backend
    from .ablation import ablation_report, modalities_present

    config = config or EvalConfig()
    backend = open_backend(ckpt, config.backend, kv_cache_gb=config.kv_cache_gb, max_model_len=config.max_model_len)
    try:
        model = getattr(backend, "model", None)  # the HF backend's MMFuseModel
        encoder = RowEncoder(backend.checkpoint)
        rows = load_rows(encoder, data, config.limit)
        examples = [encoder.encode(row, i) for i, row in rows]
        if not examples:
            raise ValueError(f"{data}: no rows to evaluate")
        references = [e.response for e in examples]
        max_tokens = config.max_tokens or max(len(e.input_ids) - e.prompt_len for e in examples) + 1
        sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0)

        def score(rows_) -> dict:
            texts = generate_texts(backend, [encoder.encode(row, i) for i, row in rows_], sampling, config.batch_size)
            return text_scores(texts, references)

        scores = text_scores(generate_texts(backend, examples, sampling, config.batch_size), references)
        metrics = {"n": len(examples), **scores, "backend": backend.name, "max_tokens": max_tokens}
        if config.loss and model is not None:
            total, tokens = loss_totals(model, encoder, examples, config.batch_size)
            metrics["eval_loss"] = total / tokens
            metrics["eval_tokens"] = tokens
        if config.ablate:
            names = modalities_present(rows, list(encoder.specs))
            if not names:
                raise DataError(f"{data}: --ablate found no items in any mm_NAME column of the evaluated rows")
            metrics["ablation"] = ablation_report(rows, names, config.ablate, score, scores, config.seed)
    finally:
        backend.close()
    return metrics


def metrics_line(metrics: dict) -> str:
    return json.dumps(metrics, sort_keys=True)
