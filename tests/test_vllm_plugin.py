"""The vLLM plugin against the transformers reference: parity, prefix caching, batching, bad input.

One engine per checkpoint for the whole session (an engine start costs 30-90 s here).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from mmfuse import InputError, SamplingConfig  # noqa: E402
from mmfuse.hf_backend import generate as hf_generate  # noqa: E402
from mmfuse.inputs import PreparedPrompt, prepare  # noqa: E402

GREEDY = SamplingConfig(max_tokens=32, logprobs=True)
LOGPROB_TOL = 1e-3


def vecs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (text, items): single vectors, (n, d) items, m2 with tokens_per_item=2, two modalities,
# placeholders and the no-placeholder case, plain text, list/numpy items
PARITY_CASES = [
    ("hello <|m1|> world", {"m1": [vecs(1, 32)]}),
    ("look <|m1|> here", {"m1": [vecs(2, 3, 32)]}),
    ("sensor <|sensor|> reading", {"m2": [vecs(3, 16)]}),
    ("sensor window <|sensor|> done", {"m2": [vecs(4, 3, 16)]}),
    ("a <|m1|> b <|sensor|> c <|m1|> d <|sensor|>", {"m1": [vecs(5, 32), vecs(6, 2, 32)], "m2": [vecs(7, 16), vecs(8, 16)]}),
    ("describe these", {"m1": [vecs(9, 32)], "m2": [vecs(10, 2, 16)]}),
    ("what is this", {"m1": [vecs(11, 4, 32)]}),
    ("just text, no items at all in this one", None),
    ("<|m1|><|m1|><|m1|><|m1|> four in a row", {"m1": [vecs(12 + i, 32) for i in range(4)]}),
    ("all sensors <|sensor|> <|sensor|> <|sensor|> <|sensor|>", {"m2": [vecs(16, 16), vecs(17, 2, 16), vecs(18, 16), vecs(19, 5, 16)]}),
    ("as lists <|m1|> and numpy <|sensor|>", {"m1": [vecs(20, 32).tolist()], "m2": [vecs(21, 2, 16).numpy()]}),
    ("the quick brown fox jumps over the lazy dog while <|m1|> a small red cube sits left of a large blue "
     "sphere <|sensor|> compare these two", {"m1": [vecs(22, 6, 32)], "m2": [vecs(23, 16)]}),
    ("<|sensor|> first, then text and <|m1|>", {"m1": [vecs(24, 32)], "m2": [vecs(25, 4, 16)]}),
]


@pytest.fixture(scope="session")
def qwen3_vllm(qwen3_ckpt):
    from mmfuse.vllm_plugin.engine import VLLMBackend
    # stats on: the prefix-cache test reads vLLM's own hit counter
    backend = VLLMBackend(qwen3_ckpt, max_model_len=1024, disable_log_stats=False)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def llama_vllm(llama_ckpt):
    from mmfuse.vllm_plugin.engine import VLLMBackend
    backend = VLLMBackend(llama_ckpt, max_model_len=256)
    yield backend
    backend.close()


def assert_same_completion(got, ref, tol=LOGPROB_TOL, where=""):
    assert got.token_ids == ref.token_ids, where
    assert got.text == ref.text and got.finish_reason == ref.finish_reason, where
    assert len(got.logprobs) == len(ref.logprobs) == len(got.token_ids), where
    diff = max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs))
    assert diff < tol, f"{where}: logprob difference {diff}"


def test_importing_mmfuse_and_the_plugin_does_not_import_vllm():
    code = ("import sys, mmfuse, mmfuse.vllm_plugin, mmfuse.pipeline; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_registers_every_wrapper_architecture():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does: runs mmfuse.vllm_plugin:register
    for arch in ("MMFuseQwen3ForCausalLM", "MMFuseQwen2ForCausalLM", "MMFuseLlamaForCausalLM",
                 "MMFuseMistralForCausalLM"):
        assert arch in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_parity_with_hf(request, family):
    backend = request.getfixturevalue(f"{family}_vllm")
    hf_model = request.getfixturevalue(f"{family}_model")
    prompts = [prepare(t, e, backend.specs) for t, e in PARITY_CASES]
    got = backend.generate(prompts, GREEDY)  # all submitted together
    for (text, _), p, g in zip(PARITY_CASES, prompts, got):
        ref = hf_generate(hf_model, [p], GREEDY)[0][0]
        assert len(g) == 1
        assert_same_completion(g[0], ref, where=f"{family}: {text!r}")
    assert sum(len(g[0].token_ids) for g in got) > 12 * 16  # generation really ran, not stopped at once
