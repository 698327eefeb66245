"""OpenAI ``image_url`` / ``input_audio`` chat parts -> raw items of the checkpoint's modalities.

A part goes to the modality named by its extension field ``modality``, else to the one
modality whose encoder takes its media (``media_of``); a part no modality can take, or
that several could, is refused naming the part. ``route`` is cheap and runs on the event
loop, so that item counts are checked before anything is decoded. ``decode`` blocks, and
the serving object runs it on its media threads: ``load`` (base64, an allowed remote fetch,
then ``mmfuse.media``'s header checks and decoding), then the encoder's own preprocessor
(``encoders.preprocess``), so the item reaches ``inputs.prepare`` as a ready ``RawItem``.
Every refusal is an ``InputError`` whose ``param`` is the part (``messages[i].content[j]``).
"""
from __future__ import annotations

from collections.abc import Mapping

from ..config import ModalitySpec
from ..encoders import media_of, preprocess
from ..inputs import InputError, RawItem
from ..media import MediaLimits, decode_base64, decode_data_url, fetch_url, load_audio, load_image
from . import protocol as P


def part_media(part) -> str | None:
    """The media a content part carries: ``image``, ``audio``, or None (text, embeddings)."""
    return "image" if isinstance(part, P.ImagePart) else "audio" if isinstance(part, P.AudioPart) else None


def modality_media(specs: Mapping[str, ModalitySpec]) -> dict[str, str | None]:
    """What each modality takes as raw media (None: vectors only); read once per server."""
    return {name: media_of(spec) for name, spec in specs.items()}


PLURAL = {"image": "images", "audio": "audio"}


def route(where: str, part, media: Mapping[str, str | None]) -> str:
    """The modality that takes a media part."""
    kind = part_media(part)
    kinds = PLURAL[kind]
    if part.modality is not None:
        if part.modality not in media:
            raise InputError(f"{where}.modality: unknown modality {part.modality!r:.60}, this checkpoint has "
                             f"{sorted(media)}", where)
        if media[part.modality] != kind:
            takes = f"{media[part.modality]} media" if media[part.modality] else "vectors only (no encoder)"
            raise InputError(f"{where}: modality {part.modality!r} takes {takes}, not {kinds}; send "
                             f"{kinds} to {_takers(media, kind)}", where)
        return part.modality
    takers = [name for name, m in media.items() if m == kind]
    if len(takers) != 1:
        reason = (f"no modality of this checkpoint has an encoder that takes {kinds} ({_described(media)})"
                  if not takers else
                  f"several modalities take {kinds} ({', '.join(takers)}); name one in the part's \"modality\" field")
        raise InputError(f"{where}: {reason}", where)
    return takers[0]


def _takers(media: Mapping[str, str | None], kind: str) -> str:
    takers = [name for name, m in media.items() if m == kind]
    return " or ".join(repr(t) for t in takers) if takers else "none of this checkpoint's modalities"


def _described(media: Mapping[str, str | None]) -> str:
    return ", ".join(f"{name}: {m or 'vectors'}" for name, m in media.items())


def decode(where: str, part, spec: ModalitySpec, index: int, limits: MediaLimits, allowed_domains=()) -> RawItem:
    """A media part, routed to ``spec`` as its item ``index``, -> that item preprocessed by the encoder's
    own preprocessor. Blocking."""
    medium = load(where, part, limits, allowed_domains)
    try:
        return preprocess(spec, index, medium, limits)
    except InputError as e:  # its message names the item ("modality 'audio' item 0: ..."); say which part
        raise InputError(f"{where}: {e}", where) from None


def load(where: str, part, limits: MediaLimits, allowed_domains=()) -> object:
    """A media part -> an RGB PIL image or a float32 16 kHz mono waveform. Blocking."""
    try:
        return _load(where, part, limits, allowed_domains)
    except InputError as e:
        e.param = where  # the message names the field; the error's param is the part
        raise


def _load(where: str, part, limits: MediaLimits, allowed_domains) -> object:
    if isinstance(part, P.ImagePart):
        at, url = f"{where}.image_url.url", part.image_url.url
        if url[:5].lower() == "data:":
            mime, data = decode_data_url(at, url, limits)
        else:
            mime, data = fetch_url(at, url, allowed_domains, limits)
        # the bytes decide the format; a MIME other than image/* (or "unknown binary") says what was meant
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise InputError(f"{at}: {mime!r:.60} content, expected an image")
        return load_image(f"{where}.image_url", data, limits)
    at = f"{where}.input_audio"
    data = decode_base64(f"{at}.data", part.input_audio.data, limits, "audio data")
    return load_audio(at, data, part.input_audio.format, limits)
