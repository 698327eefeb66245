"""``--device`` for the benchmark commands: the same command on CPU (fp32) or an NVIDIA GPU (bf16).

On CPU everything runs in float32 (exact parity between the backends); on a GPU in bfloat16, the
dtype a GPU deployment would run. Asking for ``cuda`` where torch sees no GPU, or where the installed
vLLM is a CPU build, stops the command at once with the reason, before any model is built.
"""
from __future__ import annotations

import argparse

DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


def add_device_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=sorted(DTYPES), default="cpu",
                    help="where both backends run: cpu (float32) or cuda (bfloat16, needs an NVIDIA GPU and a CUDA "
                         "build of torch and vLLM)")


def check_device(device: str, needs_vllm: bool = True) -> str:
    """The run dtype for ``device``; ``SystemExit`` with the reason when ``cuda`` cannot run here."""
    if device == "cpu":
        return DTYPES[device]
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} "
                         f"(torch.cuda.is_available() is False); run with --device cpu, or on a machine with a GPU")
    if needs_vllm:
        from vllm.platforms import current_platform

        if current_platform.device_type != "cuda":
            raise SystemExit(f"--device cuda: the installed vLLM is a {current_platform.device_type!r} build; "
                             "install a CUDA build of vLLM")
    return DTYPES[device]
