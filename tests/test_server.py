"""``mmfuse serve`` end to end: a real server subprocess, the official ``openai`` client, raw HTTP for abuse.

One HF-backed and one vLLM-backed server for the session, started with the same limits
(plus one short-lived server per backend for the SIGTERM test). Answers are compared
with the offline pipeline's greedy output for the same inputs. The bad-input matrix,
the wrong-Content-Length cases, mid-stream disconnects and SIGTERM run on both backends.
"""
from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import KEY
import torch

from mmfuse.bench.serve_load import make_bodies, run_load, start_server
from mmfuse.client import embedding_part, encode_embedding
from mmfuse.pipeline import MultimodalPipeline

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.server

MAX_TOKENS = 12
AUTH = {"Authorization": f"Bearer {KEY}"}
# each test that takes `any_server` runs against both session servers
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.fixture(params=BACKENDS)
def any_server(request):
    """The session's HF-backed or vLLM-backed server (same checkpoint, same limits)."""
    return request.getfixturevalue("server") if request.param == "hf" else request.getfixturevalue("vllm_pair")[0]


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
    "unknown part": ("chat", _chat({"type": "video_url", "video_url": {"url": "x"}}), 400, "messages.0.content.0"),
    "image part, no image encoder": ("chat", _chat({"type": "image_url", "image_url": {"url": "x"}}), 400,
                                     "messages[0].content[0]"),
    "max_tokens": ("chat", _chat(_part(vec(1, 32).tolist())) | {"max_tokens": 10_000}, 400, "max_tokens"),
    "n": ("completions", {"model": "tiny-qwen3", "prompt": "hi", "n": 99}, 400, "n: 99"),
    "unknown field": ("completions", {"model": "tiny-qwen3", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    "unknown model": ("completions", {"model": "gpt-9", "prompt": "hi"}, 404, "gpt-9"),
    "oversized body": ("completions", {"model": "tiny-qwen3", "prompt": "x" * 300_000}, 413, "exceeds the limit"),
    "non-JSON body": ("completions", b"this is {not json", 400, "JSON"),
    "JSON not an object": ("completions", b"[1, 2, 3]", 400, "body"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_4xx_naming_the_field(any_server, name):
    server = any_server
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


def test_chunked_oversized_body_is_413(any_server):
    server = any_server
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


def metric_values(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_requests_tokens_items_and_errors(server, client):
    """What one good and one bad request add to each counter (deltas: earlier tests counted too)."""
    before = metric_values(server.url)
    out = client.completions.create(model="tiny-qwen3", prompt="hi", max_tokens=2, temperature=0,
                                    extra_body={"multimodal_embeddings": {"m2": [vec(1, 16).tolist()]}})
    bad = httpx.post(f"{server.url}/v1/completions", content=b"nope", headers=AUTH)
    assert bad.status_code == 400
    after = metric_values(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('mmfuse_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert delta('mmfuse_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert delta('mmfuse_items_total{modality="m2"}') == 1 and delta('mmfuse_items_total{modality="m1"}') == 0
    assert delta("mmfuse_generation_tokens_total") == out.usage.completion_tokens >= 1
    assert delta("mmfuse_prompt_tokens_total") == out.usage.prompt_tokens >= 3  # "hi" + 2 soft tokens
    assert delta('mmfuse_errors_total{kind="json_invalid"}') == 1
    assert delta('mmfuse_request_latency_seconds_count{endpoint="/v1/completions"}') == 2
    assert delta("mmfuse_batch_size_count") == 1 and delta("mmfuse_batch_size_sum") == 1  # it ran alone
    assert after["mmfuse_requests_in_flight"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_lets_the_running_request_finish_and_exits_0(request, backend, qwen3_ckpt, tmp_path):
    if backend == "hf":
        offline, engine_args, max_tokens = request.getfixturevalue("offline"), ("--torch-threads", "1"), 300
    else:  # vLLM decodes the tiny model fast: a longer answer keeps it in flight while we act
        offline, engine_args, max_tokens = request.getfixturevalue("vllm_pair")[1], ("--max-model-len", "1024"), 900
    srv = start_server(qwen3_ckpt, "--backend", backend, "--max-tokens-limit", "1000", "--max-queue", "1",
                       *engine_args, log=tmp_path / "log", api_key=KEY)
    body = {"model": str(qwen3_ckpt), "prompt": "count", "max_tokens": max_tokens, "temperature": 0}
    answer: dict = {}

    def ask():
        r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=AUTH, timeout=300)
        answer.update(status=r.status_code, body=r.json(), done=time.monotonic())

    t = threading.Thread(target=ask)
    try:
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/health").json()["in_flight"] == 0:  # wait until it is generating
            assert time.monotonic() < deadline
            time.sleep(0.05)
        busy = httpx.post(f"{srv.url}/v1/completions", json=body | {"max_tokens": 1}, headers=AUTH)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"  # --max-queue 1
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert srv.proc.wait(120) == 0, srv.log.read_text()[-3000:]
    finally:
        if srv.proc.poll() is None:
            srv.stop()
    assert answer["status"] == 200 and answer["done"] > signalled  # it was still running when signalled
    assert answer["body"]["choices"][0]["text"] == greedy(offline, {"text": "count"}, max_tokens=max_tokens)
    assert "Waiting for" in srv.log.read_text() or "Shutting down" in srv.log.read_text()


# -- clients that misbehave at the connection level -------------------------------------------------------

def raw_exchange(url: str, data: bytes, wait: float) -> tuple[bytes, bool, float]:
    """Send raw bytes, keep the connection open, read until the server closes it or ``wait`` passes.

    Returns (what came back, whether the server closed the connection, seconds taken)."""
    parts = urlsplit(url)
    start = time.monotonic()
    got, closed = b"", False
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                got += chunk
            closed = True
        except (socket.timeout, TimeoutError):
            pass
        except ConnectionResetError:
            closed = True
    return got, closed, time.monotonic() - start


def http_head(path: str, length: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n").encode() + b"Content-Length: " + length + b"\r\n\r\n"


WRONG_LENGTH = {  # name: (declared Content-Length, body actually sent)
    "body shorter than declared": (b"100", b'{"model": "tiny-qwen3",'),
    "non-numeric": (b"abc", b'{"model": "tiny-qwen3", "prompt": "hi"}'),
    "negative": (b"-5", b'{"model": "tiny-qwen3", "prompt": "hi"}'),
}


@pytest.mark.parametrize("name", list(WRONG_LENGTH))
def test_wrong_content_length_is_a_4xx_or_a_close_never_a_hang(any_server, name):
    """Raw socket, connection left open: the server answers 4xx and/or closes within seconds
    (the short body waits out --body-timeout 3, then 408)."""
    declared, body = WRONG_LENGTH[name]
    got, closed, took = raw_exchange(any_server.url, http_head("/v1/completions", declared) + body, wait=15)
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else None
    assert status is not None or closed, f"no answer and the connection still open after {took:.1f} s"
    assert status is None or 400 <= status < 500, got[:300]
    assert took < 10, f"{name}: {took:.1f} s to answer or close"
    if name == "body shorter than declared":
        assert status == 408 and b"body_timeout" in got, got[:300]
    assert httpx.get(f"{any_server.url}/health").json() == {"status": "ok", "in_flight": 0}


def test_client_disconnecting_mid_stream_frees_its_slot(any_server):
    """Streams dropped after their first event: in_flight goes back to 0 and the next request is served."""
    body = json.dumps({"model": "tiny-qwen3", "prompt": "count to sixty", "max_tokens": 64, "n": 4,
                       "temperature": 0, "stream": True}).encode()
    for _ in range(3):
        parts = urlsplit(any_server.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
            sock.sendall(http_head("/v1/completions", str(len(body)).encode()) + body)
            got = b""
            while b"data: " not in got:  # up to the first event
                chunk = sock.recv(4096)
                assert chunk, got[:300]
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got[:300]
            assert b"[DONE]" not in got  # dropped mid-stream, not after the end
        # the socket is closed here, while the server still has deltas to send
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{any_server.url}/health").json())["in_flight"] != 0:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    after = httpx.post(f"{any_server.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny-qwen3", "prompt": "count to sixty", "max_tokens": 8, "temperature": 0})
    assert after.status_code == 200 and after.json()["choices"][0]["text"], after.text
    with httpx.stream("POST", f"{any_server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    assert httpx.get(f"{any_server.url}/health").json()["in_flight"] == 0


# -- the vLLM backend ---------------------------------------------------------------------------------------

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


def test_max_batch_size_unset_leaves_each_engine_its_own_default_and_is_checked():
    from mmfuse.config import ConfigError
    from mmfuse.server.settings import ServerSettings

    # unset: 32 on transformers, vLLM's own max_num_seqs on vLLM (a cap of 32 there split a burst of 64
    # requests into two waves: BENCHMARKS.md, server section)
    assert ServerSettings(model="m").max_batch_size is None
    assert ServerSettings(model="m", max_batch_size=8).max_batch_size == 8
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServerSettings(model="m", max_batch_size=0)
