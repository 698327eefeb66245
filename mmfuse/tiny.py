"""Small base LMs and tokenizers built locally (the hub is not needed).

Used by tests, the on-the-fly demo and benchmarks. Everything is written as a
normal Hugging Face model directory and then opened through the same code path
as any user model.
"""
from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = """the quick brown fox jumps over the lazy dog while a small red cube sits left of a large blue sphere
compare these two vectors and describe what they have in common describe the image the audio the protein
hello world this is a tiny language model used for tests of multimodal fusion with named embeddings
one two three four five six seven eight nine ten green yellow purple orange black white circle square triangle
""" * 4


def make_tokenizer(out: str | os.PathLike, vocab_size: int = 512, corpus: str = _CORPUS):
    """Train a byte-level BPE tokenizer with a chat template and save it to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus.splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(out)
    return tok


def make_base(out: str | os.PathLike, family: str = "qwen3", hidden: int = 128, layers: int = 2, heads: int = 2,
              kv_heads: int = 1, intermediate: int = 256, vocab: int | None = None, max_len: int = 1024,
              tokenizer_vocab: int = 512, seed: int = 0, init_std: float = 0.1, tokenizer_dir=None) -> Path:
    """Write a randomly initialised base causal LM (``qwen3`` or ``llama``) plus tokenizer to ``out``.

    head_dim is ``hidden // heads`` (vLLM's CPU attention needs 64 or more).
    ``init_std`` is large so random logits are peaked and greedy choices are not near-ties.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else make_tokenizer(out, tokenizer_vocab)
    if tokenizer_dir:
        tok.save_pretrained(out)
    vocab = vocab or (len(tok) + 63) // 64 * 64 + 64  # spare rows: placeholders need no resize
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_len,
                  initializer_range=init_std, bos_token_id=None, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, head_dim=hidden // heads)
    if family == "qwen3":
        config = Qwen3Config(tie_word_embeddings=True, **common)
    elif family == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"family: expected 'qwen3' or 'llama', got {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out
