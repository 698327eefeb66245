"""Training on raw media (image bytes, waveforms, text in mm_NAME) and `mmfuse data encode`.

One checkpoint with three built-in encoders (a tiny random CLIP, pooled; a tiny random Whisper,
sequence: one vector per 20 ms of each clip; the bundled MiniLM, pooled) and one plain vector modality,
on the tiny qwen3 base. fp32 on CPU throughout, so losses and weights compare to 1e-5 or better.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmfuse import ModalitySpec, init_checkpoint
from mmfuse.config import ConfigError
from mmfuse.training import DataError, TrainConfig, check_dataset, encode_dataset, train, write_parquet

WORDS = "red green blue yellow circle square triangle".split()


def png(seed: int, width: int = 28, height: int = 20) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def raw_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with raw media: an image (PNG bytes, sizes vary) on 3 of 4 rows, a 0.25-1 s waveform on every
    row, two sentences on every third row, a vector item on every fifth."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        items, parts = {}, []
        if i % 4 != 3:
            items["image"] = [png(seed * 1000 + i, width=20 + i)]
            parts.append("look at <|image|>")
        items["audio"] = [(0.1 * rng.normal(size=int(rng.integers(4_000, 16_000)))).astype(np.float32)]
        parts.append("hear <|audio|>")
        if i % 3 == 0:
            items["text"] = [f"a small {WORDS[i % len(WORDS)]} cube", "next to a sphere"]
            parts.append("read <|text|> and <|text|>")
        if i % 5 == 0:
            items["m1"] = [rng.normal(size=(2, 32))]
            parts.append("with <|m1|>")
        rows.append({"prompt": " ".join(parts), "response": WORDS[i % len(WORDS)], "items": items})
    return rows


def rows_of(ckpt, name: str, item) -> int:
    """Vectors the modality's encoder makes of one raw item (its preprocessor says)."""
    from mmfuse.checkpoint import open_checkpoint
    from mmfuse.encoders import preprocess

    return preprocess(open_checkpoint(ckpt).specs[name], 0, item).rows


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def media_ckpt(tmp_path_factory, qwen3_base) -> Path:
    from mmfuse.encoders import encoder_output_dim, encoder_spec
    from mmfuse.tiny import make_vision_encoder, make_whisper_encoder, minilm_dir

    work = tmp_path_factory.mktemp("media_encoders")
    encoders = {"image": encoder_spec(make_vision_encoder(work / "clip"), "pooled"),
                "audio": encoder_spec(make_whisper_encoder(work / "whisper"), "sequence"),
                "text": encoder_spec(minilm_dir(), "pooled")}
    specs = [ModalitySpec(n, input_dim=encoder_output_dim(e), encoder=e) for n, e in encoders.items()]
    specs.append(ModalitySpec("m1", input_dim=32))
    return init_checkpoint(qwen3_base, tmp_path_factory.mktemp("media_ckpt"), specs)


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "raw.parquet"
    write_parquet(raw_rows(12), path)
    return path


def cfg(ckpt, data, out, **kw) -> TrainConfig:
    base = dict(ckpt=str(ckpt), data=str(data), out=str(out), stage=1, batch_size=12, max_steps=1,
                schedule="constant", shuffle=False)
    return TrainConfig(**(base | kw))


# ---------------------------------------------------------------- the raw data format

def test_write_parquet_stores_raw_media_as_given(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from mmfuse.media import load_image

    picture = Image.open(io.BytesIO(png(7))).convert("P")  # a palette image: stored as PNG, same RGB pixels
    wave = np.linspace(-0.5, 0.5, 3_000, dtype=np.float32)
    items = {"image": [png(1), picture], "audio": [wave], "text": "one sentence", "m1": [np.ones(32)]}
    write_parquet([{"prompt": "a", "response": "b", "items": items},
                   {"prompt": "c", "response": "d", "items": {"m1": [np.ones((2, 32))]}}], tmp_path / "d.parquet")
    table = pq.read_table(tmp_path / "d.parquet")
    types = {name: str(table.schema.field(name).type) for name in table.column_names}
    assert types["mm_image"] == "list<element: binary>"
    assert types["mm_audio"] == "list<element: list<element: float>>"  # a waveform stays 1-D
    assert types["mm_text"] == "list<element: string>"
    assert types["mm_m1"] == "list<element: list<element: list<element: float>>>"  # (32,) beside (2, 32): (1, 32)
    row = table.to_pylist()[0]
    assert row["mm_image"][0] == png(1)
    assert np.array_equal(np.asarray(load_image("x", row["mm_image"][1])), np.asarray(picture.convert("RGB")))
    assert np.array_equal(np.asarray(row["mm_audio"][0], np.float32), wave)
    assert row["mm_text"] == ["one sentence"]  # one string is one item, not its characters

    mixed = [{"prompt": "a", "response": "b", "items": {"image": [png(1)]}},
             {"prompt": "a", "response": "b", "items": {"image": []}},
             {"prompt": "a", "response": "b", "items": {"image": [png(2), "cat.png"]}}]
    with pytest.raises(DataError, match=r"^row 2: modality 'image' item 1: a string \(text or a file path\) in a "
                                        r"column that holds bytes .* \(row 0 item 0\); a parquet column holds one "
                                        r"kind of item"):
        write_parquet(mixed, tmp_path / "mixed.parquet")
    with pytest.raises(DataError, match=r"^row 1: modality 'audio' item 0: numbers .* in a column that holds bytes"):
        write_parquet([{"prompt": "a", "response": "b", "items": {"audio": [wav(wave)]}},
                       {"prompt": "a", "response": "b", "items": {"audio": [np.zeros((1, 64))]}}],
                      tmp_path / "mixed2.parquet")


def test_check_names_row_and_modality_of_bad_media(media_ckpt, tmp_path, capsys):
    from mmfuse.cli import main

    rows = raw_rows(8)
    rows[2]["items"]["image"] = [b"\x89PNG\r\n\x1a\n but then garbage"]
    rows[5]["items"]["audio"] = [np.full(2_000, np.nan, np.float32)]
    rows[6]["items"]["text"] = ["fine", ""]
    rows[6]["prompt"] += " read <|text|> and <|text|>"
    write_parquet(rows, tmp_path / "bad.parquet")
    errors = check_dataset(media_ckpt, tmp_path / "bad.parquet")
    assert [e.split(":")[0] for e in errors] == ["row 2", "row 5", "row 6"], errors
    assert errors[0].startswith("row 2: modality 'image' item 0: not an image in a supported format")
    assert errors[1] == "row 5: modality 'audio' item 0: audio samples contain NaN or Inf"
    assert errors[2].startswith("row 6: modality 'text' item 1: expected a non-empty string")

    assert main(["data", "check", str(media_ckpt), str(tmp_path / "bad.parquet")]) == 1
    assert "row 2: modality 'image' item 0: not an image" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"^row 2: modality 'image' item 0: not an image"):
        train(cfg(media_ckpt, tmp_path / "bad.parquet", tmp_path / "out", batch_size=4))


def test_datasets_image_and_audio_features_are_read_undecoded(media_ckpt, tmp_path):
    """A parquet file written by `datasets` with Image / Audio features: mmfuse decodes the stored bytes
    itself (datasets would raise PIL's error with no row, or need torchcodec for audio)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 4
    images = [[{"bytes": png(i), "path": None}] for i in range(n)]
    images[3] = [{"bytes": b"not an image", "path": None}]
    ds = datasets.Dataset.from_dict(
        {"prompt": ["<|image|> <|audio|>"] * n, "response": ["red"] * n, "mm_image": images},
        features=datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                    "mm_image": datasets.List(datasets.Image())}))
    ds.to_parquet(tmp_path / "hf.parquet")
    table = pq.read_table(tmp_path / "hf.parquet")  # + an Audio feature column of WAV bytes (no torchcodec here)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    clips = [[{"bytes": wav(0.1 * np.random.default_rng(i).normal(size=6_000).astype(np.float32)), "path": None}]
             for i in range(n)]
    table = table.append_column("mm_audio", pa.array(clips, pa.list_(struct)))
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["mm_audio"] = {"_type": "List", "feature": {"_type": "Audio", "sampling_rate": 16000}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta)}), tmp_path / "hf.parquet")
    assert "Audio" in repr(datasets.load_dataset("parquet", data_files=str(tmp_path / "hf.parquet"),
                                                 split="train").features["mm_audio"])

    errors = check_dataset(media_ckpt, tmp_path / "hf.parquet")
    assert len(errors) == 1 and errors[0].startswith("row 3: modality 'image' item 0: not an image"), errors

    # the good rows encode; the output's `datasets` metadata describes the new vector columns
    pq.write_table(pq.read_table(tmp_path / "hf.parquet").slice(0, 3), tmp_path / "hf_good.parquet")
    out = encode_dataset(media_ckpt, tmp_path / "hf_good.parquet", tmp_path / "enc", progress=False).out
    encoded = datasets.load_dataset("parquet", data_files=str(out / "part-00000.parquet"), split="train")
    assert repr(encoded.features["mm_image"]) == "List(List(List(Value('float32'))))"
    assert repr(encoded.features["prompt"]) == "Value('string')"
    assert np.asarray(encoded[0]["mm_image"][0]).shape == (1, 48)
    assert np.asarray(encoded[0]["mm_audio"][0]).shape == (rows_of(media_ckpt, "audio", clips[0][0]["bytes"]), 64)


# ---------------------------------------------------------------- training on raw media

def test_stage1_on_raw_media_trains_projectors_only(media_ckpt, raw_data, tmp_path):
    """The encoders run frozen, outside the model's parameters: not in the optimiser, the training state
    or the saved projector file; the output carries the input's encoders/ unchanged and runs raw media."""
    from mmfuse import MultimodalPipeline
    from mmfuse.checkpoint import INDEX_FILE, open_checkpoint
    from mmfuse.encoders import EncoderTower, get_tower

    encoders_before = tree_digest(media_ckpt / "encoders")
    assert check_dataset(media_ckpt, raw_data) == []
    out = tmp_path / "s1"
    result = train(cfg(media_ckpt, raw_data, out, batch_size=4, max_steps=3, save_every=3))
    assert result.steps == 3 and np.isfinite(result.final_loss)

    saved, before = load_file(str(out / "mm_projectors.safetensors")), load_file(
        str(media_ckpt / "mm_projectors.safetensors"))
    assert saved.keys() == before.keys()  # exactly the projector tensors, no encoder weight among them
    assert {k.split(".")[1] for k in saved} == {"image", "audio", "text", "m1"}
    moved = {k.split(".")[1] for k in saved if not torch.equal(saved[k], before[k])}
    assert moved == {"image", "audio", "text", "m1"}
    state = sorted((out / "train_state").glob("step_*"))[-1]
    assert load_file(str(state / "trainable.safetensors")).keys() == saved.keys()
    optimizer = torch.load(state / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(saved)
    assert set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values()) == \
        {"model.safetensors", "mm_projectors.safetensors"}

    assert tree_digest(media_ckpt / "encoders") == encoders_before  # the input's encoders: untouched
    assert tree_digest(out / "encoders") == encoders_before  # and carried over as they are
    specs = open_checkpoint(media_ckpt).specs
    for name in ("image", "audio", "text"):  # the towers training ran stayed frozen and equal to their files
        tower, fresh = get_tower(specs[name].encoder), EncoderTower(specs[name].encoder)
        fresh.load_weights()
        assert not any(p.requires_grad for p in tower.parameters())
        state, reference = tower.state_dict(), fresh.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)

    pipe = MultimodalPipeline(str(out), backend="hf")  # encoders resolve inside the output checkpoint
    text = pipe.generate({"text": "look at <|image|>", "multimodal_data": {"multimodal_embeddings": {
        "image": [png(3)]}}}, max_tokens=2)
    assert isinstance(text, str)


def test_stage2_lora_export_carries_the_encoders(media_ckpt, raw_data, tmp_path):
    from mmfuse import load

    out = tmp_path / "s2"
    train(cfg(media_ckpt, raw_data, out, stage=2, lora_r=2, batch_size=4, max_steps=1))
    assert tree_digest(out / "encoders") == tree_digest(media_ckpt / "encoders")
    from mmfuse.encoders import preprocess

    model = load(out)  # the text encoder resolves inside the output checkpoint
    rows = model.project({"text": [preprocess(model.specs["text"], 0, "a red cube")]})
    assert rows["text"].shape == (1, 128) and torch.isfinite(rows["text"]).all()


# ---------------------------------------------------------------- mmfuse data encode

def test_encoded_dataset_trains_exactly_like_the_raw_one(media_ckpt, raw_data, tmp_path):
    import pyarrow.parquet as pq

    result = encode_dataset(media_ckpt, raw_data, tmp_path / "enc", batch_size=5, rows_per_shard=5, progress=False)
    assert (result.rows, result.shards, result.written, result.skipped) == (12, 3, 3, 0)
    files = sorted(p.name for p in result.out.iterdir())
    assert files == ["_encode.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    encoded, raw = pq.read_table(result.out), pq.read_table(raw_data)  # "_" hides the manifest from readers
    assert encoded.column_names == raw.column_names and encoded.num_rows == 12
    for name in ("image", "audio", "text"):
        assert str(encoded.schema.field(f"mm_{name}").type) == "list<element: list<element: list<element: float>>>"
    assert encoded.column("prompt").equals(raw.column("prompt"))
    assert encoded.column("mm_m1").to_pylist() == raw.column("mm_m1").to_pylist()  # vectors pass through
    rows, originals = encoded.to_pylist(), raw_rows(12)
    for row, original in zip(rows, originals):
        assert [np.asarray(t).shape for t in row["mm_image"]] == [(1, 48)] * len(original["items"].get("image", []))
        audio = np.asarray(row["mm_audio"][0])  # sequence output: one vector per 2 frames of the clip's own audio
        assert audio.shape == (rows_of(media_ckpt, "audio", original["items"]["audio"][0]), 64)
        assert [np.asarray(t).shape for t in row["mm_text"]] == [(1, 384)] * len(original["items"].get("text", []))
    assert check_dataset(media_ckpt, result.out) == []

    losses = {}
    for name, data in (("raw", raw_data), ("encoded", result.out)):
        run = train(cfg(media_ckpt, data, tmp_path / name, lr=1e-2))
        losses[name] = run.final_loss
    assert abs(losses["raw"] - losses["encoded"]) <= 1e-5, losses
    a, b = load_file(str(tmp_path / "raw" / "mm_projectors.safetensors")), load_file(
        str(tmp_path / "encoded" / "mm_projectors.safetensors"))
    before = load_file(str(media_ckpt / "mm_projectors.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert min(float((a[k] - before[k]).abs().max()) for k in a) > 1e-3  # the step did move every projector


def test_encode_resumes_the_same_job_and_refuses_others(media_ckpt, raw_data, tmp_path, monkeypatch, capsys):
    from mmfuse.cli import main
    from mmfuse.training import precompute

    out = tmp_path / "enc"
    calls = []
    real = precompute._with_vectors

    def interrupted(*args):  # the job dies after writing two shards
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(precompute, "_with_vectors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(media_ckpt, raw_data, out, rows_per_shard=4, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(DataError, match=r"unfinished `mmfuse data encode` output \(2 of 3 shards written\); "
                                        r"rerun that command"):
        train(cfg(media_ckpt, out, tmp_path / "run"))
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}

    argv = ["data", "encode", str(media_ckpt), str(raw_data), str(out), "--rows-per-shard", "4"]
    assert main(argv) == 0
    io_ = capsys.readouterr()
    assert f"wrote {out} (12 rows in 3 shard(s): 1 encoded, 2 kept from an earlier run)" in io_.out
    assert "encode: 100%" in io_.err and "12/12" in io_.err  # the progress bar, starting at the kept rows
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")
            if p.name in kept} == kept
    fresh = encode_dataset(media_ckpt, raw_data, tmp_path / "fresh", rows_per_shard=4, progress=False).out
    import pyarrow.parquet as pq
    assert pq.read_table(out).equals(pq.read_table(fresh))  # resumed == uninterrupted
    assert main(argv) == 0 and "0 encoded, 3 kept" in capsys.readouterr().out

    listing = tree_digest(out)
    assert main(argv[:-1] + ["5"]) == 2  # another job (shard size) in a non-empty OUT: refused, nothing touched
    err = capsys.readouterr().err
    assert f"mmfuse data encode: error: out: output directory {out} is not empty" in err
    assert "it holds another `mmfuse data encode` job (its rows_per_shard differ); pass --overwrite" in err
    assert tree_digest(out) == listing
    assert main(argv[:-1] + ["5", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert json.loads((out / "_encode.json").read_text())["job"]["rows_per_shard"] == 5

    (out / "notes.md").write_text("mine")  # --overwrite removes only what data encode writes
    assert main(argv + ["--overwrite"]) == 2
    assert "holds entries mmfuse does not write (notes.md)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="holds the input data"):
        encode_dataset(media_ckpt, raw_data, raw_data.parent, overwrite=True, progress=False)
    assert raw_data.is_file()


def test_encode_stops_at_a_bad_row_and_names_it(media_ckpt, tmp_path, qwen3_ckpt):
    rows = raw_rows(9)
    rows[7]["items"]["image"] = [png(7)[:60]]  # a truncated PNG
    write_parquet(rows, tmp_path / "bad", rows_per_file=5)  # row 7 is row 2 of the second file
    with pytest.raises(DataError, match=r"^row 7: modality 'image' item 0: undecodable PNG data, truncated or corrupt"):
        encode_dataset(media_ckpt, tmp_path / "bad", tmp_path / "enc", rows_per_shard=2, progress=False)
    # shards slice one file each: rows 0-1, 2-3, 4 | 5-6 were done and stay; 7-8 failed
    assert sorted(p.name for p in (tmp_path / "enc").glob("part-*.parquet")) == [f"part-0000{i}.parquet"
                                                                              for i in range(4)]
    with pytest.raises(ConfigError, match="no modality has an encoder"):
        encode_dataset(qwen3_ckpt, tmp_path / "bad", tmp_path / "enc2", progress=False)
    write_parquet([{"prompt": "x <|m1|>", "response": "y", "items": {"m1": [np.zeros(32)]}}], tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"no column for a modality with an encoder \(expected one of \['mm_audio', "
                                        r"'mm_image', 'mm_text'\]\)"):
        encode_dataset(media_ckpt, tmp_path / "v.parquet", tmp_path / "enc3", progress=False)
    assert not (tmp_path / "enc3").exists()
