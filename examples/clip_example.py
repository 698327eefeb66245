"""The original sketch's "Real CLIP Example" on mmfuse: an image file in, text out, the encoder built in.

The checkpoint's ``image`` modality declares a CLIP vision encoder, so an image (a file path
here; a PIL image or image bytes work too) goes straight into ``generate``: the backend runs
CLIP's own image processor and ``get_image_features``, the projector maps that vector into the
LM, and the LM writes. The sketch computed the CLIP vector by hand and passed it in; that still
works, and gives the same text.

Runs offline by default, on a tiny CLIP (the real architecture and image processor, random
weights: ``mmfuse.tiny.make_vision_encoder``) and a tiny random LM, built here in seconds. On
real weights, where you have them (about 2 GB to download):

    python examples/clip_example.py --encoder-source openai/clip-vit-base-patch32 --base Qwen/Qwen3-0.6B

Either way the projector is freshly initialised, so the text is gibberish until it is trained
(docs/training.md). Prints (the ``...`` differ from machine to machine and run to run):

    encoder: clip_vision, pooled: 48-d image vectors into the LM's 128-d hidden states
    image: .../picture.png
    backend: vllm
    from the image file: ...
    from the vector computed by hand (the sketch's way): the same text
    ok

(``backend: hf`` where vLLM is not installed; other dimensions with real weights.)
"""
import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, CLIPModel

import mmfuse
from mmfuse import MultimodalPipeline
from mmfuse.checkpoint import open_checkpoint
from mmfuse.tiny import make_base, make_vision_encoder

parser = argparse.ArgumentParser(description="An image file in, text out, with CLIP inside the checkpoint.")
parser.add_argument("--encoder-source", help="a CLIP hub id or directory (default: a tiny random CLIP built here)")
parser.add_argument("--base", help="a base LM hub id or directory (default: a tiny random LM built here)")
parser.add_argument("--image", help="an image file (default: a picture drawn here)")
args = parser.parse_args()

work = Path(tempfile.mkdtemp())
clip = args.encoder_source or make_vision_encoder(work / "clip")   # a full CLIP directory, as on the hub
base = args.base or make_base(work / "base")
# input_dim comes from the encoder; a local encoder is copied into the checkpoint, a hub id stays a reference
ckpt = mmfuse.init_checkpoint(base, work / "ckpt", {"image": {"encoder": {"source": str(clip), "kind": "clip_vision"}}},
                              link=True)   # symlink the base's weight files instead of copying them
info = open_checkpoint(ckpt)
spec = info.specs["image"]
print(f"encoder: {spec.encoder.kind}, {spec.encoder.output}: {spec.input_dim}-d image vectors into the LM's "
      f"{info.hidden_size}-d hidden states")

image_path = Path(args.image or work / "picture.png")
if not args.image:
    picture = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(picture).ellipse((100, 60, 220, 180), fill="red")
    picture.save(image_path)
print("image:", image_path)

with MultimodalPipeline(ckpt, backend="auto") as pipe:   # "vllm" when importable, else "hf"
    print("backend:", pipe.backend.name)
    # the image file itself: CLIP runs inside the backend
    out = pipe.generate({"text": "Describe <|image|>.",
                         "multimodal_data": {"multimodal_embeddings": {"image": str(image_path)}}}, max_tokens=16)
    print("from the image file:", repr(out))

    # the sketch's way: CLIP's image features computed here, passed as a vector
    model, processor = CLIPModel.from_pretrained(clip), AutoImageProcessor.from_pretrained(clip)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=Image.open(image_path).convert("RGB"),
                                                        return_tensors="pt"))
    features = getattr(features, "pooler_output", features)   # (1, 48); transformers 5 wraps it in an output object
    by_hand = pipe.generate({"text": "Describe <|image|>.",
                             "multimodal_data": {"multimodal_embeddings": {"image": features}}}, max_tokens=16)
    print("from the vector computed by hand (the sketch's way):", "the same text" if by_hand == out else repr(by_hand))

assert by_hand == out
print("ok")
