"""docs/training.md, "Raw media and `mmfuse data encode`": training rows with raw images, encoded once.

Makes a tiny offline checkpoint whose ``image`` modality has a built-in CLIP encoder (random
weights, the real architecture), writes rows holding PNG bytes with ``write_parquet``, checks them,
precomputes the encoder's vectors with ``encode_dataset`` (``mmfuse data encode``) and trains
stage 1 on both files: the same loss. Prints:

    []
    12 rows encoded in 1 shard(s)
    ok
"""
import io
import tempfile
from pathlib import Path

from PIL import Image

from mmfuse import init_checkpoint
from mmfuse.tiny import make_base, make_vision_encoder
from mmfuse.training import TrainConfig, check_dataset, encode_dataset, train, write_parquet

# a checkpoint whose modality "image" has a CLIP encoder; here tiny offline ones (the same as
# `mmfuse tiny-base base` + `mmfuse init base ckpt --modality image --encoder image=clip`)
work = Path(tempfile.mkdtemp())
clip = make_vision_encoder(work / "clip")
ckpt = init_checkpoint(make_base(work / "base"), work / "ckpt",
                       {"image": {"encoder": {"source": str(clip), "kind": "clip_vision"}}})


def png(rgb):  # any image file's bytes do (PNG, JPEG, WEBP, ...); a PIL image or a file path too
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(buf, format="PNG")
    return buf.getvalue()


colours = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
rows = [{"prompt": "The colour of <|image|> is", "response": name, "items": {"image": [png(rgb)]}}
        for name, rgb in colours.items()] * 4
write_parquet(rows, work / "raw.parquet")
print(check_dataset(str(ckpt), str(work / "raw.parquet")))  # [] when every row is fine

# the encoder's vectors, once (`mmfuse data encode CKPT raw.parquet encoded/`)
encoded = encode_dataset(str(ckpt), str(work / "raw.parquet"), work / "encoded", progress=False)
print(encoded.rows, "rows encoded in", encoded.shards, "shard(s)")

losses = [train(TrainConfig(ckpt=str(ckpt), data=str(data), out=str(work / name), stage=1, max_steps=3,
                            batch_size=4, shuffle=False)).final_loss
          for name, data in (("run_raw", work / "raw.parquet"), ("run_encoded", encoded.out))]
assert abs(losses[0] - losses[1]) < 1e-5, losses  # training on vectors = training on the raw images
print("ok")
