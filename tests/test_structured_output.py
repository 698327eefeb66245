"""``response_format`` (JSON answers): vLLM's structured-output backend (xgrammar) on the vLLM backend,
the same xgrammar grammar as a logits processor on transformers; Python API and both servers."""
from __future__ import annotations

import json

import httpx
import pytest
from conftest import KEY

from mmfuse import InputError
from mmfuse.pipeline import MultimodalPipeline

pytest.importorskip("xgrammar")  # installed with vLLM
jsonschema = pytest.importorskip("jsonschema")

# every kind of JSON value, bounded so that a random model's answer always ends within MAX_TOKENS; the
# string has a pattern: xgrammar 0.2.8's grammar lets raw control characters into free strings, which
# strict JSON parsers refuse (docs/server.md)
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "n", "color", "flags", "point"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z ]{1,8}$"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "color": {"enum": ["red", "green", "blue"]},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                         "point": {"type": "object", "additionalProperties": False, "required": ["x"],
                                   "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}}},
                         "note": {"type": ["string", "null"], "enum": ["ok", None]}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
# the session servers' --max-tokens-limit is 64: a smaller object for them
SMALL = {"type": "object", "additionalProperties": False, "required": ["name", "n", "color"],
         "properties": {k: SCHEMA["properties"][k] for k in ("name", "n", "color")}}
MAX_TOKENS = 96
REQUEST = {"text": "describe the thing as json"}


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def pipe(request, qwen3_ckpt):
    if request.param == "vllm":
        return request.getfixturevalue("qwen3_vllm_pipeline")
    return MultimodalPipeline(qwen3_ckpt, backend="hf")


def test_twenty_seeded_answers_validate_against_the_schema(pipe):
    answers = [pipe.generate(REQUEST, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, response_format=FORMAT)
               for seed in range(20)]
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)
    assert len(set(answers)) > 10  # sampled, not one answer
    unconstrained = pipe.generate(REQUEST, max_tokens=MAX_TOKENS, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(unconstrained)


@pytest.mark.vllm
def test_greedy_structured_answers_agree_across_backends(qwen3_vllm_pipeline, qwen3_ckpt):
    hf = MultimodalPipeline(qwen3_ckpt, backend="hf")
    for request in (REQUEST, {"text": "another <|m1|> thing", "multimodal_data": {"multimodal_embeddings": {
            "m1": [[0.5] * 32]}}}):
        expected = qwen3_vllm_pipeline.generate(request, max_tokens=MAX_TOKENS, response_format=FORMAT)
        assert hf.generate(request, max_tokens=MAX_TOKENS, response_format=FORMAT) == expected
        jsonschema.validate(json.loads(expected), SCHEMA)
    answer = hf.generate(REQUEST, max_tokens=8, response_format={"type": "json_object"})
    assert answer.startswith("{") and answer == qwen3_vllm_pipeline.generate(
        REQUEST, max_tokens=8, response_format={"type": "json_object"})


@pytest.mark.parametrize("fmt, needle", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, "Unsupported type"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "expected a JSON schema object"),
    ({"type": "xml"}, "response_format: expected"),
])
def test_a_bad_schema_is_an_input_error(pipe, fmt, needle):
    with pytest.raises(InputError, match=needle):
        pipe.generate(REQUEST, max_tokens=4, response_format=fmt)
    assert pipe.generate(REQUEST, max_tokens=4)  # the backend keeps serving


@pytest.mark.server
@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_servers_answer_response_format(request, backend):
    srv = request.getfixturevalue("server") if backend == "hf" else request.getfixturevalue("vllm_pair")[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    seeds = range(20) if backend == "vllm" else range(5)  # the transformers server answers one seeded request at a time

    def chat(**fields):
        return httpx.post(f"{srv.url}/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "tiny-qwen3", "max_tokens": 64, "temperature": 1.0,
            "messages": [{"role": "user", "content": "json please"}]} | fields)

    for seed in seeds:
        r = chat(seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SMALL)
    r = chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    r = chat(response_format={"type": "json_schema", "json_schema": {"schema": "not an object"}})
    assert r.status_code == 400 and "response_format" in r.text, r.text
