"""Session fixtures: tiny base LMs and mmfuse checkpoints, built once and loaded from disk.

Checkpoint ``qwen3_ckpt``/``llama_ckpt`` modalities:
  m1: 32-d vectors, mlp2x_gelu, 1 token per vector
  m2: 16-d vectors, linear, 2 tokens per vector, placeholder "<|sensor|>", max 4 items
"""
from __future__ import annotations

import os

import pytest

# vLLM on this 2-core CPU: small KV cache, use both cores (see DEVELOPERS.md)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmfuse import ModalitySpec, init_checkpoint  # noqa: E402
from mmfuse.tiny import make_base  # noqa: E402

MODALITIES = [
    ModalitySpec(name="m1", input_dim=32),
    ModalitySpec(name="m2", input_dim=16, projector="linear", tokens_per_item=2, placeholder="<|sensor|>", max_items=4),
]


def _fresh_specs():
    return [ModalitySpec(**vars(s)) for s in MODALITIES]


@pytest.fixture(scope="session")
def qwen3_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("qwen3_base"), family="qwen3", seed=0)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("llama_base"), family="llama", seed=1)


@pytest.fixture(scope="session")
def qwen3_ckpt(qwen3_base, tmp_path_factory):
    return init_checkpoint(qwen3_base, tmp_path_factory.mktemp("qwen3_ckpt"), _fresh_specs(), seed=0)


@pytest.fixture(scope="session")
def llama_ckpt(llama_base, tmp_path_factory):
    return init_checkpoint(llama_base, tmp_path_factory.mktemp("llama_ckpt"), _fresh_specs(), seed=1)


@pytest.fixture(scope="session")
def qwen3_model(qwen3_ckpt):
    from mmfuse import load
    return load(qwen3_ckpt)


@pytest.fixture(scope="session")
def llama_model(llama_ckpt):
    from mmfuse import load
    return load(llama_ckpt)
