"""Session fixtures: tiny base LMs and mmfuse checkpoints, built once and loaded from disk.

Checkpoint ``{qwen3,qwen2,llama,mistral}_ckpt`` modalities:
  m1: 32-d vectors, mlp2x_gelu, 1 token per vector
  m2: 16-d vectors, linear, 2 tokens per vector, placeholder "<|sensor|>", max 4 items

Their tokenizers have a pad token of their own (id 0) and EOS at id 1 (a real embedding row).

The CI guard (skipped vllm/server tests fail the run under ``CI=true``) lives in ci_guard.py.
"""
from __future__ import annotations

import os

import pytest

# Cores and the engine process are mmfuse's own defaults (backends/vllm_defaults.py); the KV cache is set
# small because a session holds several in-process engines at once (mmfuse's default: a quarter of free memory
# each, up to 4 GiB). tests/test_examples.py runs the user-facing scripts without any of these variables.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ci_guard import (  # noqa: E402,F401  (hooks: tests/ is on sys.path as this conftest's directory)
    pytest_collection_modifyitems, pytest_collectreport, pytest_runtest_makereport, pytest_sessionfinish,
    pytest_terminal_summary)
from mmfuse import ModalitySpec, init_checkpoint  # noqa: E402
from mmfuse.tiny import make_base  # noqa: E402

MODALITIES = [
    ModalitySpec(name="m1", input_dim=32),
    ModalitySpec(name="m2", input_dim=16, projector="linear", tokens_per_item=2, placeholder="<|sensor|>", max_items=4),
]
FAMILIES = ("qwen3", "qwen2", "llama", "mistral")  # every base mmfuse supports
SEEDS = {"qwen3": 0, "llama": 1, "qwen2": 2, "mistral": 3}


# -- checkpoints --------------------------------------------------------------------------------------------

def _fresh_specs():
    return [ModalitySpec(**vars(s)) for s in MODALITIES]


def _base(family, tmp_path_factory):
    return make_base(tmp_path_factory.mktemp(f"{family}_base"), family=family, seed=SEEDS[family])


def _ckpt(family, base, tmp_path_factory):
    return init_checkpoint(base, tmp_path_factory.mktemp(f"{family}_ckpt"), _fresh_specs(), seed=SEEDS[family])


@pytest.fixture(scope="session")
def qwen3_base(tmp_path_factory):
    return _base("qwen3", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_base(tmp_path_factory):
    return _base("qwen2", tmp_path_factory)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    return _base("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def mistral_base(tmp_path_factory):
    return _base("mistral", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen3_ckpt(qwen3_base, tmp_path_factory):
    return _ckpt("qwen3", qwen3_base, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_ckpt(qwen2_base, tmp_path_factory):
    return _ckpt("qwen2", qwen2_base, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_ckpt(llama_base, tmp_path_factory):
    return _ckpt("llama", llama_base, tmp_path_factory)


@pytest.fixture(scope="session")
def mistral_ckpt(mistral_base, tmp_path_factory):
    return _ckpt("mistral", mistral_base, tmp_path_factory)


def _load(path):
    from mmfuse import load
    return load(path)


@pytest.fixture(scope="session")
def qwen3_model(qwen3_ckpt):
    return _load(qwen3_ckpt)


@pytest.fixture(scope="session")
def qwen2_model(qwen2_ckpt):
    return _load(qwen2_ckpt)


@pytest.fixture(scope="session")
def llama_model(llama_ckpt):
    return _load(llama_ckpt)


@pytest.fixture(scope="session")
def mistral_model(mistral_ckpt):
    return _load(mistral_ckpt)


@pytest.fixture(scope="session")
def qwen3_vllm_pipeline(qwen3_ckpt):
    """The session's one offline vLLM engine on the Qwen3 checkpoint, shared by every test file that needs
    one (an engine start costs 30-60 s here). Stats on: prefix-cache tests read vLLM's hit counter."""
    pytest.importorskip("vllm")
    from mmfuse.pipeline import MultimodalPipeline
    pipe = MultimodalPipeline(qwen3_ckpt, backend="vllm", max_model_len=1024, disable_log_stats=False)
    yield pipe
    pipe.close()


# -- encoders: real architectures with random weights, each with its own HF preprocessor ---------------------

@pytest.fixture(scope="session")
def encoder_dirs(tmp_path_factory):
    """{name: directory}: tiny full CLIP and SigLIP models (32x32 images, 16 patches), a tiny Whisper (2 s
    windows) and the bundled MiniLM sentence encoder (real weights)."""
    from mmfuse.tiny import make_vision_encoder, make_whisper_encoder, minilm_dir

    root = tmp_path_factory.mktemp("encoders")
    return {"clip": make_vision_encoder(root / "clip", "clip"), "siglip": make_vision_encoder(root / "siglip", "siglip"),
            "whisper": make_whisper_encoder(root / "whisper"), "minilm": minilm_dir()}


MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the hub id; offline it resolves to the bundled copy


# modality -> (encoder, kind, output, projector): every encoder kind and output, beside a vector modality
ENCODER_MODALITIES = {
    "image": ("clip", "clip_vision", "pooled", "mlp2x_gelu"),
    "patches": ("clip", "clip_vision", "sequence", "mlp2x_gelu"),
    "simage": ("siglip", "siglip_vision", "pooled", "linear"),
    "spatches": ("siglip", "siglip_vision", "sequence", "resampler"),
    "audio": ("whisper", "whisper", "sequence", "mlp2x_gelu"),
    "sent": ("minilm", "sentence_transformers", "pooled", "mlp2x_gelu"),
    "tok": ("minilm", "sentence_transformers", "sequence", "mlp2x_gelu"),
    "auto_img": ("clip", "auto", "sequence", "linear"),
}


@pytest.fixture(scope="session")
def encoder_ckpt(qwen3_base, encoder_dirs, tmp_path_factory):
    """A Qwen3 checkpoint with one modality per encoder kind/output (ENCODER_MODALITIES) plus m1 (32-d
    vectors); local encoders copied under encoders/NAME by init_checkpoint, MiniLM referenced by hub id."""
    modalities = {"m1": {"input_dim": 32}}
    for name, (enc, kind, output, projector) in ENCODER_MODALITIES.items():
        source = MINILM_ID if enc == "minilm" else str(encoder_dirs[enc])  # a hub id stays a reference
        modalities[name] = {"projector": projector, "tokens_per_item": 4 if projector == "resampler" else 1,
                            "encoder": {"source": source, "kind": kind, "output": output}}
    return init_checkpoint(qwen3_base, tmp_path_factory.mktemp("encoder_ckpt"), modalities, seed=5)


# -- shared helpers (tests/ is on sys.path: `from conftest import ...`) --------------------------------------

def manual_embeds(model, token_ids, items, manual_rows):
    """inputs_embeds built segment by segment from raw weights: a text token's embedding row, or, at each
    placeholder, ``manual_rows(model, name, item)`` for the modality's next item. [1, S, H]"""
    import torch

    emb = model.lm.get_input_embeddings()
    by_id = {pid: name for name, pid in model.placeholder_ids.items()}
    seen = {n: 0 for n in model.specs}
    parts = []
    for t in token_ids:
        if t in by_id:
            name = by_id[t]
            parts.append(manual_rows(model, name, items[name][seen[name]]))
            seen[name] += 1
        else:
            parts.append(emb.weight[t:t + 1])
    return torch.cat(parts).unsqueeze(0)


# -- the session's servers (tests/test_server*.py) -----------------------------------------------------------

KEY = "sk-test-key"
SERVER_ARGS = ("--max-body-bytes", str(256 * 1024), "--max-tokens-limit", "64", "--default-max-tokens", "16",
               "--max-n", "4", "--max-queue", "64", "--served-model-name", "tiny-qwen3", "--torch-threads", "1",
               "--max-prompt-tokens", "200", "--max-items-per-modality", "3", "--body-timeout", "3")


@pytest.fixture(scope="session")
def server(qwen3_ckpt, tmp_path_factory):
    """The session's transformers-backed server on the Qwen3 checkpoint (SERVER_ARGS, key KEY)."""
    from mmfuse.bench.serve_load import start_server
    srv = start_server(qwen3_ckpt, "--backend", "hf", *SERVER_ARGS,
                       log=tmp_path_factory.mktemp("server") / "server.log", api_key=KEY)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def vllm_pair(request, qwen3_ckpt, tmp_path_factory):
    """A vLLM-backed server (same limits as the HF one) and the session's shared offline vLLM pipeline."""
    yield from vllm_server_beside_pipeline(request, qwen3_ckpt, SERVER_ARGS,
                                           tmp_path_factory.mktemp("vllm_server") / "server.log", KEY)


def vllm_server_beside_pipeline(request, ckpt, server_args, log, api_key):
    """Generator for a fixture: a vLLM-backed ``mmfuse serve`` and, fetched while it starts, the session's
    offline vLLM pipeline; yields (server, pipeline) and stops the server (exit 0 asserted)."""
    from mmfuse.bench.serve_load import launch_server

    pytest.importorskip("vllm")
    srv = launch_server(ckpt, "--backend", "vllm", "--max-model-len", "1024", *server_args, log=log, api_key=api_key)
    try:
        pipe = request.getfixturevalue("qwen3_vllm_pipeline")
        srv.wait_ready(400)
    except BaseException:
        srv.stop()
        raise
    yield srv, pipe
    assert srv.stop(120) == 0, srv.log.read_text()[-3000:]
