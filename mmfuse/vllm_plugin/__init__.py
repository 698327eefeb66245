"""mmfuse as a vLLM plugin.

vLLM calls ``register()`` in every process it starts (entry point group
``vllm.general_plugins``, declared in pyproject.toml). Registration is by
``"module:Class"`` string, so neither importing mmfuse nor registering imports
the model code, starts an engine or touches a device.

- ``model.py``: ``MMFuseForCausalLM``, the one wrapper class behind every ``MMFuse<Base>`` name
- ``processing.py``: data parser, placeholder expansion and dummy inputs for vLLM's processor API

Only what vLLM itself runs lives here; the client that drives an engine is
``mmfuse.backends.vllm``.
"""
from __future__ import annotations

from ..checkpoint import SUPPORTED_BASES
from ..config import wrapper_architecture

MODEL_CLASS = "mmfuse.vllm_plugin.model:MMFuseForCausalLM"
ARCHITECTURES = tuple(wrapper_architecture(base) for base in SUPPORTED_BASES)


def register() -> None:
    """Register ``MMFuseQwen3ForCausalLM``, ``MMFuseQwen2ForCausalLM``, ``MMFuseLlamaForCausalLM`` and
    ``MMFuseMistralForCausalLM`` with vLLM's model registry (lazily, by name)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL_CLASS)
