"""Pretrain the demo's tiny base LM on the task's training sentences, as a plain causal LM.

No modalities here: this only teaches the LM the grammar's words and word order,
the way a real base LM arrives knowing its language. Conditioning on vectors is
learned later by ``mmfuse.training`` (stage 1 and 2). Each sequence is
``EOS sentence EOS``: the leading EOS stands in for a BOS so the first word is
trained too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class PretrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3  # high for a 3M-parameter model trained from scratch on short sequences
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0


def _batches(ids: list[list[int]], pad: int, config: PretrainConfig):
    """Endless shuffled batches: (input_ids [B, S], attention_mask [B, S], labels [B, S])."""
    gen = torch.Generator().manual_seed(config.seed)
    while True:
        order = torch.randperm(len(ids), generator=gen).tolist()
        for i in range(0, len(order) - config.batch_size + 1, config.batch_size):
            rows = [ids[j] for j in order[i:i + config.batch_size]]
            width = max(map(len, rows))
            x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            yield x, mask, x.masked_fill(mask == 0, -100)


def pretrain(base: Path, sentences: list[str], config: PretrainConfig) -> Path:
    """Train the randomly initialised LM at ``base`` in place; returns ``base``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    eos = tok.eos_token_id
    ids = [[eos] + tok(s, add_special_tokens=False)["input_ids"] + [eos] for s in sentences]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    batches = _batches(ids, tok.pad_token_id, config)
    for step in range(config.steps):
        x, mask, labels = next(batches)
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]  # position t predicts t+1
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == config.steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.4f}", flush=True)
    model.save_pretrained(base)
    return base
