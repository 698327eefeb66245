"""Training data: the parquet format, row encoding, and dataset checks against a checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmfuse.training import check_dataset, write_parquet
from mmfuse.training.config import TrainConfig, TrainConfigError

WORDS = "red green blue yellow one two three four circle square triangle hello world".split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Mixed rows: placeholders or none, 0-2 m1 items of 1-2 vectors, m2 on some rows, responses of 1-4 words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        items = {"m1": [rng.normal(size=(int(rng.integers(1, 3)), 32)) for _ in range(i % 3)]}
        prompt = "describe " + " and ".join(["<|m1|>"] * len(items["m1"])) if i % 2 else "describe the image"
        if i % 4 == 1:
            items["m2"] = [rng.normal(size=16)]
            prompt += " with <|sensor|>"
        response = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))
        rows.append({"prompt": prompt, "response": response, "items": items})
    return rows


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mixed.parquet"
    write_parquet(make_rows(24), path)
    return path


def test_write_parquet_schema_and_values(tmp_path):
    import pyarrow.parquet as pq

    rows = make_rows(6)
    write_parquet(rows, tmp_path / "d.parquet")
    table = pq.read_table(tmp_path / "d.parquet")
    assert str(table.schema.field("mm_m1").type) == "list<element: list<element: list<element: float>>>"
    got = table.to_pylist()
    for row, back in zip(rows, got):
        assert back["prompt"] == row["prompt"] and back["response"] == row["response"]
        assert len(back["mm_m1"]) == len(row["items"]["m1"])
        for a, b in zip(row["items"]["m1"], back["mm_m1"]):
            np.testing.assert_allclose(np.asarray(b), a.astype(np.float32))
        assert len(back["mm_m2"]) == len(row["items"].get("m2", []))  # absent modality -> []
    files = write_parquet(rows, tmp_path / "shards", rows_per_file=4)
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]


def test_check_dataset_accepts_good_data(qwen3_ckpt, mixed_data):
    assert check_dataset(qwen3_ckpt, mixed_data) == []


def test_check_dataset_names_bad_rows(qwen3_ckpt, tmp_path, capsys):
    rows = make_rows(8)
    rows[2] = {"prompt": "x <|m1|>", "response": "y", "items": {"m1": [np.zeros((1, 31))]}}
    rows[4] = {"prompt": "x <|m1|> <|m1|>", "response": "y", "items": {"m1": [np.zeros(32)]}}
    rows[5] = {"prompt": "x", "response": "y", "items": {"m1": [np.full(32, np.nan)]}}
    rows[7] = {"prompt": "x" * 3000, "response": "y", "items": {}}
    write_parquet(rows, tmp_path / "bad.parquet")
    errors = check_dataset(qwen3_ckpt, tmp_path / "bad.parquet")
    assert len(errors) == 4
    assert errors[0].startswith("row 2: modality 'm1' item 0: wrong last dimension, expected 32")
    assert errors[1].startswith("row 4: modality 'm1' item 1: placeholder <|m1|> #1 has no item")
    assert errors[2] == "row 5: modality 'm1' item 0: contains NaN or Inf values"
    assert errors[3].startswith("row 7: prompt too long")
    assert check_dataset(qwen3_ckpt, tmp_path / "bad.parquet", max_errors=2) == errors[:2]

    from mmfuse.training.cli import add_data_check_args, run_data_check
    import argparse
    p = argparse.ArgumentParser()
    add_data_check_args(p)
    assert run_data_check(p.parse_args([str(qwen3_ckpt), str(tmp_path / "bad.parquet")])) == 1
    assert "row 2: modality 'm1' item 0: wrong last dimension" in capsys.readouterr().err


def test_check_dataset_rejects_bad_columns(qwen3_ckpt, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"], "mm_audio": [[[[0.0]]]]}), tmp_path / "a.parquet")
    assert check_dataset(qwen3_ckpt, tmp_path / "a.parquet")[0].startswith("column 'mm_audio': unknown modality")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "b.parquet")
    assert check_dataset(qwen3_ckpt, tmp_path / "b.parquet") == \
        ["column 'response' is missing (columns: ['prompt'])"]
    pq.write_table(pa.table({"messages": ["a"], "prompt": ["a"], "response": ["b"]}), tmp_path / "c.parquet")
    assert check_dataset(qwen3_ckpt, tmp_path / "c.parquet")[0].startswith(
        "columns 'messages' and ['prompt', 'response']: give a chat column 'messages' or plain columns")
    pq.write_table(pa.table({"prompt": ["a", None], "response": ["b", "c"]}), tmp_path / "d.parquet")
    assert check_dataset(qwen3_ckpt, tmp_path / "d.parquet") == \
        ["row 1: column 'prompt': expected a string, got NoneType"]


def test_encoding_matches_inference_path(qwen3_model, mixed_data):
    from mmfuse.inputs import prepare
    from mmfuse.training.data import open_dataset
    from mmfuse.training.encode import IGNORE, RowEncoder

    enc = RowEncoder.from_model(qwen3_model)
    ds = open_dataset(mixed_data)
    for i in range(6):
        row = ds[i]
        ex = enc.encode(row, i)
        items = {n: row[f"mm_{n}"] for n in ("m1", "m2") if row[f"mm_{n}"]}
        prompt_ids = qwen3_model.encode(prepare(row["prompt"], items, qwen3_model.specs)).expanded_ids
        response_ids = qwen3_model.tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert ex.input_ids == prompt_ids + response_ids + [qwen3_model.tokenizer.eos_token_id]
        assert ex.labels == [IGNORE] * len(prompt_ids) + ex.input_ids[len(prompt_ids):]
    batch = enc.collate([enc.encode(ds[i], i) for i in range(4)])
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert (batch.labels[batch.attention_mask == 0] == IGNORE).all()
    # the fused forward accepts the collated items: placeholder count == projected rows
    with torch.no_grad():
        qwen3_model(batch.input_ids, batch.items, attention_mask=batch.attention_mask)


def cfg(ckpt, data, out, **kw) -> TrainConfig:
    return TrainConfig(**(dict(ckpt=str(ckpt), data=str(data), out=str(out)) | kw))


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(TrainConfigError, match="stage: expected 1 or 2"):
        cfg("c", "d", tmp_path, stage=3)
    with pytest.raises(TrainConfigError, match="full: training the whole LM is stage 2"):
        cfg("c", "d", tmp_path, full=True)
    with pytest.raises(TrainConfigError, match="max_steps: required with streaming"):
        cfg("c", "d", tmp_path, streaming=True, max_steps=None)
    with pytest.raises(TrainConfigError, match="schedule"):
        cfg("c", "d", tmp_path, schedule="step")
    assert cfg("c", "d", tmp_path, stage=2).lr == 2e-4 and cfg("c", "d", tmp_path).lr == 1e-3
