"""Built-in encoders (mmfuse/encoders.py): raw images, audio and text in, on both backends.

One checkpoint (conftest ``encoder_ckpt``) holds a modality per encoder kind and output, beside a
vector modality; the tiny CLIP, SigLIP and Whisper have random weights, MiniLM is the real one.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ENCODER_MODALITIES
from mmfuse import SamplingConfig
from mmfuse.encoders import encode_items
from mmfuse.inputs import InputError, RawItem, coerce_items, prepare

LOGPROB_TOL = 1e-4
SENTENCES = ["a small red cube on the left", "two blue spheres", "a tiny blue cone in the corner", "hello"]


def image(seed: int, size=(40, 50)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8))


def waveform(seed: int, seconds: float = 0.75) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * np.random.RandomState(seed).randn(len(t))
            ).astype(np.float32)


def raw_value(name: str, seed: int):
    media = {"clip": "image", "siglip": "image", "whisper": "audio", "minilm": "text"}[ENCODER_MODALITIES[name][0]]
    if media == "image":
        return image(seed)
    if media == "audio":
        return waveform(seed, 0.5 + 0.25 * (seed % 3))
    return SENTENCES[seed % len(SENTENCES)]


@pytest.fixture(scope="module")
def hf(encoder_ckpt):
    from mmfuse.backends.hf import HFBackend
    return HFBackend(encoder_ckpt, device="cpu")


# -- each encoder kind equals its Hugging Face model called directly ------------------------------------------

def reference(name: str, value, encoder_dirs) -> torch.Tensor:
    """What the encoder's own HF (or sentence-transformers) model gives for one raw item."""
    import transformers as tf

    enc, kind, output, _ = ENCODER_MODALITIES[name]
    path = encoder_dirs[enc]
    with torch.no_grad():
        if enc in ("clip", "siglip"):
            model = (tf.CLIPModel if enc == "clip" else tf.SiglipModel).from_pretrained(path).eval()
            pixels = tf.AutoImageProcessor.from_pretrained(path)(images=value, return_tensors="pt")["pixel_values"]
            if output == "pooled":
                return model.get_image_features(pixel_values=pixels).pooler_output
            states = model.vision_model(pixel_values=pixels).last_hidden_state[0]
            return states[1:] if kind == "clip_vision" else states  # auto keeps CLIP's CLS row
        if enc == "whisper":
            model = tf.WhisperModel.from_pretrained(path).eval()
            fe = tf.WhisperFeatureExtractor.from_pretrained(path)
            feats = fe(value, sampling_rate=16000, return_tensors="pt")["input_features"]
            rows = -(-len(value) // fe.hop_length // 2)  # the clip's own frames, halved by the encoder's stride
            return model.encoder(feats).last_hidden_state[0, :rows]
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(path), device="cpu")
        if output == "pooled":
            return st.encode([value], convert_to_tensor=True)
        return st.encode([value], output_value="token_embeddings")[0]


@pytest.mark.parametrize("name", list(ENCODER_MODALITIES))
def test_encoder_output_equals_the_hf_model_called_directly(hf, encoder_dirs, name):
    spec = hf.specs[name]
    value = raw_value(name, 1)
    (item,) = coerce_items(hf.specs, {name: [value]})[name]
    assert isinstance(item, RawItem)
    (got,) = encode_items(spec, [item], "cpu", torch.float32)
    want = reference(name, value, encoder_dirs).reshape(-1, spec.input_dim)
    assert got.shape == want.shape == (item.rows, spec.input_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_raw_items_of_different_sizes_batch_like_each_alone(hf):
    """Texts of different lengths (padded together) and audio of different durations in one batch."""
    for name, values in (("tok", SENTENCES), ("sent", SENTENCES), ("audio", [waveform(i, 0.3 * (i + 1)) for i in range(3)])):
        spec = hf.specs[name]
        items = coerce_items(hf.specs, {name: values})[name]
        together = encode_items(spec, items, "cpu", torch.float32)
        for item, batched in zip(items, together):
            torch.testing.assert_close(encode_items(spec, [item], "cpu", torch.float32)[0], batched,
                                       atol=1e-5, rtol=1e-5)


def test_image_bytes_file_path_and_pil_image_are_the_same_item(hf, tmp_path):
    img = image(3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    items = coerce_items(hf.specs, {"image": [img, buf.getvalue(), str(tmp_path / "x.png"), tmp_path / "x.png"]})["image"]
    for it in items[1:]:
        assert torch.equal(it.features["pixel_values"], items[0].features["pixel_values"])


# -- bad raw input: clear errors naming the modality and item ---------------------------------------------------

@pytest.mark.parametrize("items, message", [
    ({"image": [b"not an image"]}, "modality 'image' item 0"),
    ({"image": [image(0), "/no/such/file.png"]}, "modality 'image' item 1"),
    ({"m1": ["a string for a vector modality"]}, "modality 'm1' item 0"),
    ({"audio": [np.zeros(16000 * 3, np.float32)]}, "at most 2 s"),
    ({"audio": [np.full(800, np.nan, np.float32)]}, "modality 'audio' item 0"),
    ({"sent": [""]}, "modality 'sent' item 0"),
    ({"image": [image(0), np.zeros((1, 48), np.float32)]}, "all be raw media or all be vectors"),
])
def test_bad_raw_items_are_refused_naming_the_item(hf, items, message):
    with pytest.raises(InputError, match=message):
        coerce_items(hf.specs, items)


# -- the same tokens from a raw item and from the vector its encoder makes --------------------------------------

def prompts(count: int = 14) -> list[tuple[str, dict]]:
    """Prompts mixing raw items of every encoder modality with vector items (m1)."""
    rng = np.random.RandomState(7)
    names = list(ENCODER_MODALITIES)
    out = []
    for i in range(count):
        chosen = [names[i % len(names)], names[(3 * i + 1) % len(names)]]
        items = {n: [raw_value(n, i + k) for k in range(1 + (n == chosen[0] and i % 2))] for n in dict.fromkeys(chosen)}
        if i % 3 == 0:
            items["m1"] = [rng.randn(1 + i % 3, 32).astype(np.float32)]
        text = "look: " + " and ".join(f"<|{n}|>" for n, its in items.items() for _ in its) + " now say"
        out.append((text, items))
    return out


def as_vectors(backend, text, items):
    """The same prompt with each raw item replaced by the vectors its encoder makes."""
    coerced = coerce_items(backend.specs, items)
    return {n: [v.numpy() for v in encode_items(backend.specs[n], its, "cpu", torch.float32)]
            for n, its in coerced.items()}


def test_raw_item_and_its_vector_give_identical_tokens_hf(hf):
    sampling = SamplingConfig(max_tokens=6)
    cases = prompts(6)
    raw = hf.generate([hf.encode(prepare(t, its, hf.specs)) for t, its in cases], sampling)
    vec = hf.generate([hf.encode(prepare(t, as_vectors(hf, t, its), hf.specs)) for t, its in cases], sampling)
    assert [r[0].token_ids for r in raw] == [v[0].token_ids for v in vec]


# -- vLLM: the encoder as a tower inside the model ------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_vllm(encoder_ckpt):
    pytest.importorskip("vllm")
    from mmfuse.backends.vllm import VLLMBackend
    backend = VLLMBackend(encoder_ckpt, max_model_len=1024)
    yield backend
    backend.close()


@pytest.mark.vllm
def test_raw_media_parity_hf_vs_vllm(hf, encoder_vllm):
    """14 prompts mixing raw images (CLIP/SigLIP pooled and patches), audio, text and vectors: identical
    greedy tokens, top-1 logprobs within 1e-4; and vLLM's tokens from raw items equal those from vectors."""
    sampling = SamplingConfig(max_tokens=8, logprobs=True)
    cases = prompts()
    prepared = [prepare(t, its, hf.specs) for t, its in cases]
    want = hf.generate([hf.encode(p) for p in prepared], sampling)
    got = encoder_vllm.generate([encoder_vllm.encode(p) for p in prepared], sampling)
    for (text, _), w, g in zip(cases, want, got):
        assert g[0].token_ids == w[0].token_ids, text
        assert max(abs(a - b) for a, b in zip(g[0].logprobs, w[0].logprobs)) < LOGPROB_TOL, text
    vec = encoder_vllm.generate([encoder_vllm.encode(prepare(t, as_vectors(hf, t, its), hf.specs))
                                 for t, its in cases], SamplingConfig(max_tokens=8))
    assert [v[0].token_ids for v in vec] == [g[0].token_ids for g in got]


@pytest.mark.vllm
def test_vllm_generate_takes_raw_media_directly(hf, encoder_vllm):
    """vllm.LLM's own API: {"prompt": ..., "multi_modal_data": {"image": PIL image}} (and audio as vLLM's
    (waveform, sampling_rate) pair, text as a str) gives the pipeline's tokens."""
    from vllm import SamplingParams

    img, wave = image(11), waveform(2)
    text = "what is <|image|> and <|audio|> and <|sent|>"
    items = {"image": img, "audio": (wave, 16000), "sent": "two blue spheres"}
    out = encoder_vllm.llm.generate({"prompt": text, "multi_modal_data": items},
                                    SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    want = hf.generate([hf.encode(prepare(text, {**items, "audio": wave}, hf.specs))], SamplingConfig(max_tokens=8))
    assert list(out[0].outputs[0].token_ids) == want[0][0].token_ids


@pytest.mark.vllm
def test_prefix_cache_keys_on_the_image_content(encoder_vllm):
    """A 300-token document with an image in the middle: the same image again reuses the KV after it; another
    image with the same text shares no KV at or after the image (blocks of 128 tokens on CPU)."""
    from vllm import SamplingParams

    llm, params = encoder_vllm.llm, SamplingParams(temperature=0, max_tokens=1)
    doc = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    text = f"{doc} <|patches|> {doc}"
    before = len(encoder_vllm.tokenizer(doc)["input_ids"])  # tokens ahead of the image
    assert llm.reset_prefix_cache()
    first = llm.generate({"prompt": text, "multi_modal_data": {"patches": image(1)}}, params, use_tqdm=False)[0]
    again = llm.generate({"prompt": text, "multi_modal_data": {"patches": image(1)}}, params, use_tqdm=False)[0]
    other = llm.generate({"prompt": text, "multi_modal_data": {"patches": image(2)}}, params, use_tqdm=False)[0]
    total = len(first.prompt_token_ids)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= total - 128 > before  # the whole prompt but the last partial block
    assert 0 < other.num_cached_tokens <= before  # the text ahead of the image only
    assert other.outputs[0].token_ids is not None


@pytest.mark.vllm
@pytest.mark.server
def test_vllms_own_openai_server_takes_an_image_url_part(encoder_ckpt, encoder_vllm, hf, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on a checkpoint with an `image` modality answers a
    standard image_url chat part (data URL) as vllm.LLM.chat does offline, and as the transformers backend
    does on the prompt vLLM rendered."""
    import base64
    import subprocess
    import sys

    import openai
    from vllm import SamplingParams

    from mmfuse.bench.serve_load import ServerProcess, free_port

    buf = io.BytesIO()
    image(21).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is in the picture?"}]}]
    port, log = free_port(), tmp_path / "vllm_server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(encoder_ckpt), "--port",
           str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready(300)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.chat.completions.create(model=str(encoder_ckpt), messages=messages, temperature=0,
                                                max_tokens=8).choices[0].message.content
    finally:
        server.stop()
    offline = encoder_vllm.llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert answer == offline.outputs[0].text
    # the placeholder vLLM's chat parser put in the prompt is the image modality's own: the item sits there
    placeholder = hf.checkpoint.placeholder_ids["image"]
    assert list(offline.prompt_token_ids).count(placeholder) == 1
    text = hf.tokenizer.decode(offline.prompt_token_ids)
    want = hf.generate([hf.encode(prepare(text, {"image": [image(21)]}, hf.specs))], SamplingConfig(max_tokens=8))
    assert answer == want[0][0].text
