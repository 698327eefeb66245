"""``mmfuse serve`` with raw media: OpenAI ``image_url`` / ``input_audio`` parts on a checkpoint with encoders.

One transformers-backed server on the session's encoder checkpoint (tests/conftest.py: several modalities
take images, so image parts name theirs; ``audio`` is the only audio modality). Answers equal the offline
pipeline given the same encoded bytes; every hostile medium gets a 400 naming the part, and the server
keeps serving the same answers after each. Unit tests of ``server.parts`` need no server.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from test_media import encoded, png_bomb, tone, wav

from mmfuse import client as client_parts
from mmfuse.bench.serve_load import start_server
from mmfuse.inputs import InputError, RawItem
from mmfuse.media import MediaLimits
from mmfuse.pipeline import MultimodalPipeline
from mmfuse.server import parts
from mmfuse.server import protocol as P

openai = pytest.importorskip("openai")

KEY = "sk-media"
MODEL = "tiny-enc"
MAX_TOKENS = 8
MAX_PIXELS = 250_000
SERVER_ARGS = ("--served-model-name", MODEL, "--torch-threads", "1", "--max-image-pixels", str(MAX_PIXELS),
               "--max-audio-seconds", "5", "--max-items-per-modality", "2", "--allowed-media-domains", "127.0.0.1")


def picture(fmt: str = "PNG", seed: int = 0, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, modality: str | None = "image", mime: str = "image/png") -> dict:
    return client_parts.image_part(data, mime, modality)  # what users send with mmfuse.client


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return client_parts.audio_part(data, fmt)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def raw(modality: str, value) -> dict:
    """The offline pipeline's form of a media part: the same encoded bytes as an item of ``modality``."""
    return {"type": "input_embedding", "modality": modality, "embedding": value}


# -- parts: routing and decoding, no server ----------------------------------------------------------------

MEDIA = {"m1": None, "image": "image", "patches": "image", "audio": "audio", "sent": "text"}


def _part(d: dict):
    return P.ChatMessage(role="user", content=[d]).content[0]


def test_route_by_name_or_by_the_unique_taker():
    assert parts.route("p", _part(image_part(b"x", "patches")), MEDIA) == "patches"
    assert parts.route("p", _part(audio_part(b"x")), MEDIA) == "audio"
    assert parts.route("p", _part(image_part(b"x", None)), {"m1": None, "image": "image"}) == "image"


@pytest.mark.parametrize("part, media, needle", [
    (image_part(b"x", None), MEDIA, "several modalities take images (image, patches); name one"),
    (image_part(b"x", None), {"m1": None, "audio": "audio"}, "no modality of this checkpoint has an encoder that "
                                                           "takes images (m1: vectors, audio: audio)"),
    (image_part(b"x", "m1"), MEDIA, "modality 'm1' takes vectors only (no encoder), not images; send images to "
                                    "'image' or 'patches'"),
    (image_part(b"x", "sent"), MEDIA, "modality 'sent' takes text media, not images"),
    (image_part(b"x", "vision"), MEDIA, "unknown modality 'vision'"),
    (audio_part(b"x") | {"modality": "image"}, MEDIA, "modality 'image' takes image media, not audio"),
])
def test_route_refusals_name_the_part(part, media, needle):
    with pytest.raises(InputError) as e:
        parts.route("messages[0].content[3]", _part(part), media)
    assert str(e.value).startswith("messages[0].content[3]") and needle in str(e.value)
    assert e.value.param == "messages[0].content[3]"


def test_modality_media_reads_the_encoders(encoder_ckpt):
    from mmfuse.checkpoint import open_checkpoint

    media = parts.modality_media(open_checkpoint(encoder_ckpt).specs)
    assert media["m1"] is None and media["audio"] == "audio" and media["sent"] == media["tok"] == "text"
    assert media["image"] == media["patches"] == media["simage"] == media["auto_img"] == "image"


def test_decode_runs_the_encoders_preprocessor(encoder_ckpt):
    from mmfuse.checkpoint import open_checkpoint

    specs = open_checkpoint(encoder_ckpt).specs
    item = parts.decode("p", _part(image_part(picture())), specs["patches"], 0, MediaLimits())
    assert isinstance(item, RawItem) and item.rows == 16  # 32x32 image, 8x8 patches
    with pytest.raises(InputError) as e:  # the encoder's own limit, said for the part and its item
        parts.decode("messages[0].content[4]", _part(audio_part(wav(tone(3.0)))), specs["audio"], 1, MediaLimits())
    assert str(e.value).startswith("messages[0].content[4]: modality 'audio' item 1: audio of 3.0 s")
    assert e.value.param == "messages[0].content[4]"


def test_load_gives_rgb_images_and_16k_waveforms():
    limits = MediaLimits()
    image = parts.load("p", _part(image_part(picture("JPEG"), mime="image/jpeg")), limits)
    assert image.mode == "RGB" and image.size == (48, 40)
    wave = parts.load("p", _part(audio_part(wav(np.stack([tone(0.5, 8000)] * 2, 1), 8000))), limits)
    assert wave.dtype == np.float32 and wave.shape == (8000,)


@pytest.mark.parametrize("part, needle", [
    (image_part(png_bomb(20_000, 20_000)), "decompression bomb"),
    (image_part(png_bomb(1_000, 1_000)), "1000x1000 = 1000000 pixels is too large"),
    (image_part(picture()[:300]), "undecodable"),
    (image_part(b"hello"), "not an image in a supported format"),
    (image_part(picture(), mime="text/html"), "'text/html' content, expected an image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}, "invalid base64"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "not among the allowed media domains"),
    (audio_part(wav(tone(0.2)), "mp3"), "the data is wav audio, expected mp3"),
    (audio_part(b"not audio at all" * 4), "undecodable audio data"),
    (audio_part(encoded(np.zeros(8 * 16_000, np.float32), "FLAC"), "flac"), "8.0 s is too long, at most 5 s"),
    ({"type": "input_audio", "input_audio": {"data": "UklG Rg==", "format": "wav"}}, "invalid base64"),
])
def test_load_refusals_name_the_part(part, needle):
    limits = MediaLimits(max_image_pixels=MAX_PIXELS, max_audio_seconds=5)
    with pytest.raises(InputError) as e:
        parts.load("messages[1].content[0]", _part(part), limits, ("images.example.org",))
    assert str(e.value).startswith("messages[1].content[0].") and needle in str(e.value), str(e.value)
    assert e.value.param == "messages[1].content[0]"


# -- the server (every test_server* module is marked `server`: tests/ci_guard.py) ---------------------------


@pytest.fixture(scope="module")
def media_server(encoder_ckpt, tmp_path_factory):
    srv = start_server(encoder_ckpt, "--backend", "hf", *SERVER_ARGS,
                       log=tmp_path_factory.mktemp("media_server") / "server.log", api_key=KEY)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def offline(encoder_ckpt):
    return MultimodalPipeline(encoder_ckpt, backend="hf")


@pytest.fixture(scope="module")
def client(media_server):
    return openai.OpenAI(base_url=f"{media_server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, content: list, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, temperature=0,
                                       messages=[{"role": "user", "content": content}], **kw)
    if kw.get("stream"):
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


def greedy(offline, content: list) -> str:
    return offline.generate({"messages": [{"role": "user", "content": content}]}, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_image_data_url_equals_offline(client, offline, stream):
    png = picture("PNG", seed=1)
    got = chat(client, [text("What is in "), image_part(png), text("?")], stream=stream)
    assert got == greedy(offline, [text("What is in "), raw("image", png), text("?")])


def test_the_image_reaches_the_model(client):
    """Two images, same text: the first token's logprob differs (tiny random models may still agree on text)."""
    def first_logprob(png: bytes) -> float:
        r = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, logprobs=True, messages=[
            {"role": "user", "content": [text("What is in "), image_part(png)]}])
        return r.choices[0].logprobs.content[0].logprob
    assert first_logprob(picture(seed=1)) != first_logprob(picture(seed=2))
    assert first_logprob(picture(seed=1)) == first_logprob(picture(seed=1))


def test_parts_stand_where_they_stand_across_modalities(client, offline):
    """Images of two modalities (pooled and patch sequence), JPEG and PNG, and a wav clip, between texts."""
    jpg, png, clip = picture("JPEG", seed=3), picture("PNG", seed=4), wav(tone(1.2, 22_050), 22_050)
    wire = [text("compare "), image_part(jpg, "patches", "image/jpeg"), text(" and "), image_part(png, "image"),
            text(" while hearing "), audio_part(clip)]
    local = [text("compare "), raw("patches", jpg), text(" and "), raw("image", png), text(" while hearing "),
             raw("audio", clip)]
    assert chat(client, wire) == greedy(offline, local)


def test_models_say_which_media_each_modality_takes(client):
    (card,) = client.models.list().data
    media = {m["name"]: m["media"] for m in card.modalities}
    assert media["m1"] is None and media["image"] == media["patches"] == "image" and media["audio"] == "audio"


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def test_remote_image_from_an_allowed_domain(client):
    """--allowed-media-domains 127.0.0.1: a URL there is fetched and answers as its data: URL does."""
    png = picture("PNG", seed=5)
    _Files.files = {"/cat.png": png}
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
        remote = {"type": "image_url", "image_url": {"url": url}, "modality": "image"}
        assert chat(client, [text("see "), remote]) == chat(client, [text("see "), image_part(png)])
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            chat(client, [text("see "), remote | {"image_url": {"url": url.replace("cat", "dog")}}])
    finally:
        files.shutdown()
        files.server_close()


def _hostile() -> dict:
    """name -> (content parts, needle in the message or the param)."""
    good = image_part(picture())
    return {
        "decompression bomb beyond Pillow's limit": ([image_part(png_bomb(20_000, 20_000))], "decompression bomb"),
        "image over --max-image-pixels": ([image_part(png_bomb(1_000, 1_000))], "1000000 pixels is too large"),
        "truncated PNG": ([image_part(picture()[:300])], "undecodable"),
        "not an image": ([image_part(b"GIF89a but not really")], "not an image in a supported format"),
        "wav in an image part": ([image_part(wav(tone(0.1)))], "not an image in a supported format"),
        "text MIME": ([image_part(b"hello", mime="text/plain")], "expected an image"),
        "bad base64": ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%%"}, "modality": "image"}],
                       "invalid base64"),
        "data URL not base64": ([{"type": "image_url", "image_url": {"url": "data:image/png,abc"}, "modality": "image"}],
                                "must be base64-encoded"),
        "remote URL outside the allow-list": ([{"type": "image_url", "modality": "image", "image_url": {
            "url": "http://169.254.169.254/latest/meta-data"}}], "not among the allowed media domains"),
        "file URL": ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}, "modality": "image"}],
                     "scheme 'file' is not accepted"),
        "audio declared mp3, is wav": ([audio_part(wav(tone(0.2)), "mp3")], "the data is wav audio, expected mp3"),
        "undecodable audio": ([audio_part(b"RIFF....WAVEfmt " + b"\0" * 30)], "undecodable audio data"),
        "audio over --max-audio-seconds (header)": (
            [audio_part(encoded(np.zeros(60 * 16_000, np.float32), "FLAC"), "flac")], "60.0 s is too long, at most 5 s"),
        "audio longer than the encoder's window": ([audio_part(wav(tone(3.0)))],
                                                   "messages[0].content[1]: modality 'audio' item 0: audio of 3.0 s, "
                                                   "this encoder takes at most 2 s per item"),
        "image to a vector modality": ([good | {"modality": "m1"}], "takes vectors only"),
        "image to the audio modality": ([good | {"modality": "audio"}], "takes audio media, not images"),
        "image without a modality, several take images": ([image_part(picture(), None)], "several modalities"),
        "image to an unknown modality": ([good | {"modality": "vision"}], "unknown modality 'vision'"),
        "too many image parts, counted before decoding": ([image_part(b"junk")] * 3, "too many items"),
        "unknown audio format": ([audio_part(b"x", "aac")], "input_audio.format"),
    }


def test_hostile_media_get_400_naming_the_part_and_the_server_keeps_serving(media_server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def post(content: list) -> httpx.Response:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": [text("look: "), *content]}]}
        return httpx.post(f"{media_server.url}/v1/chat/completions", content=json.dumps(body), headers=headers,
                          timeout=60)

    good = [image_part(picture(seed=7))]
    solo = post(good).json()["choices"][0]["message"]["content"]
    problems = []
    for name, (content, needle) in _hostile().items():
        r = post(content)
        err = r.json().get("error", {})
        if r.status_code != 400:
            problems.append(f"{name}: status {r.status_code}: {r.text[:300]}")
        elif needle not in err.get("message", "") and needle != err.get("param"):
            problems.append(f"{name}: {err} does not say {needle!r}")
        elif not (err.get("param") or "").startswith("messages"):
            problems.append(f"{name}: param {err.get('param')!r} does not name the part")
        after = post(good)
        if after.status_code != 200 or after.json()["choices"][0]["message"]["content"] != solo:
            problems.append(f"{name}: the next good request got {after.text[:200]}")
    assert httpx.get(f"{media_server.url}/health").status_code == 200
    assert not problems, "\n".join(problems)


# -- the same through a vLLM-backed server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_media_client(encoder_ckpt, tmp_path_factory):
    pytest.importorskip("vllm")
    srv = start_server(encoder_ckpt, "--backend", "vllm", "--max-model-len", "512", *SERVER_ARGS,
                       log=tmp_path_factory.mktemp("vllm_media_server") / "server.log", api_key=KEY)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.mark.vllm
@pytest.mark.server
def test_vllm_backed_server_answers_media_parts_as_the_offline_pipeline(vllm_media_client, offline):
    """A vLLM-backed server: image (data URL, streamed and not) and audio parts between texts give the
    transformers pipeline's greedy text for the same bytes; a different image changes the first logprob."""
    png = picture("PNG", seed=1)
    want = greedy(offline, [text("What is in "), raw("image", png), text("?")])
    for stream in (False, True):
        assert chat(vllm_media_client, [text("What is in "), image_part(png), text("?")], stream=stream) == want
    jpg, clip = picture("JPEG", seed=3), wav(tone(1.2, 22_050), 22_050)
    wire = [text("compare "), image_part(jpg, "patches", "image/jpeg"), text(" while hearing "), audio_part(clip)]
    local = [text("compare "), raw("patches", jpg), text(" while hearing "), raw("audio", clip)]
    assert chat(vllm_media_client, wire) == greedy(offline, local)
