"""The benchmark's model and requests, built locally (no hub).

Model: Qwen3-0.6B's real shape (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim
128, intermediate 3072, vocab 151936, tied embeddings) with random weights, plus two
modalities: ``vision`` (768-d, mlp2x_gelu, 1 row per vector) and ``audio`` (512-d,
linear, 2 rows per vector). The tokenizer is mmfuse's tiny one: its ids fit the real
vocabulary, so every matmul has the real size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModalitySpec
from ..inputs import PreparedPrompt, prepare

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True)
MODALITIES = [ModalitySpec(name="vision", input_dim=768),
              ModalitySpec(name="audio", input_dim=512, projector="linear", tokens_per_item=2)]
WORDS = ("the quick brown fox jumps over the lazy dog while a small red cube sits left of a large blue sphere "
         "compare these two vectors and describe what they have in common one two three four five six").split()


def base_dir(workdir: Path, layers: int) -> Path:
    """Where ``build_checkpoint`` keeps the plain base LM (what a vLLM ``prompt_embeds`` user would serve)."""
    return workdir / f"qwen3-0.6b-shape-L{layers}"


def build_checkpoint(workdir: Path, layers: int, max_len: int = 2048) -> Path:
    """Write (once) a random Qwen3-0.6B-shaped base and an mmfuse checkpoint over it; return the checkpoint."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from ..checkpoint import init_checkpoint
    from ..tiny import make_tokenizer

    base, ckpt = base_dir(workdir, layers), workdir / f"mmfuse-qwen3-0.6b-shape-L{layers}"
    if (ckpt / "config.json").exists():
        return ckpt
    tok = make_tokenizer(base)
    config = Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": layers}, max_position_embeddings=max_len,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(base)
    del model
    init_checkpoint(base, ckpt, [ModalitySpec(**vars(s)) for s in MODALITIES], link=True)
    return ckpt


def make_prompts(specs, count: int, seed: int, items: int, words: int) -> list[PreparedPrompt]:
    """``count`` prompts of ``words`` random words with ``items`` items between them, alternating
    vision (3, 768) -> 3 rows and audio (2, 512) -> 4 rows. Fresh seed = fresh content (no cache hits)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        parts = list(rng.choice(WORDS, words))
        mm: dict[str, list] = {"vision": [], "audio": []}
        for i in range(items):
            name = "vision" if i % 2 == 0 else "audio"
            mm[name].append(rng.standard_normal((3 if name == "vision" else 2, specs[name].input_dim),
                                                dtype=np.float32))
            parts.insert(int(rng.integers(0, len(parts) + 1)), specs[name].placeholder)
        prompts.append(prepare(" ".join(parts), {k: v for k, v in mm.items() if v}, specs))
    return prompts


def long_text(words: int, seed: int) -> str:
    """``words`` random words: a document long enough to fill several prefix-cache blocks."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, words))


def make_items(specs, seed: int) -> dict[str, list]:
    """One vision item (3 vectors) and one audio item (2 vectors): 7 soft rows, fresh per seed."""
    rng = np.random.default_rng(seed)
    return {name: [rng.standard_normal((n, specs[name].input_dim), dtype=np.float32)]
            for name, n in (("vision", 3), ("audio", 2))}


def make_mixed(specs, count: int, seed: int, min_out: int, max_out: int,
               words: tuple[int, int] = (8, 40)) -> list[tuple[PreparedPrompt, int]]:
    """A serving-like mix: 0-4 items of 1-4 vectors, varying text, output lengths spread min_out..max_out."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n_items = int(rng.integers(0, 5))
        parts = list(rng.choice(WORDS, int(rng.integers(*words))))
        mm: dict[str, list] = {}
        for _ in range(n_items):
            name = "vision" if rng.random() < 0.6 else "audio"
            mm.setdefault(name, []).append(rng.standard_normal((int(rng.integers(1, 5)), specs[name].input_dim),
                                                               dtype=np.float32))
            parts.insert(int(rng.integers(0, len(parts) + 1)), specs[name].placeholder)
        max_tokens = int(round(min_out + (max_out - min_out) * i / max(1, count - 1)))
        out.append((prepare(" ".join(parts), mm, specs), max_tokens))
    order = rng.permutation(count)  # lengths spread evenly, arrival order random
    return [out[k] for k in order]
