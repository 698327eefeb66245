"""mmfuse: text plus any number of named embedding modalities into any Hugging Face causal LM.

Importing mmfuse loads no model, starts no engine and touches no device.
"""
from . import logs

logs.quiet_torch_cpp()  # before torch's first import (below), the only time libtorch reads it
from .checkpoint import init_checkpoint  # noqa: E402
from .config import ConfigError, MMFuseConfig, ModalitySpec  # noqa: E402
from .inputs import InputError  # noqa: E402
from .sampling import Completion, SamplingConfig  # noqa: E402

logs.follow_vllm_level()  # see its docstring: vLLM's engine processes import mmfuse before vLLM
logs.quiet_import_chatter()
__version__ = "0.1.0"
__all__ = ["init_checkpoint", "load", "ConfigError", "InputError", "MMFuseConfig", "ModalitySpec",
           "SamplingConfig", "Completion", "MultimodalPipeline", "MultimodalQwen3Pipeline"]


def load(path_or_id, device="cpu", dtype=None):
    """Open a checkpoint with transformers: an ``MMFuseModel`` (LM + projectors + tokenizer)."""
    import torch
    from .backends.hf import load as _load
    return _load(path_or_id, device=device, dtype=dtype or torch.float32)


def __getattr__(name):  # pipelines import torch/transformers; keep `import mmfuse` light
    if name == "MultimodalPipeline":
        from .pipeline import MultimodalPipeline
        return MultimodalPipeline
    if name == "MultimodalQwen3Pipeline":
        from .compat import MultimodalQwen3Pipeline
        return MultimodalQwen3Pipeline
    raise AttributeError(name)
