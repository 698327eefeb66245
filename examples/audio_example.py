"""Audio in, text out: a checkpoint whose ``audio`` modality has a Whisper encoder built in.

A .wav file (or a 1-D float waveform at 16 kHz, or encoded audio bytes) goes straight into
``generate``: the backend runs Whisper's own feature extractor (log-mel) and encoder, and with
``output: sequence`` each 20 ms of the clip becomes one vector, so one soft token in the prompt.

Runs offline by default, on a tiny Whisper (the real architecture and feature extractor, random
weights: ``mmfuse.tiny.make_whisper_encoder``; 2 s windows) and a tiny random LM, built here in
seconds; a 1 s two-tone clip is written as .wav. On real weights, where you have them:

    python examples/audio_example.py --encoder-source openai/whisper-base --base Qwen/Qwen3-0.6B

Either way the projector is freshly initialised, so the text is gibberish until it is trained
(docs/training.md). Prints (the ``...`` differ from machine to machine and run to run):

    encoder: whisper, sequence: 64-d vectors, one per 20 ms of audio
    audio: .../tones.wav, 1.0 s at 16000 Hz
    backend: vllm
    from the .wav file: ...
    from the waveform read back with soundfile: the same text
    ok

(``backend: hf`` where vLLM is not installed; other dimensions with real weights.)
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import soundfile

import mmfuse
from mmfuse import MultimodalPipeline
from mmfuse.checkpoint import open_checkpoint
from mmfuse.tiny import make_base, make_whisper_encoder

parser = argparse.ArgumentParser(description="Audio in, text out, with Whisper inside the checkpoint.")
parser.add_argument("--encoder-source", help="a Whisper hub id or directory (default: a tiny random Whisper built here)")
parser.add_argument("--base", help="a base LM hub id or directory (default: a tiny random LM built here)")
parser.add_argument("--audio", help="an audio file (default: a 1 s clip made here)")
args = parser.parse_args()

work = Path(tempfile.mkdtemp())
whisper = args.encoder_source or make_whisper_encoder(work / "whisper")
base = args.base or make_base(work / "base")
ckpt = mmfuse.init_checkpoint(base, work / "ckpt", {"audio": {"encoder": {
    "source": str(whisper), "kind": "whisper", "output": "sequence"}}}, link=True)
spec = open_checkpoint(ckpt).specs["audio"]
print(f"encoder: {spec.encoder.kind}, {spec.encoder.output}: {spec.input_dim}-d vectors, one per 20 ms of audio")

audio_path = Path(args.audio or work / "tones.wav")
if not args.audio:
    t = np.arange(16000) / 16000   # 1 s at 16 kHz
    soundfile.write(audio_path, 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 660 * t), 16000)
waveform, rate = soundfile.read(audio_path, dtype="float32")
print(f"audio: {audio_path}, {len(waveform) / rate:.1f} s at {rate} Hz")

with MultimodalPipeline(ckpt, backend="auto") as pipe:   # "vllm" when importable, else "hf"
    print("backend:", pipe.backend.name)
    out = pipe.generate({"text": "Transcribe <|audio|>:",
                         "multimodal_data": {"multimodal_embeddings": {"audio": str(audio_path)}}}, max_tokens=16)
    print("from the .wav file:", repr(out))
    # the same clip as (waveform, sampling rate), resampled when not 16 kHz (a bare 1-D array is taken as 16 kHz)
    again = pipe.generate({"text": "Transcribe <|audio|>:",
                           "multimodal_data": {"multimodal_embeddings": {"audio": (waveform, rate)}}}, max_tokens=16)
    print("from the waveform read back with soundfile:", "the same text" if again == out else repr(again))

assert again == out
print("ok")
