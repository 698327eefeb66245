"""Parallel vLLM engines against one rank: tensor parallel (TP = 2) and pipeline parallel (PP = 2).

vLLM's CPU backend runs each rank in its own process on this machine, one core each
(``vllm_defaults.cpu_binding``). The reference is the session's one-rank engine
(``qwen3_vllm_pipeline``); both sides start from an empty prefix cache. TP changes the order of
the sums inside each sharded matmul, so logprobs may differ in the last bits; greedy tokens
may not. One TP = 2 engine start (~30 s); the PP = 2 engine compiles its graph (~80 s, see
``backends.vllm.engine_args``) and is marked slow.
"""
from __future__ import annotations

import pytest

from mmfuse import SamplingConfig
from mmfuse.backends.vllm_defaults import EngineOptions
from mmfuse.inputs import prepare
from mmfuse.server.cli import add_serve_args, settings_from_args
from mmfuse.server.engines import engine_options

GREEDY = SamplingConfig(max_tokens=24, logprobs=True)
LOGPROB_TOL = 1e-3


def _parity_prompts(specs):
    from test_vllm_plugin import PARITY_CASES  # vectors, (n, d) items, m1 and m2 (tokens_per_item 2), text only
    return [prepare(text, items, specs) for text, items in PARITY_CASES]


def _cold(backend, prompts):
    from test_vllm_plugin import cold
    return [c[0] for c in cold(backend, prompts, GREEDY)]


def _assert_same_as_one_rank(engine, one_rank, ranks: str):
    prompts = _parity_prompts(one_rank.specs)
    ref, got = _cold(one_rank, prompts), _cold(engine, prompts)
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        assert g.token_ids == r.token_ids and g.text == r.text, f"prompt {i}: {ranks} differs from one rank"
        assert len(g.logprobs) == len(r.logprobs) == len(g.token_ids) > 0
        worst = max(worst, max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs)))
    assert worst < LOGPROB_TOL, f"{ranks}: top-1 logprob difference {worst}"
    print(f"{ranks} vs one rank: {len(prompts)} prompts, {sum(len(c.token_ids) for c in got)} tokens identical, "
          f"largest top-1 logprob difference {worst:.2e}")


def _engine(ckpt, **parallel):
    from mmfuse.backends.vllm import VLLMBackend
    backend = VLLMBackend(ckpt, max_model_len=1024, **parallel)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def one_rank(qwen3_vllm_pipeline):
    return qwen3_vllm_pipeline.backend


@pytest.mark.vllm
def test_tensor_parallel_2_equals_one_rank(qwen3_ckpt, one_rank):
    pytest.importorskip("vllm")
    for engine in _engine(qwen3_ckpt, tensor_parallel_size=2):
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        assert (parallel.tensor_parallel_size, parallel.world_size) == (2, 2)
        assert not engine.in_process  # two worker processes, one per rank
        _assert_same_as_one_rank(engine, one_rank, "TP=2")


@pytest.mark.vllm
@pytest.mark.slow
def test_pipeline_parallel_2_equals_one_rank(qwen3_ckpt, one_rank):
    """The model declares SupportsPP: the projectors and embeddings run on the first stage, the LM's two
    layers one per stage, the logits on the last."""
    pytest.importorskip("vllm")
    for engine in _engine(qwen3_ckpt, pipeline_parallel_size=2):
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        assert (parallel.pipeline_parallel_size, parallel.world_size) == (2, 2)
        _assert_same_as_one_rank(engine, one_rank, "PP=2")


def test_serve_parallel_flags_reach_the_engine_options():
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    settings = settings_from_args(parser.parse_args(["ckpt", "--tensor-parallel-size", "2",
                                                     "--pipeline-parallel-size", "3", "--kv-cache-gb", "1",
                                                     "--distributed-executor-backend", "ray"]))
    options = engine_options(settings)
    assert (options.tensor_parallel_size, options.pipeline_parallel_size, options.world_size) == (2, 3, 6)
    assert options.distributed_executor_backend == "ray"
    assert options.kv_cache_gb == 1
    assert engine_options(settings_from_args(parser.parse_args(["ckpt"]))) == EngineOptions()


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_bad_parallel_settings_are_refused_naming_the_field(field):
    from mmfuse import ConfigError
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match=field):
            EngineOptions(**{field: bad})
    with pytest.raises(ConfigError, match="distributed_executor_backend"):
        EngineOptions(distributed_executor_backend="slurm")


def test_generate_cli_passes_parallel_sizes():
    from mmfuse.cli import VLLM_OPTIONS, build_parser
    args = build_parser().parse_args(["generate", "ckpt", "--prompt", "x", "--tensor-parallel-size", "2",
                                      "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp"])
    assert {k: getattr(args, k) for k in VLLM_OPTIONS if getattr(args, k) is not None} == \
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp"}
