"""Import name of the original sketch; everything lives in :mod:`mmfuse`."""
from mmfuse import InputError, MultimodalPipeline
from mmfuse.compat import MultimodalQwen3Pipeline

__all__ = ["MultimodalQwen3Pipeline", "MultimodalPipeline", "InputError"]
