"""Streaming (``mmfuse.streaming``): the Python API's ``stream`` on both backends, and the transformers
server sending its first chunk while the batch is still generating."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from conftest import KEY

from mmfuse import InputError
from mmfuse.pipeline import MultimodalPipeline
from mmfuse.sampling import SamplingConfig

ITEM = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
REQUEST = {"text": "tell me about <|m1|> now", "multimodal_data": {"multimodal_embeddings": {"m1": [ITEM]}}}
OPTIONS = {  # each: generate(**options) == "".join(stream(**options))
    "greedy": dict(max_tokens=24),
    "seeded": dict(max_tokens=24, temperature=1.0, seed=5),
    "penalties": dict(max_tokens=24, presence_penalty=1.0, repetition_penalty=1.3),
    "min_tokens past EOS": dict(max_tokens=12, min_tokens=8, logit_bias={1: 50.0}),
}


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def pipe(request, qwen3_ckpt):
    if request.param == "vllm":
        return request.getfixturevalue("qwen3_vllm_pipeline")
    return MultimodalPipeline(qwen3_ckpt, backend="hf")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_stream_joins_to_the_generated_text(pipe, name):
    options = OPTIONS[name]
    expected = pipe.generate(REQUEST, **options)
    pieces = list(pipe.stream(REQUEST, **options))
    assert "".join(pieces) == expected
    assert len(pieces) > 1 or len(expected) <= 1


def test_stream_cuts_at_stop_strings_and_stop_tokens(pipe):
    whole = pipe.generate_completions(REQUEST, SamplingConfig(max_tokens=24))[0][0]
    stop = whole.text[6:8]
    assert stop.strip(), whole.text
    assert "".join(pipe.stream(REQUEST, max_tokens=24, stop=stop)) == whole.text[: whole.text.find(stop)]
    token = whole.token_ids[4]
    expected = pipe.generate(REQUEST, max_tokens=24, stop_token_ids=[token])
    assert "".join(pipe.stream(REQUEST, max_tokens=24, stop_token_ids=[token])) == expected


def test_stream_deltas_carry_tokens_logprobs_and_finish(pipe):
    """Deltas of n=2 seeded choices: per choice, tokens, logprobs and top alternatives equal the completion's."""
    sampling = SamplingConfig(max_tokens=16, temperature=1.0, seed=2, n=2, logprobs=True, top_logprobs=3)
    completions = pipe.generate_completions(REQUEST, sampling)[0]
    deltas = list(pipe.stream_deltas(REQUEST, sampling))
    for i, c in enumerate(completions):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == c.text
        assert sum((d.token_ids for d in mine), []) == c.token_ids
        np.testing.assert_allclose(sum((d.logprobs for d in mine), []), c.logprobs, atol=1e-5)
        assert [list(t) for d in mine for t in d.top_logprobs] == [list(t) for t in c.top_logprobs]
        assert [d.finish_reason for d in mine][-1] == c.finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])


def test_stream_refuses_n_and_bad_fields(pipe):
    with pytest.raises(InputError, match="n: stream yields one"):
        next(pipe.stream(REQUEST, n=2, temperature=1.0))
    with pytest.raises(InputError, match="frequency_penalty"):
        next(pipe.stream(REQUEST, frequency_penalty=9))


@pytest.mark.server
def test_transformers_server_streams_while_generating(server):
    """64 tokens (min_tokens keeps EOS away): the first content chunk arrives long before the last, and
    chunks keep arriving over the generation; the joined stream equals the non-streamed answer."""
    body = {"model": "tiny-qwen3", "prompt": "count with me", "max_tokens": 64, "min_tokens": 64, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    expected = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120).json()
    arrivals, text = [], ""
    start = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True}, headers=headers,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter() - start)
                    text += chunk["choices"][0]["text"]
    end = time.perf_counter() - start
    assert text == expected["choices"][0]["text"]
    assert len(arrivals) >= 10, arrivals
    first, last = arrivals[0], arrivals[-1]
    assert first < 0.5 * last, f"first chunk at {first:.3f} s, last at {last:.3f} s, stream ended at {end:.3f} s"
    assert sum(t < (first + last) / 2 for t in arrivals) >= 3, arrivals  # spread over the generation
