"""vLLM's sampling fields through ``mmfuse serve`` and the Python API, on both backends.

Each field: the vLLM-backed server answers exactly what vLLM itself answers with that field in
its own ``SamplingParams`` for the same prompt (greedy, or seeded when the field only acts on
sampling), and the field changes the answer on this prompt. Greedy fields are also asked of
the transformers-backed server, which must answer the same (its processors follow vLLM's
formulas and order). ``top_logprobs`` is checked against a transformers forward pass.
"""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from conftest import KEY

from mmfuse.backends.vllm import to_request
from mmfuse.pipeline import MultimodalPipeline
from mmfuse.sampling import SamplingConfig

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.server, pytest.mark.vllm]

MAX_TOKENS = 16
PROMPT = "hello world <|m1|> says"
EOS = 1  # the tiny tokenizers' EOS id (conftest)
ITEM = np.random.default_rng(0).standard_normal(32).astype(np.float32)
REQUEST = {"text": PROMPT, "multimodal_data": {"multimodal_embeddings": {"m1": [ITEM]}}}
BACKENDS = ["hf", "vllm"]


def vllm_own(pipe, **fields):
    """What vLLM itself answers: its own ``SamplingParams`` with ``fields``, the prompt encoded by mmfuse."""
    from vllm import SamplingParams

    fields = {"temperature": 0.0, "max_tokens": MAX_TOKENS} | fields
    (out,) = pipe.backend.llm.generate([to_request(pipe.encode(REQUEST))], SamplingParams(**fields), use_tqdm=False)
    return out.outputs[0]


def ask(srv, **fields) -> dict:
    """The server's completion for the test prompt with ``fields`` (wire names and values)."""
    body = {"model": "tiny-qwen3", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "multimodal_embeddings": {"m1": [ITEM.tolist()]}} | fields
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(params=BACKENDS)
def backend_server(request):
    return request.getfixturevalue("server") if request.param == "hf" else request.getfixturevalue("vllm_pair")[0]


# field: (the field, the request it is added to); a stop token id is taken from the unset answer
GREEDY = {
    "presence_penalty": ({"presence_penalty": 1.5}, {}),
    "frequency_penalty": ({"frequency_penalty": 1.0}, {}),
    "negative frequency_penalty": ({"frequency_penalty": -2.0}, {}),
    "repetition_penalty": ({"repetition_penalty": 1.8}, {}),
    "logit_bias": ({"logit_bias": {5: 30.0}}, {}),
    # EOS pushed up: unset, the answer ends at once; min_tokens holds EOS back
    "min_tokens": ({"min_tokens": 5}, {"logit_bias": {EOS: 50.0}}),
    "stop_token_ids": ("third token of the unset answer", {}),
}


def _wire(fields: dict) -> dict:
    """OpenAI's logit_bias keys are strings."""
    return {k: ({str(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in fields.items()}


@pytest.mark.parametrize("name", list(GREEDY))
def test_greedy_field_equals_vllm_sampling_params_on_both_backends(backend_server, vllm_pair, name):
    field, base = GREEDY[name]
    pipe = vllm_pair[1]
    unset = vllm_own(pipe, **base)
    if name == "stop_token_ids":
        field = {"stop_token_ids": [unset.token_ids[2]]}
    own = vllm_own(pipe, **base, **field)
    assert own.text != unset.text, f"{name} should change this answer"
    got = ask(backend_server, **_wire(base | field))
    assert got["text"] == own.text
    assert got["finish_reason"] == own.finish_reason
    if name == "min_tokens":
        assert unset.token_ids == [EOS] and len(own.token_ids) == 6
    if name == "stop_token_ids":
        assert got["finish_reason"] == "stop" and own.token_ids == unset.token_ids[:3]


SEEDED = {  # fields that act on sampling only: seeded answers
    "min_p": {"min_p": 0.3},
    "seed": {"seed": 8},
    "top_k": {"top_k": 3},
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_seeded_field_equals_vllm_sampling_params(vllm_pair, name):
    srv, pipe = vllm_pair
    base = {"temperature": 1.0, "seed": 7}
    field = SEEDED[name]
    own = vllm_own(pipe, **base | field)
    assert own.text != vllm_own(pipe, **base).text, f"{name} should change this answer"
    assert ask(srv, **base | field)["text"] == own.text
    assert ask(srv, **base | field)["text"] == own.text  # per-request seed: the same answer again


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_p_one_keeps_only_the_top_token(request, backend):
    """min_p = 1 keeps only tokens as likely as the best one: sampled answers equal the greedy one."""
    pipe = request.getfixturevalue("vllm_pair")[1] if backend == "vllm" else MultimodalPipeline(
        request.getfixturevalue("qwen3_ckpt"), backend="hf")
    greedy = pipe.generate(REQUEST, max_tokens=MAX_TOKENS)
    sampled = pipe.generate(REQUEST, max_tokens=MAX_TOKENS, temperature=1.0, seed=3)
    assert sampled != greedy
    assert pipe.generate(REQUEST, max_tokens=MAX_TOKENS, temperature=1.0, seed=3, min_p=1.0) == greedy


def reference_top(model, encoded, generated: list[int], k: int):
    """Top k (ids, logprobs) at each generated position, from one transformers forward over prompt + answer."""
    prompt_ids = list(encoded.expanded_ids)
    ids = torch.tensor([prompt_ids + generated[:-1]])
    with torch.no_grad():
        logits = model(ids, encoded.items).logits[0, len(prompt_ids) - 1:].float().log_softmax(-1)
    values, top = logits.topk(k, -1)
    return top.tolist(), values.tolist()


def test_top_logprobs_equal_the_transformers_reference(backend_server, vllm_pair, qwen3_model):
    """top_logprobs=5 (chat) and logprobs=5 (completions): the alternatives at each position are the top 5
    of the reference logits, token and value (1e-4); the Python API returns the same ids."""
    pipe = vllm_pair[1]
    encoded = pipe.encode(REQUEST)
    (done,), = pipe.generate_completions(REQUEST, SamplingConfig(max_tokens=MAX_TOKENS, logprobs=True,
                                                                  top_logprobs=5))
    ids, values = reference_top(qwen3_model, encoded, done.token_ids, 5)
    assert [list(step) for step in done.top_logprobs] == ids
    np.testing.assert_allclose([list(step.values()) for step in done.top_logprobs], values, atol=1e-4)
    tok = pipe.tokenizer
    got = ask(backend_server, logprobs=5)
    assert got["text"] == done.text
    for step, want_ids, want in zip(got["logprobs"]["top_logprobs"], ids, values):
        expected = {}
        for t, v in zip(want_ids, want):
            expected.setdefault(tok.decode([t]), v)
        assert list(step) == list(expected)
        np.testing.assert_allclose(list(step.values()), list(expected.values()), atol=1e-4)
    chat = openai.OpenAI(base_url=f"{backend_server.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="tiny-qwen3", max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=5,
        messages=[{"role": "user", "content": "hello"}])
    content = chat.choices[0].logprobs.content
    assert all(len(c.top_logprobs) == 5 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-4 for c in content)  # greedy: the best one


BAD = {  # body fields: (status, the field the error names)
    "presence_penalty": ({"presence_penalty": 2.5}, "presence_penalty"),
    "repetition_penalty": ({"repetition_penalty": 0}, "repetition_penalty"),
    "denormal repetition_penalty": ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # logits / it overflow
    "min_p": ({"min_p": 1.5}, "min_p"),
    "logit_bias key": ({"logit_bias": {"abc": 1}}, "logit_bias"),
    "logit_bias value": ({"logit_bias": {"5": 101}}, "logit_bias"),
    "logit_bias vocabulary": ({"logit_bias": {"99999": 1}}, "logit_bias"),
    "stop_token_ids vocabulary": ({"stop_token_ids": [99999]}, "stop_token_ids"),
    "min_tokens over max_tokens": ({"min_tokens": 20, "max_tokens": 8}, "min_tokens"),
    "logprobs over 20": ({"logprobs": 21}, "logprobs"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_sampling_field_is_a_400_naming_it(backend_server, name):
    fields, param = BAD[name]
    body = {"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 4} | fields
    r = httpx.post(f"{backend_server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in err["message"] or param == err["param"], err
    r = httpx.post(f"{backend_server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tiny-qwen3", "max_tokens": 4, "top_logprobs": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "top_logprobs" in r.text  # needs logprobs
