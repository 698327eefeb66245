"""Thin checkpoints (``mmfuse.thin``): export, size, and identical generation on both backends."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmfuse import ModalitySpec, MultimodalPipeline, init_checkpoint, load
from mmfuse.cli import main
from mmfuse.config import ConfigError
from mmfuse.thin import BASE_FILE, export_thin

REQUEST = {"text": "describe <|m1|> and <|sensor|>", "multimodal_data": {"multimodal_embeddings": {
    "m1": [np.random.default_rng(0).standard_normal(32).astype(np.float32)],
    "m2": [np.random.default_rng(1).standard_normal(16).astype(np.float32)]}}}


def size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.fixture(scope="module")
def thin(qwen3_ckpt, qwen3_base, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MMFUSE_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("thin") / "ckpt"
    assert main(["export", "--thin", str(qwen3_ckpt), str(out), "--base", str(qwen3_base)]) == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_thin_checkpoint_is_small_and_refers_to_its_base(thin, qwen3_ckpt, qwen3_base, tmp_path):
    # the tiny base's LM is 1.5 MB; the session checkpoint's mlp2x_gelu projector alone is 0.1 MB (7%), so the
    # bound is checked on a checkpoint with linear projectors; the thin file set is the same
    assert size(thin) < size(qwen3_ckpt) - 1_400_000
    full = init_checkpoint(qwen3_base, tmp_path / "full", [
        ModalitySpec("m1", input_dim=32, projector="linear"),
        ModalitySpec("m2", input_dim=16, projector="linear", tokens_per_item=2, placeholder="<|sensor|>")])
    small = export_thin(full, tmp_path / "small", str(qwen3_base))
    assert size(small) < 0.05 * size(full), (size(small), size(full))
    assert json.loads((thin / BASE_FILE).read_text()) == {"source": str(qwen3_base.resolve()), "revision": None}
    assert not [f for f in thin.glob("*.safetensors") if f.name != "mm_projectors.safetensors"]
    model = load(thin)  # the view links the base's weight files, never copies them
    view = model.checkpoint.path
    assert view != thin and all(f.is_symlink() for f in view.glob("*.safetensors"))


def test_thin_generates_as_the_full_checkpoint_on_transformers(thin, qwen3_ckpt):
    full, light = MultimodalPipeline(qwen3_ckpt, backend="hf"), MultimodalPipeline(thin, backend="hf")
    assert light.generate(REQUEST, max_tokens=16) == full.generate(REQUEST, max_tokens=16)
    assert light.generate(REQUEST, max_tokens=16, temperature=1.0, seed=4) == full.generate(
        REQUEST, max_tokens=16, temperature=1.0, seed=4)


@pytest.mark.vllm
def test_thin_generates_as_the_full_checkpoint_on_vllm(thin, qwen3_vllm_pipeline):
    light = MultimodalPipeline(thin, backend="vllm", max_model_len=1024)
    try:
        for options in ({}, {"temperature": 1.0, "seed": 4}):
            assert light.generate(REQUEST, max_tokens=16, **options) == qwen3_vllm_pipeline.generate(
                REQUEST, max_tokens=16, **options)
    finally:
        light.close()


def test_a_checkpoint_whose_lm_is_not_the_base_is_refused(qwen3_ckpt, llama_base, qwen3_base, tmp_path):
    with pytest.raises(ConfigError, match="not in the base|differs from the base"):
        export_thin(qwen3_ckpt, tmp_path / "a", str(llama_base))
    assert not (tmp_path / "a").exists()  # nothing written
    thin = export_thin(qwen3_ckpt, tmp_path / "b", str(qwen3_base))
    with pytest.raises(ConfigError, match="already a thin checkpoint"):
        export_thin(thin, tmp_path / "c", str(qwen3_base))
    other = init_checkpoint(qwen3_base, tmp_path / "other", [ModalitySpec("m1", input_dim=8)])
    assert main(["export", "--thin", str(other), str(tmp_path / "d"), "--base", str(tmp_path / "nothing")]) == 2
