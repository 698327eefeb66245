"""``mmfuse serve`` end to end: a real server subprocess, the official ``openai`` client, raw HTTP for abuse.

One HF-backed server for the session (plus one short-lived server for the SIGTERM
test and, when vLLM is installed, one vLLM-backed server). Answers are compared
with the offline pipeline's greedy output for the same inputs.
"""
from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from mmfuse.bench.serve_load import launch_server, make_bodies, run_load, start_server
from mmfuse.client import embedding_part, encode_embedding
from mmfuse.pipeline import MultimodalPipeline

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MAX_TOKENS = 12
SERVER_ARGS = ("--max-body-bytes", str(256 * 1024), "--max-tokens-limit", "64", "--default-max-tokens", "16",
               "--max-n", "4", "--max-queue", "64", "--served-model-name", "tiny-qwen3", "--torch-threads", "1",
               "--max-prompt-tokens", "200", "--max-items-per-modality", "3")


@pytest.fixture(scope="session")
def server(qwen3_ckpt, tmp_path_factory):
    srv = start_server(qwen3_ckpt, "--backend", "hf", *SERVER_ARGS,
                       log=tmp_path_factory.mktemp("server") / "server.log", api_key=KEY)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def offline(qwen3_ckpt):
    return MultimodalPipeline(qwen3_ckpt, backend="hf")


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def vec(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """What the server sees after a trip through ``dtype``."""
    return torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy()


def greedy(offline, request: dict, **kw) -> str:
    return offline.generate(request, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


# -- answers equal the offline pipeline ---------------------------------------------------------------------

def test_models_lists_checkpoint_with_modalities(client):
    (card,) = client.models.list().data
    assert card.id == "tiny-qwen3"
    mods = {m["name"]: m for m in card.modalities}
    assert (mods["m1"]["input_dim"], mods["m2"]["input_dim"]) == (32, 16)
    assert (mods["m2"]["tokens_per_item"], mods["m2"]["placeholder"]) == (2, "<|sensor|>")
    assert (mods["m1"]["max_items"], mods["m2"]["max_items"]) == (3, 3)  # --max-items-per-modality caps both


def _chat_case(dtype_m1="float32", dtype_m2="float32"):
    a, b = vec(1, 3, 32), vec(2, 16)
    wire = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "compare "}, embedding_part(a, "m1", dtype_m1),
                                         {"type": "text", "text": " with "}, embedding_part(b, "m2", dtype_m2)]}]
    local = [wire[0], {"role": "user", "content": [
        {"type": "text", "text": "compare "},
        {"type": "input_embedding", "modality": "m1", "embedding": rounded(a, dtype_m1)},
        {"type": "text", "text": " with "},
        {"type": "input_embedding", "modality": "m2", "embedding": rounded(b, dtype_m2)}]}]
    return wire, {"messages": local}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float16")])
def test_chat_equals_offline(client, offline, stream, dtypes):
    wire, local = _chat_case(*dtypes)
    expected = greedy(offline, local)
    kw = dict(model="tiny-qwen3", messages=wire, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        out = client.chat.completions.create(**kw)
        assert out.choices[0].message.content == expected
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 3 + 2  # soft tokens counted
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > chunks[-1].usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_offline(client, offline, stream):
    a, b, c = vec(3, 32), vec(4, 2, 16), vec(5, 2, 32)
    prompt = "first <|m1|> then <|sensor|> and <|m1|> end"
    mm = {"m1": [a.tolist(), encode_embedding(c, "bfloat16")], "m2": [encode_embedding(b)]}
    expected = greedy(offline, {"text": prompt, "multimodal_data": {"multimodal_embeddings": {
        "m1": [a, rounded(c, "bfloat16")], "m2": [b]}}})
    kw = dict(model="tiny-qwen3", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"multimodal_embeddings": mm})
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == expected
    else:
        out = client.completions.create(**kw)
        assert out.choices[0].text == expected
        assert out.usage.prompt_tokens == offline.encode(
            {"text": prompt, "multimodal_data": {"multimodal_embeddings": {"m1": [a, c], "m2": [b]}}}).num_tokens


def test_logprobs_n_and_stop_match_offline(client, offline):
    from mmfuse.sampling import SamplingConfig
    a = vec(6, 32)
    req = {"text": "describe <|m1|>", "multimodal_data": {"multimodal_embeddings": {"m1": [a]}}}
    (ref,) = offline.generate_completions(req, SamplingConfig(max_tokens=MAX_TOKENS, logprobs=True))[0]
    kw = dict(model="tiny-qwen3", prompt="describe <|m1|>", max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"multimodal_embeddings": {"m1": [encode_embedding(a)]}})
    out = client.completions.create(**kw, logprobs=0, n=2)
    assert [ch.text for ch in out.choices] == [ref.text, ref.text]
    np.testing.assert_allclose(out.choices[0].logprobs.token_logprobs, ref.logprobs, atol=1e-4)
    chat = client.chat.completions.create(model="tiny-qwen3", max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                                          messages=[{"role": "user", "content": [embedding_part(a, "m1")]}])
    (chat_ref,) = offline.generate_completions(
        {"messages": [{"role": "user", "content": [{"type": "input_embedding", "modality": "m1", "embedding": a}]}]},
        SamplingConfig(max_tokens=MAX_TOKENS, logprobs=True))[0]
    np.testing.assert_allclose([t.logprob for t in chat.choices[0].logprobs.content], chat_ref.logprobs, atol=1e-4)
    stop = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 2]
    assert stop.strip(), ref.text
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == greedy(offline, req, stop=stop) == ref.text[: ref.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


# -- bad input: a 4xx naming the field, and the server keeps serving ----------------------------------------

def _b64(a: np.ndarray, dtype="<f4") -> str:
    return base64.b64encode(np.asarray(a, dtype=dtype).tobytes()).decode()


def _part(embedding, modality="m1"):
    return {"type": "input_embedding", "modality": modality, "embedding": embedding}


def _chat(*parts):
    return {"model": "tiny-qwen3", "max_tokens": 4, "messages": [{"role": "user", "content": list(parts)}]}


_bad_b64 = _b64(vec(7, 32))
_bad_b64 = _bad_b64[:10] + "*" + _bad_b64[11:]
_nan = vec(8, 32)
_nan[5] = np.nan

BAD = {  # name: (path, body or raw bytes, status, text the error must contain)
    "wrong dim": ("chat", _chat(_part(encode_embedding(vec(1, 3, 31)))), 400, "wrong last dimension"),
    "wrong dim json": ("chat", _chat(_part(vec(1, 31).tolist())), 400, "expected 32"),
    "nan": ("chat", _chat(_part({"dtype": "float32", "shape": [32], "data": _b64(_nan)})), 400, "NaN"),
    "bad base64": ("chat", _chat(_part({"dtype": "float32", "shape": [32], "data": _bad_b64})), 400,
                   "invalid base64"),
    "byte length": ("chat", _chat(_part({"dtype": "float32", "shape": [2, 32], "data": _b64(vec(1, 32))})), 400,
                    "needs 256 bytes"),
    "huge shape": ("chat", _chat(_part({"dtype": "float32", "shape": [10**12, 32], "data": _b64(vec(1, 32))})),
                   400, "messages[0].content[0].embedding.data"),
    "unknown modality": ("chat", _chat(_part(vec(1, 32).tolist(), "m9")), 400, "unknown modality 'm9'"),
    "unknown dtype": ("chat", _chat(_part({"dtype": "float64", "shape": [32], "data": _b64(vec(1, 32), "<f8")})),
                      400, "dtype"),
    "too many items": ("chat", _chat(*[_part(vec(i, 16).tolist(), "m2") for i in range(5)]), 400, "too many items"),
    "server item cap": ("completions", {"model": "tiny-qwen3", "prompt": "hi", "multimodal_embeddings": {
        "m1": [vec(i, 32).tolist() for i in range(4)]}}, 400, "expected at most 3, got 4"),
    "prompt tokens": ("chat", _chat(_part(encode_embedding(vec(1, 250, 32)))), 400, "this server takes at most 200"),
    "count mismatch": ("completions", {"model": "tiny-qwen3", "prompt": "<|m1|> and <|m1|>",
                                       "multimodal_embeddings": {"m1": [vec(1, 32).tolist()]}}, 400, "has no item"),
    "unknown part": ("chat", _chat({"type": "image_url", "image_url": {"url": "x"}}), 400, "messages.0.content.0"),
    "max_tokens": ("chat", _chat(_part(vec(1, 32).tolist())) | {"max_tokens": 10_000}, 400, "max_tokens"),
    "n": ("completions", {"model": "tiny-qwen3", "prompt": "hi", "n": 99}, 400, "n: 99"),
    "unknown field": ("completions", {"model": "tiny-qwen3", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    "unknown model": ("completions", {"model": "gpt-9", "prompt": "hi"}, 404, "gpt-9"),
    "oversized body": ("completions", {"model": "tiny-qwen3", "prompt": "x" * 300_000}, 413, "exceeds the limit"),
    "non-JSON body": ("completions", b"this is {not json", 400, "JSON"),
    "JSON not an object": ("completions", b"[1, 2, 3]", 400, "body"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_naming_the_field(server, name):
    path, body, status, needle = BAD[name]
    url = f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] or needle == err["param"], err
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_chunked_oversized_body_is_413(server):
    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"x" * 10_000
    r = httpx.post(f"{server.url}/v1/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_wrong_or_missing_api_key_is_401(server, key):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "unused", max_retries=0)
    if key is None:
        r = httpx.get(f"{server.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        return
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_openai_client_sees_bad_request_and_server_keeps_serving(client, offline):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-qwen3", max_tokens=4, messages=[
            {"role": "user", "content": [embedding_part(vec(1, 16), "m1")]}])
    assert "modality 'm1' item 0: wrong last dimension, expected 32" in str(e.value)
    assert client.completions.create(model="tiny-qwen3", prompt="hello", max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text == greedy(offline, {"text": "hello"})


def test_unknown_route_is_404(server):
    r = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_schema_fuzz_finds_no_5xx(server):
    """Schemathesis cases (valid and invalid) for every operation of the server's own OpenAPI schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    auth = {"Authorization": f"Bearer {KEY}"}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        has_body = op.method.upper() == "POST"  # negative cases need something to break
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_body else (GenerationMode.POSITIVE,):
            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(headers=auth, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{op.label} {mode}: {response.status_code} {response.text[:300]} "
                                    f"for {case.body!r:.300}")
            check()
    assert not failures, "\n".join(failures[:5])
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- concurrency, metrics, shutdown ------------------------------------------------------------------------

def _local(path: str, body: dict) -> dict:
    """The offline pipeline's request for a load-test body (raw arrays instead of wire encodings)."""
    if path == "/v1/completions":
        return {"text": body["prompt"], "multimodal_data": {"multimodal_embeddings": body["_items"]}}
    (text_part, _), m1 = body["messages"][0]["content"], body["_items"]["m1"][0]
    return {"messages": [{"role": "user", "content": [
        text_part, {"type": "input_embedding", "modality": "m1", "embedding": m1}]}]}


def test_concurrent_clients_get_their_own_answers(server, offline):
    """8 clients x 10 requests (chat/completions, streamed or not): each answer is its own request's offline answer."""
    bodies = make_bodies({"m1": 32, "m2": 16}, 16, MAX_TOKENS, seed=1)
    expected = [greedy(offline, _local(path, body)) for path, body in bodies]
    assert len(set(expected)) == len(expected), "distinct requests should give distinct answers"
    result = asyncio.run(run_load(server.url, KEY, "tiny-qwen3", bodies, expected, clients=8, per_client=10))
    assert result.errors == [] and result.ok == 80


def test_metrics_count_requests_tokens_items_and_errors(server, client):
    client.completions.create(model="tiny-qwen3", prompt="hi", max_tokens=2,
                              extra_body={"multimodal_embeddings": {"m2": [vec(1, 16).tolist()]}})
    httpx.post(f"{server.url}/v1/completions", content=b"nope", headers={"Authorization": f"Bearer {KEY}"})
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['mmfuse_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values['mmfuse_items_total{modality="m2"}'] >= 1
    assert values["mmfuse_generation_tokens_total"] >= 2 and values["mmfuse_prompt_tokens_total"] >= 3
    assert values['mmfuse_errors_total{kind="json_invalid"}'] >= 1
    assert values['mmfuse_request_latency_seconds_count{endpoint="/v1/completions"}'] >= 2
    assert values["mmfuse_batch_size_count"] >= 1 and values["mmfuse_batch_size_sum"] >= values["mmfuse_batch_size_count"]


def test_sigterm_lets_the_running_request_finish_and_exits_0(qwen3_ckpt, offline, tmp_path):
    srv = start_server(qwen3_ckpt, "--backend", "hf", "--max-tokens-limit", "1000", "--max-queue", "1",
                       "--torch-threads", "1", log=tmp_path / "log", api_key=KEY)
    body = {"model": str(qwen3_ckpt), "prompt": "count", "max_tokens": 300, "temperature": 0}
    answer: dict = {}

    def ask():
        r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=300)
        answer.update(status=r.status_code, body=r.json(), done=time.monotonic())

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{srv.url}/health").json()["in_flight"] == 0:  # wait until it is generating
        assert time.monotonic() < deadline
        time.sleep(0.05)
    busy = httpx.post(f"{srv.url}/v1/completions", json=body | {"max_tokens": 1},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"  # --max-queue 1
    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    t.join(300)
    assert srv.proc.wait(120) == 0, srv.log.read_text()[-3000:]
    assert answer["status"] == 200 and answer["done"] > signalled
    assert answer["body"]["choices"][0]["text"] == greedy(offline, {"text": "count"}, max_tokens=300)
    assert "Waiting for" in srv.log.read_text() or "Shutting down" in srv.log.read_text()


# -- the vLLM backend ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def vllm_pair(qwen3_ckpt, tmp_path_factory):
    """A vLLM-backed server and, built while it starts, an offline vLLM pipeline on the same checkpoint."""
    pytest.importorskip("vllm")
    srv = launch_server(qwen3_ckpt, "--backend", "vllm", "--max-model-len", "1024", "--served-model-name", "tiny-qwen3",
                        log=tmp_path_factory.mktemp("vllm_server") / "server.log", api_key=KEY)
    try:
        pipe = MultimodalPipeline(qwen3_ckpt, backend="vllm", max_model_len=1024)
        srv.wait_ready(400)
    except BaseException:
        srv.stop()
        raise
    yield srv, pipe
    pipe.close()
    assert srv.stop(120) == 0, srv.log.read_text()[-3000:]


@pytest.mark.vllm
def test_vllm_server_equals_offline_vllm_pipeline(vllm_pair):
    """Chat and completions, streamed and not, single and concurrent: each equals the offline vLLM answer."""
    srv, pipe = vllm_pair
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert client.models.list().data[0].backend == "vllm"
    wire, local = _chat_case("bfloat16", "float32")
    expected = greedy(pipe, local)
    kw = dict(model="tiny-qwen3", messages=wire, max_tokens=MAX_TOKENS, temperature=0)
    assert client.chat.completions.create(**kw).choices[0].message.content == expected
    chunks = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    a, b = vec(3, 32), vec(4, 2, 16)
    prompt = "first <|m1|> then <|sensor|> end"
    expected = greedy(pipe, {"text": prompt, "multimodal_data": {"multimodal_embeddings": {"m1": [a], "m2": [b]}}})
    kw = dict(model="tiny-qwen3", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, n=2,
              extra_body={"multimodal_embeddings": {"m1": [a.tolist()], "m2": [encode_embedding(b)]}})
    assert [c.text for c in client.completions.create(**kw).choices] == [expected, expected]
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {0: expected, 1: expected}
    # engine-side refusals are 400s too, and the engine keeps serving
    with pytest.raises(openai.BadRequestError, match="wrong last dimension"):
        client.completions.create(model="tiny-qwen3", prompt="x", max_tokens=2,
                                  extra_body={"multimodal_embeddings": {"m2": [vec(1, 32).tolist()]}})
    bodies = make_bodies({"m1": 32, "m2": 16}, 8, MAX_TOKENS, seed=2)
    refs = [greedy(pipe, _local(path, body)) for path, body in bodies]
    result = asyncio.run(run_load(srv.url, KEY, "tiny-qwen3", bodies, refs, clients=8, per_client=4))
    assert result.errors == [] and result.ok == 32
