"""mmfuse.media: raw images and audio decoded under limits, on real files made here.

Every refusal is an InputError whose message starts with the field given as ``where``.
"""
from __future__ import annotations

import base64
import http.server
import io
import re
import struct
import threading
import wave
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, PngImagePlugin

from mmfuse.config import ConfigError
from mmfuse.inputs import InputError
from mmfuse.media import (SAMPLE_RATE, MediaLimits, decode_data_url, fetch_url, host_allowed, load_audio,
                          load_image)

WHERE = "messages[0].content[1].image_url"


def refused(match: str, where: str = WHERE):
    """pytest.raises for an InputError naming ``where`` first, then saying ``match``."""
    return pytest.raises(InputError, match=rf"^{re.escape(where)}: .*{match}")


# -- files made on the fly ------------------------------------------------------------------------------

def picture(fmt: str = "PNG", size=(32, 24), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of ``width`` x ``height`` black pixels: all its rows compressed, a few KB for
    hundreds of megapixels (one byte decodes to eight pixels, zlib squeezes the zeros ~1000:1)."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV written with the stdlib; ``samples`` [n] or [n, channels] in [-1, 1]."""
    samples = samples.reshape(len(samples), -1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def encoded(samples: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt)
    return out.getvalue()


def tone(seconds: float, rate: int = SAMPLE_RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# -- images ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_image_bytes_decode_to_rgb(fmt):
    image = load_image(WHERE, picture(fmt))
    assert image.mode == "RGB" and image.size == (32, 24)


def test_image_png_pixels_exact():
    data = picture("PNG")
    assert np.array_equal(np.asarray(load_image(WHERE, data)), np.asarray(Image.open(io.BytesIO(data))))


def test_image_modes_convert_to_rgb():
    for mode in ("L", "RGBA", "P", "1"):
        assert load_image(WHERE, picture("PNG", mode=mode)).mode == "RGB"


def test_image_from_path_and_pil(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(picture("JPEG"))
    assert load_image(WHERE, path).size == (32, 24)
    assert load_image(WHERE, str(path)).size == (32, 24)
    assert load_image(WHERE, Image.new("RGBA", (5, 7))).mode == "RGB"


def test_image_missing_file_and_directory(tmp_path):
    with refused("cannot read .*No such file", "modality 'image' item 0"):
        load_image("modality 'image' item 0", tmp_path / "nope.png")
    with refused("cannot read"):
        load_image(WHERE, tmp_path)


def test_image_url_string_is_not_a_path():
    with refused("a URL, not a file path"):
        load_image(WHERE, "https://example.com/cat.png")


def test_image_undecodable_and_wrong_format(tmp_path):
    with refused("not an image in a supported format"):
        load_image(WHERE, b"hello, this is text and not an image")
    with refused("not an image in a supported format"):
        load_image(WHERE, wav(tone(0.1)))
    with refused("not an image in a supported format"):  # EPS: Pillow would run Ghostscript on it
        load_image(WHERE, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with refused("not an image in a supported format"):  # a format Pillow reads but the list leaves out
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, format="ICO")
        load_image(WHERE, out.getvalue())
    with refused("empty image data"):
        load_image(WHERE, b"")
    with refused("expected a PIL image, image bytes or a file path, got int"):
        load_image(WHERE, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_truncated(fmt):
    data = picture(fmt, size=(256, 256))
    with refused("undecodable|truncated"):
        load_image(WHERE, data[: len(data) // 2])
    with refused("undecodable|not an image"):
        load_image(WHERE, data[:20])


def test_image_decompression_bomb_refused_from_header(monkeypatch):
    bomb = png_bomb(8_000, 8_000)  # 64 MP: under Pillow's own limit, over ours
    assert len(bomb) < 50_000

    def no_decode(self):
        raise AssertionError("pixels decoded before the size check")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    with refused("8000x8000 = 64000000 pixels is too large .*at most 40000000"):
        load_image(WHERE, bomb)


def test_image_decompression_bomb_beyond_pillow_limit():
    bomb = png_bomb(20_000, 20_000)  # 400 MP: Pillow's own check fires while opening
    assert len(bomb) < 100_000
    with refused("too large .*decompression bomb"):
        load_image(WHERE, bomb)


def test_image_limits_are_the_callers():
    few = MediaLimits(max_image_pixels=100)
    with refused("32x24 = 768 pixels is too large"):
        load_image(WHERE, picture("PNG"), few)
    with refused("32x24 = 768 pixels"):
        load_image(WHERE, Image.new("RGB", (32, 24)), few)
    with refused("image data of 3000 bytes is too large, at most 1000"):
        load_image(WHERE, b"\0" * 3000, MediaLimits(max_media_bytes=1000))


def test_limits_validated():
    with pytest.raises(ConfigError, match="max_image_pixels"):
        MediaLimits(max_image_pixels=0)
    with pytest.raises(ConfigError, match="max_audio_seconds"):
        MediaLimits(max_audio_seconds=0)


# -- audio ----------------------------------------------------------------------------------------------

AWHERE = "messages[0].content[2].input_audio"


def test_audio_wav_16k_mono():
    x = tone(0.5)
    got = load_audio(AWHERE, wav(x), "wav")
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, x, atol=1e-4)  # 16-bit quantization


def test_audio_stereo_44k_to_mono_16k():
    left, right = tone(1.0, 44_100, 440), tone(1.0, 44_100, 440) * 0.5
    got = load_audio(AWHERE, wav(np.stack([left, right], 1), 44_100), "wav")
    assert got.shape == (SAMPLE_RATE,) and got.dtype == np.float32
    # mono = mean of the channels, a 440 Hz tone of amplitude 0.375, kept by the resampling
    expected = 0.75 * tone(1.0, SAMPLE_RATE, 440)
    np.testing.assert_allclose(got[100:-100], expected[100:-100], atol=5e-3)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "ogg"])
def test_audio_compressed_formats(fmt):
    got = load_audio(AWHERE, encoded(tone(1.0), fmt.upper()), fmt)
    assert got.dtype == np.float32 and abs(len(got) - SAMPLE_RATE) < 0.05 * SAMPLE_RATE


def test_audio_format_from_contents_and_path(tmp_path):
    assert load_audio(AWHERE, encoded(tone(0.2), "FLAC")).shape == (3200,)
    path = tmp_path / "a.wav"
    path.write_bytes(wav(tone(0.2)))
    assert load_audio(AWHERE, path).shape == (3200,)


def test_audio_wrong_format():
    with refused("the data is wav audio, expected mp3", AWHERE):
        load_audio(AWHERE, wav(tone(0.1)), "mp3")
    with refused("audio format 'aac' is not supported", AWHERE):
        load_audio(AWHERE, wav(tone(0.1)), "aac")
    with refused("undecodable audio data", AWHERE):
        load_audio(AWHERE, b"definitely not audio" * 10, "wav")
    with refused("undecodable audio data", AWHERE):
        load_audio(AWHERE, picture("PNG"), "wav")
    with refused("undecodable audio data", AWHERE):
        load_audio(AWHERE, wav(tone(0.1))[:30], "wav")  # a header cut short
    with refused("the data is AIFF audio", AWHERE):  # a container libsndfile reads but the list leaves out
        load_audio(AWHERE, encoded(tone(0.1), "AIFF"))


def test_audio_too_long_from_header(monkeypatch):
    # a FLAC of 11 minutes of silence: a few KB that decode to 10.5 M samples
    bomb = encoded(np.zeros(660 * SAMPLE_RATE, np.float32), "FLAC")
    assert len(bomb) < 200_000

    def no_decode(*a, **k):
        raise AssertionError("samples decoded before the duration check")
    monkeypatch.setattr(sf.SoundFile, "blocks", no_decode)
    with refused("audio of 660.0 s is too long, at most 600 s", AWHERE):
        load_audio(AWHERE, bomb, "flac")


def test_audio_limits_are_the_callers():
    short = MediaLimits(max_audio_seconds=0.5, max_media_bytes=10_000)
    with refused("1.0 s is too long, at most 0.5 s", AWHERE):
        load_audio(AWHERE, tone(1.0), limits=short)
    with refused("audio data of 32044 bytes is too large", AWHERE):
        load_audio(AWHERE, wav(tone(1.0)), "wav", short)


def test_audio_waveforms():
    x = tone(0.1)
    assert load_audio(AWHERE, x).dtype == np.float32
    np.testing.assert_array_equal(load_audio(AWHERE, torch.from_numpy(x)), x)
    np.testing.assert_allclose(load_audio(AWHERE, x.astype(np.float64).tolist()), x)
    assert load_audio(AWHERE, [0, 1, 0.5]).tolist() == [0, 1, 0.5]


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 100), np.float32), r"shape \(2, 100\) \(mix channels down"),
    (np.zeros(100, np.int16), "dtype int16"),
    (np.array([0.0, np.nan], np.float32), "NaN or Inf"),
    (np.zeros(0, np.float32), "empty audio"),
    (torch.zeros(10, dtype=torch.int32), "torch.int32"),
    ([0.1, "x"], "a list of numbers only"),
    ([0.1, True], "a list of numbers only"),
    ([10**400], "too large for a float"),
    ({"a": 1}, "got dict"),
])
def test_audio_waveform_refusals(bad, match):
    with refused(match, "modality 'audio' item 3"):
        load_audio("modality 'audio' item 3", bad)


def test_audio_waveform_with_its_sampling_rate():
    """vLLM's (waveform, sampling_rate) pair: resampled to 16 kHz."""
    got = load_audio(AWHERE, (tone(1.0, 44_100), 44_100))
    assert got.shape == (SAMPLE_RATE,) and got.dtype == np.float32
    np.testing.assert_allclose(got[100:-100], tone(1.0)[100:-100], atol=5e-3)
    np.testing.assert_array_equal(load_audio(AWHERE, (tone(0.1), 16_000.0)), tone(0.1))
    with refused("sampling rate 0 Hz is outside", AWHERE):
        load_audio(AWHERE, (tone(0.1), 0))
    with refused("not a whole number of Hz", AWHERE):
        load_audio(AWHERE, (tone(0.1), float("nan")))
    with refused("2.0 s is too long, at most 1 s", AWHERE):
        load_audio(AWHERE, (np.zeros(16_000, np.float32), 8_000), limits=MediaLimits(max_audio_seconds=1))
    with refused(r"shape \(2, 10\)", AWHERE):
        load_audio(AWHERE, (np.zeros((2, 10), np.float32), 8_000))


def test_audio_waveform_too_long_before_copy():
    limits = MediaLimits(max_audio_seconds=1)
    for long in (np.zeros(SAMPLE_RATE + 1, np.float32), torch.zeros(SAMPLE_RATE + 1), [0.0] * (SAMPLE_RATE + 1)):
        with refused("too long, at most 1 s", AWHERE):
            load_audio(AWHERE, long, limits=limits)


# -- data: URLs -----------------------------------------------------------------------------------------

def test_data_url_roundtrip():
    data = picture("PNG")
    mime, raw = decode_data_url(WHERE, "data:image/PNG;base64," + base64.b64encode(data).decode())
    assert (mime, raw) == ("image/png", data)
    assert load_image(WHERE, raw).size == (32, 24)


def test_data_url_refusals():
    with refused("expected a data: URL"):
        decode_data_url(WHERE, "https://example.com/a.png")
    with refused("malformed data: URL"):
        decode_data_url(WHERE, "data:image/png;base64")
    with refused("must be base64-encoded"):
        decode_data_url(WHERE, "data:image/png,%89PNG")
    with refused("invalid base64"):
        decode_data_url(WHERE, "data:image/png;base64,@@@@")
    # the size is refused from the string's length: this one is not even valid base64
    with refused("data: URL content of 3000 bytes is too large, at most 1000"):
        decode_data_url(WHERE, "data:image/png;base64," + "@" * 4000, MediaLimits(max_media_bytes=1000))


# -- remote URLs ----------------------------------------------------------------------------------------

def test_host_allowed():
    assert host_allowed("example.com", ["example.com"])
    assert host_allowed("img.Example.COM.", ["example.com"])
    assert not host_allowed("badexample.com", ["example.com"])
    assert not host_allowed("example.com.evil.org", ["example.com"])
    assert not host_allowed("example.com", [])
    assert host_allowed("10.0.0.1", ["10.0.0.1"]) and not host_allowed("1.10.0.0.1", ["10.0.0.1"])


@pytest.mark.parametrize("url, allowed, match", [
    ("https://example.com/a.png", [], "remote URLs are not accepted here"),
    ("https://evil.org/a.png", ["example.com"], "host 'evil.org' is not among the allowed media domains"),
    ("https://example.com.evil.org/a.png", ["example.com"], "not among the allowed"),
    ("ftp://example.com/a.png", ["example.com"], "scheme 'ftp' is not accepted"),
    ("file:///etc/passwd", ["example.com"], "scheme 'file' is not accepted"),
    ("https://user:pw@example.com/a.png", ["example.com"], "credentials"),
    ("https://[::1/a.png", ["example.com"], "malformed URL"),
])
def test_fetch_refused_without_network(url, allowed, match):
    with refused(match):
        fetch_url(WHERE, url, allowed)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_from_an_allowed_host(local_server, monkeypatch):
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    data = picture("PNG")
    _Handler.routes = {
        "/a.png": (200, {"Content-Type": "image/png"}, data),
        "/in": (302, {"Location": "/a.png"}, b""),
        "/out": (302, {"Location": "https://evil.org/x.png"}, b""),
        "/big": (200, {}, b"\0" * 5000),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    allowed = ["127.0.0.1"]
    assert fetch_url(WHERE, local_server + "/a.png", allowed) == ("image/png", data)
    assert fetch_url(WHERE, local_server + "/in", allowed)[1] == data
    with refused("host 'evil.org' is not among the allowed"):
        fetch_url(WHERE, local_server + "/out", allowed)
    with refused("fetched content of 5000 bytes is too large"):
        fetch_url(WHERE, local_server + "/big", allowed, MediaLimits(max_media_bytes=1000))
    with refused("HTTP 404"):
        fetch_url(WHERE, local_server + "/missing", allowed)
    with refused("more than 5 redirects"):
        fetch_url(WHERE, local_server + "/loop", allowed)
