"""Raw media -> pixels and waveforms: the one place image and audio bytes are decoded.

Shared by the Python API (raw items of a modality whose encoder takes images or
audio) and the server (``image_url`` / ``input_audio`` chat parts). Every refusal is
an ``InputError`` whose message starts with ``where`` (the item or request field),
and every limit is checked on what is cheap to read before the expensive step:
a data URL's length before its base64 is decoded, an image's width x height from
its header before its pixels are, an audio clip's duration from its header before
its samples are. Decoders are Pillow (images; a fixed list of formats) and
libsndfile through ``soundfile`` (audio); nothing is ever unpickled or given to
``torch.load``. Only the decoders' own error types are caught: a bug elsewhere
still surfaces as itself.

Pillow, soundfile and scipy are imported when first needed (``pip install
mmfuse[media]``), so importing mmfuse costs nothing for checkpoints without encoders.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np
import torch

from .config import ConfigError
from .inputs import InputError, as_list

SAMPLE_RATE = 16_000  # Hz: what every audio encoder here takes (Whisper's feature extractor)

# Pillow plugins tried on image bytes, in this order. The common web and camera formats only: no EPS
# (Pillow runs Ghostscript on it), no exotic parsers that a hostile upload could reach.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# encoded audio formats -> the libsndfile container names that satisfy them (WAVEX/RF64 are WAV variants)
AUDIO_FORMATS = {"wav": ("WAV", "WAVEX", "RF64"), "flac": ("FLAC",), "mp3": ("MP3",), "ogg": ("OGG",)}
MAX_AUDIO_CHANNELS = 32  # more is not a recording a speech/audio encoder is meant for
AUDIO_RATES = (4_000, 192_000)  # Hz accepted in a file's header (telephony .. studio masters)
MAX_REDIRECTS = 5  # fetch_url follows at most this many, each one inside the allow-list


@dataclass(frozen=True)
class MediaLimits:
    """What one image or audio clip may cost; each limit is checked before the costly step it bounds."""

    # 40 MP: an 8K frame (7680x4320 = 33 MP) or a 45 MP camera's downscaled JPEG fits, while the decoded RGB
    # stays under 120 MB. Encoders resize to a few hundred pixels anyway. Pillow's own bomb check still
    # applies above this: it warns past Image.MAX_IMAGE_PIXELS (89.5 MP) and refuses past twice that.
    max_image_pixels: int = 40_000_000
    # 20 MiB of encoded bytes (an image file, an audio file, the decoded body of a data: URL or a fetch):
    # a high-quality 40 MP JPEG is ~15 MB, ten minutes of 16 kHz mono 16-bit WAV ~19 MB
    max_media_bytes: int = 20 * 2**20
    # 10 minutes: long enough for any speech clip an encoder takes (Whisper reads 30 s windows); the
    # decoded mono float32 at the file's own rate then stays under 460 MB even at 192 kHz (38 MB at 16 kHz)
    max_audio_seconds: float = 600.0
    fetch_timeout_s: float = 10.0  # a remote URL: each connect/read, and the whole download

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_media_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("max_audio_seconds", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0 seconds, got {getattr(self, name)!r}")


def _refuse(where: str, message: str) -> InputError:
    return InputError(f"{where}: {message}", where)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_bytes(where: str, size: int, limits: MediaLimits, what: str = "media") -> None:
    if size > limits.max_media_bytes:
        raise _refuse(where, f"{what} of {size} bytes is too large, at most {limits.max_media_bytes} are accepted")
    if size == 0:
        raise _refuse(where, f"empty {what} (0 bytes)")


def _read_file(where: str, path, limits: MediaLimits) -> bytes:
    """A local file's bytes, its size checked before it is read."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://", "data:")):
        raise _refuse(where, "a URL, not a file path: pass the file's bytes or a local path (remote and data: "
                             "URLs are read by the server's image_url parts)")
    try:
        with open(path, "rb") as f:
            _check_bytes(where, os.fstat(f.fileno()).st_size, limits, "file")
            return f.read(limits.max_media_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise _refuse(where, f"cannot read {_short(path)}: {e.strerror or type(e).__name__}") from None


# -- images ---------------------------------------------------------------------------------------------

def _check_pixels(where: str, size: tuple[int, int], limits: MediaLimits) -> None:
    w, h = size
    if w * h > limits.max_image_pixels:
        raise _refuse(where, f"image of {w}x{h} = {w * h} pixels is too large (a decompression bomb?), at most "
                             f"{limits.max_image_pixels} pixels are accepted")


def load_image(where: str, value: object, limits: MediaLimits = MediaLimits()):
    """A PIL image, encoded image bytes or a file path -> an RGB ``PIL.Image.Image``.

    Formats: ``IMAGE_FORMATS`` (an animation gives its first frame). Pixels are taken as stored: EXIF
    orientation is not applied, as Hugging Face image processors don't apply it either.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        _check_pixels(where, value.size, limits)
        return _decode(where, value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _check_bytes(where, len(data), limits, "image data")
    elif isinstance(value, (str, os.PathLike)):
        data = _read_file(where, value, limits)
    else:
        raise _refuse(where, f"expected a PIL image, image bytes or a file path, got {type(value).__name__}")
    # Pillow's decode errors: UnidentifiedImageError and truncation are OSErrors, some plugins raise
    # SyntaxError/ValueError/EOFError on malformed headers; its bomb check raises DecompressionBombError,
    # and DecompressionBombWarning too when warnings are turned into errors
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _refuse(where, f"image too large (a decompression bomb?): {e}") from None
    except Image.UnidentifiedImageError:
        raise _refuse(where, f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _refuse(where, f"undecodable image data ({e})") from None
    _check_pixels(where, image.size, limits)  # before a single pixel is decoded
    return _decode(where, image)


def _decode(where: str, image):
    from PIL import Image

    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _refuse(where, f"image too large (a decompression bomb?): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        fmt = image.format or "image"
        raise _refuse(where, f"undecodable {fmt} data, truncated or corrupt ({e})") from None


# -- audio ----------------------------------------------------------------------------------------------

def load_audio(where: str, value: object, fmt: str | None = None, limits: MediaLimits = MediaLimits()) -> np.ndarray:
    """A waveform or encoded audio -> float32 mono samples at ``SAMPLE_RATE`` (16 kHz), shape ``[n]``.

    ``value``: a 1-D float array, tensor or list of numbers, already mono at 16 kHz; vLLM's
    ``(waveform, sampling_rate)`` pair, resampled to 16 kHz; encoded bytes (``fmt``: one of
    ``AUDIO_FORMATS``, or None to take any of them), mixed down to mono (mean of the channels) and
    resampled; or a file path (format from its contents).
    """
    if isinstance(value, tuple) and len(value) == 2 and _is_rate(value[1]):
        if not float(value[1]).is_integer():
            raise _refuse(where, f"sampling rate {value[1]!r:.40} is not a whole number of Hz")
        return _waveform(where, value[0], limits, int(value[1]))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _check_bytes(where, len(data), limits, "audio data")
        return _decode_audio(where, data, fmt, limits)
    if isinstance(value, (str, os.PathLike)):
        return _decode_audio(where, _read_file(where, value, limits), fmt, limits)
    return _waveform(where, value, limits)


def _is_rate(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _waveform(where: str, value: object, limits: MediaLimits, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A waveform sampled at ``rate`` -> float32 at ``SAMPLE_RATE``; its length checked before any copy."""
    expected = "a 1-D float waveform" + (f" at {SAMPLE_RATE} Hz" if rate == SAMPLE_RATE else "")
    if not AUDIO_RATES[0] <= rate <= AUDIO_RATES[1]:
        raise _refuse(where, f"sampling rate {rate} Hz is outside {AUDIO_RATES[0]}..{AUDIO_RATES[1]}")
    if isinstance(value, torch.Tensor):
        if value.is_nested or value.layout != torch.strided or not value.is_floating_point() \
                or value.device.type == "meta":
            raise _refuse(where, f"expected {expected}, got a {value.dtype} {value.layout} tensor on {value.device}")
    elif isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or isinstance(value, np.ma.MaskedArray):
            raise _refuse(where, f"expected {expected}, got an array of dtype {value.dtype}")
    elif (values := as_list(value)) is not None:
        if len(values) > limits.max_audio_seconds * rate:  # before converting a huge list
            raise _too_long(where, len(values) / rate, limits)
        if not set(map(type, values)) <= {int, float} and not all(  # the common case: one pass in C
                type(v) in (int, float) or isinstance(v, (np.floating, np.integer)) for v in values):
            raise _refuse(where, f"expected {expected}: a list of numbers only")
        try:
            value = np.asarray(values, dtype=np.float64)
        except OverflowError:
            raise _refuse(where, "audio samples: a number too large for a float") from None
    else:
        raise _refuse(where, f"expected {expected}, encoded audio bytes or a file path, got {type(value).__name__}")
    if value.ndim != 1:
        raise _refuse(where, f"expected {expected}, got shape {tuple(value.shape)} (mix channels down to mono first)")
    if value.shape[0] > limits.max_audio_seconds * rate:  # before any copy
        raise _too_long(where, value.shape[0] / rate, limits)
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    wave = value.astype(np.float32, copy=False)
    if not np.isfinite(wave).all():  # before resampling spreads a NaN over its neighbours
        raise _refuse(where, "audio samples contain NaN or Inf")
    return _checked(where, _resampled(wave, rate), limits)


def _resampled(wave: np.ndarray, rate: int) -> np.ndarray:
    """``wave`` at ``rate`` -> at ``SAMPLE_RATE`` (scipy's polyphase filter: anti-aliased, exact length ratio)."""
    if rate == SAMPLE_RATE or not wave.size:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(rate, SAMPLE_RATE)
    return resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)


def _too_long(where: str, seconds: float, limits: MediaLimits) -> InputError:
    return _refuse(where, f"audio of {seconds:.1f} s is too long, at most {limits.max_audio_seconds:g} s are accepted")


def _checked(where: str, wave: np.ndarray, limits: MediaLimits) -> np.ndarray:
    if wave.size == 0:
        raise _refuse(where, "empty audio (no samples)")
    if wave.size > limits.max_audio_seconds * SAMPLE_RATE:
        raise _too_long(where, wave.size / SAMPLE_RATE, limits)
    if not np.isfinite(wave).all():
        raise _refuse(where, "audio samples contain NaN or Inf")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _decode_audio(where: str, data: bytes, fmt: str | None, limits: MediaLimits) -> np.ndarray:
    import soundfile as sf

    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise _refuse(where, f"audio format {_short(fmt)} is not supported, expected one of {', '.join(AUDIO_FORMATS)}")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:  # reads the header only
            accepted = AUDIO_FORMATS[fmt] if fmt else tuple(c for cs in AUDIO_FORMATS.values() for c in cs)
            if f.format not in accepted:
                got = next((k for k, cs in AUDIO_FORMATS.items() if f.format in cs), f.format)
                raise _refuse(where, f"the data is {got} audio, expected {fmt or ' or '.join(AUDIO_FORMATS)}")
            if not 1 <= f.channels <= MAX_AUDIO_CHANNELS:
                raise _refuse(where, f"audio with {f.channels} channels, at most {MAX_AUDIO_CHANNELS} are accepted")
            if not AUDIO_RATES[0] <= f.samplerate <= AUDIO_RATES[1]:
                raise _refuse(where, f"audio sample rate {f.samplerate} Hz is outside "
                                     f"{AUDIO_RATES[0]}..{AUDIO_RATES[1]}")
            if f.frames > limits.max_audio_seconds * f.samplerate:  # from the header, before decoding
                raise _too_long(where, f.frames / f.samplerate, limits)
            rate = f.samplerate
            # mixed down block by block: memory is the mono clip, not channels x frames
            blocks = [b.mean(axis=1, dtype=np.float32) for b in f.blocks(65_536, dtype="float32", always_2d=True,
                                                                        frames=f.frames)]
    except sf.SoundFileError as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise _refuse(where, f"undecodable audio data ({reason})") from None
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if not np.isfinite(mono).all():  # float WAVs can hold NaN; before resampling spreads it
        raise _refuse(where, "audio samples contain NaN or Inf")
    return _checked(where, _resampled(mono, rate), limits)


# -- URLs -----------------------------------------------------------------------------------------------

def decode_data_url(where: str, url: str, limits: MediaLimits = MediaLimits()) -> tuple[str, bytes]:
    """``data:MIME;base64,DATA`` -> (lower-case MIME, bytes); the size is checked on the string's length
    before any base64 is decoded."""
    if not isinstance(url, str) or not url[:5].lower() == "data:":
        raise _refuse(where, "expected a data: URL")
    header, comma, data = url[5:].partition(",")
    if not comma or len(header) > 256:
        raise _refuse(where, "malformed data: URL, expected data:MIME;base64,DATA")
    params = [p.strip().lower() for p in header.split(";")]
    if params[-1] != "base64":
        raise _refuse(where, "data: URL must be base64-encoded (data:MIME;base64,DATA)")
    return params[0], decode_base64(where, data, limits, "data: URL content")


def decode_base64(where: str, data: str, limits: MediaLimits = MediaLimits(), what: str = "base64 data") -> bytes:
    """Standard base64 (no whitespace) -> bytes; the size is checked on the string's length first."""
    if not isinstance(data, str):
        raise _refuse(where, f"expected a base64 string, got {type(data).__name__}")
    _check_bytes(where, len(data) // 4 * 3, limits, what)  # an upper bound, from the length
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _refuse(where, f"invalid base64 in {what} ({e})") from None


def host_allowed(host: str, allowed_domains) -> bool:
    """``host`` is one of ``allowed_domains`` or a subdomain of one (case and a trailing dot ignored; an IP
    address matches only itself)."""
    host = host.lower().rstrip(".")
    domains = [a.lower().strip(".") for a in allowed_domains]
    return any(host == d or (host.endswith("." + d) and not d.replace(".", "").isdigit()) for d in domains if d)


def _check_url(where: str, url: str, allowed_domains) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as e:  # e.g. a malformed IPv6 literal or port
        raise _refuse(where, f"malformed URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise _refuse(where, f"URL scheme {parts.scheme!r} is not accepted, expected https, http or a data: URL")
    if parts.username is not None or parts.password is not None:
        raise _refuse(where, "URLs with credentials (user@host) are not accepted")
    if not allowed_domains:
        raise _refuse(where, "remote URLs are not accepted here (no media domains are allowed); send the media "
                             "inline as a data: URL")
    if not host or not host_allowed(host, allowed_domains):
        raise _refuse(where, f"host {_short(host)} is not among the allowed media domains")


def fetch_url(where: str, url: str, allowed_domains, limits: MediaLimits = MediaLimits()) -> tuple[str, bytes]:
    """GET an http(s) URL whose host is in ``allowed_domains`` (or a subdomain of one) -> (MIME, bytes).

    Redirects are followed by hand, at most ``MAX_REDIRECTS``, each target checked against the allow-list;
    the body is streamed and dropped past ``limits.max_media_bytes`` or ``limits.fetch_timeout_s``.
    Blocking: call it off the event loop.
    """
    import httpx

    _check_url(where, url, allowed_domains)
    deadline = time.monotonic() + limits.fetch_timeout_s
    try:
        with httpx.Client(timeout=limits.fetch_timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        _check_url(where, url, allowed_domains)
                        continue
                    if response.status_code != 200:
                        raise _refuse(where, f"fetching the URL gave HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit():
                        _check_bytes(where, int(declared), limits, "the fetched content")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limits.max_media_bytes:
                            _check_bytes(where, len(body), limits, "the fetched content")
                        if time.monotonic() > deadline:
                            raise _refuse(where, f"fetching the URL took over {limits.fetch_timeout_s:g} s")
                    mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    return mime, bytes(body)
            raise _refuse(where, f"more than {MAX_REDIRECTS} redirects")
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _refuse(where, f"could not fetch the URL ({type(e).__name__}: {e})") from None
