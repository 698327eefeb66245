"""Quantizing the LM while transformers loads it (the transformers backend's ``quantization_config``).

vLLM runs quantized checkpoints as they are stored (compressed-tensors, AWQ, GPTQ: ``mmfuse init`` keeps
their ``quantization_config``); the transformers backend can also quantize a full-precision checkpoint on
load, with the quantizers transformers integrates: torchao int8 weight-only (CPU and GPU) and bitsandbytes
(NVIDIA GPUs). Only the LM's linear layers are quantized; projectors and encoders stay in full precision.
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError

# shorthand -> what it builds; a transformers QuantizationConfig object is taken as it is
SHORTHANDS = {
    "torchao-int8": "torchao Int8WeightOnlyConfig: int8 weights, one scale per output channel (CPU, GPU)",
    "bnb-8bit": "bitsandbytes LLM.int8 (NVIDIA GPU)",
    "bnb-4bit": "bitsandbytes NF4 (NVIDIA GPU)",
}


def hf_quantization_config(spec: Any) -> Any:
    """The transformers ``quantization_config`` for ``spec``: None, a shorthand in ``SHORTHANDS``, or a
    ``transformers`` quantization config object (``TorchAoConfig``, ``BitsAndBytesConfig``, ...)."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        from transformers.utils.quantization_config import QuantizationConfigMixin
        if not isinstance(spec, QuantizationConfigMixin):
            raise ConfigError(f"quantization_config: expected one of {sorted(SHORTHANDS)} or a transformers "
                              f"quantization config object, got {type(spec).__name__}")
        return spec
    if spec not in SHORTHANDS:
        raise ConfigError(f"quantization_config: expected one of {sorted(SHORTHANDS)}, got {spec!r}")
    if spec == "torchao-int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError:
            raise ConfigError("quantization_config: 'torchao-int8' needs torchao (pip install 'mmfuse[quant]')") \
                from None
        from transformers import TorchAoConfig
        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_8bit=spec == "bnb-8bit", load_in_4bit=spec == "bnb-4bit")
