"""LoRA adapters served unmerged, per request, on both backends (mmfuse.lora).

Two adapters made by peft on the tiny Qwen3 base, with large random weights so each changes the
greedy output (``tiny.make_lora_adapter``); their merged checkpoints (``lora.merge_adapter``) are
the reference. One vLLM engine with both adapters for this module.
"""
from __future__ import annotations

import json

import pytest

from mmfuse import ConfigError, InputError, SamplingConfig
from mmfuse.inputs import prepare
from mmfuse.lora import merge_adapter, open_adapters

GREEDY = SamplingConfig(max_tokens=16, logprobs=True)
LOGPROB_TOL = 1e-3
NAMES = ("a1", "a2")


def _prompts(specs):
    from test_vllm_plugin import PARITY_CASES
    # vectors, (n, d) items, m2 with 2 tokens per vector, two modalities, no placeholder, text only
    return [prepare(text, items, specs) for text, items in (PARITY_CASES[i] for i in (0, 1, 3, 4, 5, 7))]


@pytest.fixture(scope="module")
def adapters(qwen3_base, tmp_path_factory):
    from mmfuse.tiny import make_lora_adapter
    root = tmp_path_factory.mktemp("lora")
    return {name: make_lora_adapter(qwen3_base, root / name, seed=i) for i, name in enumerate(NAMES, 1)}


@pytest.fixture(scope="module")
def merged(qwen3_ckpt, adapters, tmp_path_factory):
    from mmfuse.backends.hf import HFBackend
    return {name: HFBackend(merge_adapter(qwen3_ckpt, path, tmp_path_factory.mktemp(f"merged_{name}")))
            for name, path in adapters.items()}


@pytest.fixture(scope="module")
def hf_lora(qwen3_ckpt, adapters):
    from mmfuse.backends.hf import HFBackend
    return HFBackend(qwen3_ckpt, lora=adapters)


@pytest.fixture(scope="module")
def vllm_lora(qwen3_ckpt, adapters):
    pytest.importorskip("vllm")
    from mmfuse.backends.vllm import VLLMBackend
    backend = VLLMBackend(qwen3_ckpt, max_model_len=1024, lora=adapters)
    yield backend
    backend.close()


def run(backend, prompts, loras):
    """Greedy completions of ``prompts`` in one batch, prompt i with adapter ``loras[i]``."""
    encoded = [backend.encode(p, lora) for p, lora in zip(prompts, loras)]
    if backend.name == "vllm":
        assert backend.llm.reset_prefix_cache()  # nothing answered from an earlier run's KV
    return [c[0] for c in backend.generate(encoded, GREEDY)]


def _same(got, ref, tol, where):
    assert got.token_ids == ref.token_ids and got.text == ref.text, where
    diff = max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs))
    assert diff < tol, f"{where}: logprob difference {diff}"
    return diff


def _adapter_equals_merged(backend, merged, tol):
    prompts = _prompts(backend.specs)
    worst = 0.0
    for name in NAMES:
        ref = run(merged[name], prompts, [None] * len(prompts))
        got = run(backend, prompts, [name] * len(prompts))
        for i, (g, r) in enumerate(zip(got, ref)):
            worst = max(worst, _same(g, r, tol, f"{backend.name} adapter {name} prompt {i}"))
    print(f"{backend.name}: adapters equal their merged checkpoints on {len(prompts)} prompts x {len(NAMES)}, "
          f"largest logprob difference {worst:.2e}")


def _interleaved_equal_solo(backend, bare):
    prompts = _prompts(backend.specs)
    order = [(p, lora) for p in prompts for lora in (NAMES[0], None, NAMES[1])]  # a1, base, a2, a1, base, ...
    mixed = run(backend, [p for p, _ in order], [lora for _, lora in order])
    solo = [run(backend, [p], [lora])[0] for p, lora in order]
    for i, (m, s) in enumerate(zip(mixed, solo)):
        _same(m, s, LOGPROB_TOL, f"{backend.name} request {i} ({order[i][1] or 'base'})")
    # the adapters change the output, and a bare request in the mixed batch is the bare checkpoint's
    by = {lora: [m.token_ids for m, (_, l) in zip(mixed, order) if l == lora] for lora in (None, *NAMES)}
    assert by[None] != by["a1"] and by[None] != by["a2"] and by["a1"] != by["a2"]
    base = run(bare, prompts, [None] * len(prompts))
    assert by[None] == [b.token_ids for b in base]


def test_hf_adapter_equals_its_merged_checkpoint(hf_lora, merged):
    _adapter_equals_merged(hf_lora, merged, 1e-4)


def test_hf_two_adapters_and_the_base_interleaved_equal_their_solo_runs(hf_lora, qwen3_ckpt):
    from mmfuse.backends.hf import HFBackend
    _interleaved_equal_solo(hf_lora, HFBackend(qwen3_ckpt))


@pytest.mark.vllm
def test_vllm_adapter_equals_its_merged_checkpoint(vllm_lora, merged):
    _adapter_equals_merged(vllm_lora, merged, LOGPROB_TOL)


@pytest.mark.vllm
def test_vllm_two_adapters_and_the_base_interleaved_equal_their_solo_runs(vllm_lora, hf_lora):
    # the bare requests are compared with the transformers backend's bare checkpoint (its adapters unused)
    _interleaved_equal_solo(vllm_lora, hf_lora)


@pytest.mark.vllm
def test_pipeline_picks_the_adapter_per_request_or_per_call(vllm_lora, merged):
    from mmfuse.pipeline import MultimodalPipeline
    pipe = MultimodalPipeline.__new__(MultimodalPipeline)  # over the module's engine: no second start
    pipe.backend, pipe.specs, pipe.tokenizer = vllm_lora, vllm_lora.specs, vllm_lora.tokenizer
    text = "hello <|m1|> world"
    request = {"text": text, "multimodal_data": {"multimodal_embeddings": {"m1": [[0.5] * 32]}}}
    ref = {n: merged[n].generate([merged[n].encode(prepare(text, {"m1": [[0.5] * 32]}, merged[n].specs))],
                                 SamplingConfig(max_tokens=8))[0][0].text for n in NAMES}
    assert pipe.adapters == list(NAMES)
    assert pipe.generate(dict(request, lora="a1"), max_tokens=8) == ref["a1"]
    assert pipe.generate(request, max_tokens=8, lora="a2") == ref["a2"]
    assert pipe.generate([dict(request, lora="a1"), request], max_tokens=8, lora="a2") == [ref["a1"], ref["a2"]]
    with pytest.raises(InputError, match="lora: no adapter named 'a3'") as e:
        pipe.generate(request, lora="a3")
    assert e.value.param == "lora"
    with pytest.raises(InputError, match="lora: expected an adapter name"):
        pipe.generate(dict(request, lora=1))


def test_bad_adapter_directories_are_refused_naming_the_field(adapters, tmp_path):
    good = adapters["a1"]
    with pytest.raises(ConfigError, match="lora\\['x'\\]: .* is not a peft adapter directory"):
        open_adapters({"x": tmp_path})
    with pytest.raises(ConfigError, match="lora: expected NAME=PATH"):
        open_adapters(["a1"])
    with pytest.raises(ConfigError, match="adapter name 'a b'"):
        open_adapters({"a b": good})
    with pytest.raises(ConfigError, match="given twice"):
        open_adapters([f"a={good}", f"a={good}"])
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    with pytest.raises(ConfigError, match="peft_type 'IA3', expected 'LORA'"):
        open_adapters({"bad": bad})
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        open_adapters({"bad": bad})
    assert {n: a.rank for n, a in open_adapters([f"one={good}"]).items()} == {"one": 8}
    assert list(open_adapters(good)) == ["a1"]  # one directory: named after it


def test_an_adapter_for_another_base_is_refused(tmp_path, qwen3_ckpt):
    from mmfuse.backends.hf import HFBackend
    from mmfuse.tiny import make_base, make_lora_adapter
    wider = make_base(tmp_path / "wider", hidden=256, heads=4, intermediate=512)  # the test base has 128
    other = make_lora_adapter(wider, tmp_path / "wider_adapter", rank=4)
    with pytest.raises(ConfigError, match="lora: an adapter does not fit"):
        HFBackend(qwen3_ckpt, lora={"wider": other})


# -- mmfuse serve --lora NAME=PATH: the request's `model` picks the adapter -----------------------------------

SERVER_BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.fixture(scope="module", params=SERVER_BACKENDS)
def lora_server(request, qwen3_ckpt, adapters, tmp_path_factory):
    from mmfuse.bench.serve_load import start_server
    if request.param == "vllm":
        pytest.importorskip("vllm")
    lora = [a for name, path in adapters.items() for a in ("--lora", f"{name}={path}")]
    srv = start_server(qwen3_ckpt, "--backend", request.param, "--served-model-name", "tiny", "--max-model-len",
                       "1024", "--torch-threads", "1", *lora, log=tmp_path_factory.mktemp("srv") / "server.log",
                       api_key="k")
    yield srv
    assert srv.stop(120) == 0, srv.log.read_text()[-3000:]


@pytest.mark.server
def test_server_routes_by_model_and_lists_adapters(lora_server, merged, hf_lora):
    import httpx
    import numpy as np

    from mmfuse.client import encode_embedding

    auth = {"Authorization": "Bearer k"}
    cards = httpx.get(f"{lora_server.url}/v1/models", headers=auth).json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("tiny", None), ("a1", "tiny"), ("a2", "tiny")]
    assert all(c["root"] == "tiny" and [m["name"] for m in c["modalities"]] == ["m1", "m2"] for c in cards)

    vec = np.linspace(-1, 1, 32, dtype=np.float32)
    text = "hello <|m1|> world"

    def expected(backend, lora=None):
        encoded = backend.encode(prepare(text, {"m1": [vec]}, backend.specs), lora)
        return backend.generate([encoded], SamplingConfig(max_tokens=8))[0][0].text

    def ask(model, stream=False):
        body = {"model": model, "prompt": text, "max_tokens": 8, "temperature": 0, "stream": stream,
                "multimodal_embeddings": {"m1": [encode_embedding(vec)]}}
        r = httpx.post(f"{lora_server.url}/v1/completions", json=body, headers=auth, timeout=120)
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            return r.status_code, "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks[0]["model"]
        return r.status_code, r.json()

    for model, ref in (("a1", expected(merged["a1"])), ("a2", expected(merged["a2"])), ("tiny", expected(hf_lora))):
        status, body = ask(model)
        assert status == 200 and body["model"] == model and body["choices"][0]["text"] == ref, (model, body)
        assert ask(model, stream=True) == (200, ref, model)
    assert expected(merged["a1"]) != expected(hf_lora)  # the adapter changes the answer
    status, body = ask("a3")
    assert status == 404 and body["error"]["param"] == "model" and "'a3' is not served here" in body["error"]["message"]


def test_serve_lora_flags_are_checked(adapters):
    import argparse

    from mmfuse.server.cli import add_serve_args, settings_from_args
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    settings = settings_from_args(parser.parse_args(["ckpt", "--lora", f"a1={adapters['a1']}",
                                                     "--lora", f"a2={adapters['a2']}"]))
    assert list(settings.adapters) == ["a1", "a2"]
    with pytest.raises(ConfigError, match="lora: expected NAME=PATH"):
        settings_from_args(parser.parse_args(["ckpt", "--lora", str(adapters["a1"])]))
    with pytest.raises(ConfigError, match="the served model's own name"):
        settings_from_args(parser.parse_args(["ckpt", "--served-model-name", "a1", "--lora",
                                              f"a1={adapters['a1']}"]))
