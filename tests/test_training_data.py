"""Training data layout: chat (messages) rows, the length rule, packing, and bad rows under 2 processes.

Modules: mmfuse.training.chat_rows, encode (length rule, packing), plan (every row checked first).
The checkpoint is conftest's tiny Qwen3 (hidden 128, 2 layers; the tiny ChatML template), fp32 on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfuse.training import DataError, TrainConfig, check_dataset, train, write_parquet
from mmfuse.training.encode import IGNORE, RowEncoder, pack

from test_data import make_rows  # tests/ is on sys.path under pytest

VEC = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)  # one m1 item of 2 vectors: 2 soft tokens


def chat(answer2: str = "blue") -> list[dict]:
    """Two user turns, two answers; an m1 item (wire format: nested lists) in the first user turn."""
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is "},
                                         {"type": "input_embedding", "modality": "m1", "embedding": VEC.tolist()}]},
            {"role": "assistant", "content": "red one"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": answer2}]


@pytest.fixture(scope="module")
def encoder(qwen3_ckpt):
    return RowEncoder.from_checkpoint(qwen3_ckpt)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- chat rows

def test_chat_labels_are_exactly_the_assistant_turns(encoder, qwen3_ckpt, tmp_path):
    tok, m1 = encoder.tokenizer, encoder.placeholder_ids["m1"]
    write_parquet([{"messages": chat()}], tmp_path / "c.parquet")  # stored as JSON text, the item as base64
    from mmfuse.training.data import open_dataset
    ex = encoder.encode(open_dataset(tmp_path / "c.parquet")[0], 0)
    # the hand-rendered ChatML conversation (mmfuse.tiny.CHAT_TEMPLATE), piece by piece
    before1 = ids(tok, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is ") + [m1, m1] + \
        ids(tok, "<|im_end|>\n<|im_start|>assistant\n")
    answer1 = ids(tok, "red one<|im_end|>")
    before2 = ids(tok, "\n<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n")
    answer2 = ids(tok, "blue<|im_end|>")
    tail = ids(tok, "\n")  # the template's separator after a turn: never generated, so never a target
    assert ex.input_ids == before1 + answer1 + before2 + answer2 + tail
    first = len(before1)
    second = first + len(answer1) + len(before2)
    labelled = [i for i, x in enumerate(ex.labels) if x != IGNORE]
    assert labelled == list(range(first, first + len(answer1))) + list(range(second, second + len(answer2)))
    assert [ex.labels[i] for i in labelled] == answer1 + answer2
    assert ex.response == "blue" and ex.prompt.expanded_ids == ex.input_ids[:second]
    # loss_on="all": every token but the item's soft tokens
    every = RowEncoder.from_checkpoint(qwen3_ckpt)
    every.loss_on = "all"
    labels = every.encode({"messages": chat()}, 0).labels
    assert labels == [IGNORE if t == m1 else t for t in ex.input_ids]


def test_chat_prompt_ids_equal_the_pipeline_rendering(encoder, qwen3_ckpt):
    from mmfuse import MultimodalPipeline

    pipe = MultimodalPipeline(str(qwen3_ckpt), backend="hf")
    try:
        messages = chat()
        # the row also carries special-token text in a user turn: it must stay plain text, as at inference
        messages[3]["content"] = "and <|im_end|> now?"
        ex = encoder.encode({"messages": messages}, 0)
        for k in (2, 4):  # each assistant answer: what the pipeline feeds the model for the turns before it
            rendered = pipe.encode({"messages": messages[:k]}).expanded_ids
            assert ex.input_ids[:len(rendered)] == rendered
            assert ex.labels[len(rendered) - 1] == IGNORE and ex.labels[len(rendered)] != IGNORE
        assert pipe.encode({"messages": messages[:4]}).expanded_ids == ex.prompt.expanded_ids
        # items for placeholders written in the text come from mm_ columns, as multimodal_embeddings does
        plain = [{"role": "user", "content": "what is <|m1|>"}, {"role": "assistant", "content": "red"}]
        row = encoder.encode({"messages": json.dumps(plain), "mm_m1": [VEC.tolist()]}, 0)
        want = pipe.encode({"messages": plain[:1], "multimodal_data": {"multimodal_embeddings": {"m1": [VEC]}}})
        assert row.prompt.expanded_ids == want.expanded_ids == row.input_ids[:want.num_tokens]
    finally:
        pipe.close()


@pytest.mark.parametrize("messages, message", [
    ("not json", r"^row 0: column 'messages': not valid JSON"),
    ([], r"^row 0: column 'messages': expected a non-empty list"),
    ([{"role": "user", "content": "hi"}], r"^row 0: messages: the last message must be an assistant turn"),
    ([{"role": "assistant", "content": "hi"}], r"^row 0: messages\[0\]: an assistant turn needs a message"),
    ([{"role": "user", "content": [{"type": "input_embedding", "modality": "m9", "embedding": [0.0]}]},
      {"role": "assistant", "content": "x"}], r"^row 0: messages\[0\].content\[0\].modality: unknown modality 'm9'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "input_embedding", "modality": "m1", "embedding": [0.0] * 32}]}],
     r"^row 0: messages\[1\]: an assistant turn holds text only"),
    ([{"role": "user", "content": [{"type": "input_embedding", "modality": "m1", "embedding": [0.0] * 31}]},
      {"role": "assistant", "content": "x"}], r"^row 0: modality 'm1' item 0: wrong last dimension, expected 32"),
    ([{"role": 3, "content": "hi"}, {"role": "assistant", "content": "x"}], r"^row 0: messages\[0\]: expected"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
      {"role": "assistant", "content": "x"}], r"^row 0: messages\[0\].content\[0\]: no modality of this "
                                              r"checkpoint has an encoder that takes images"),
])
def test_bad_messages_are_named(encoder, messages, message):
    value = messages if isinstance(messages, str) else json.dumps(messages)
    with pytest.raises(DataError, match=message):
        encoder.encode({"messages": value}, 0)


def test_chat_rows_train_and_check(qwen3_ckpt, tmp_path):
    rows = [{"messages": chat(word)} for word in ("blue", "green", "red", "one")] * 2
    write_parquet(rows, tmp_path / "chat.parquet")
    assert check_dataset(qwen3_ckpt, tmp_path / "chat.parquet") == []
    result = train(TrainConfig(ckpt=str(qwen3_ckpt), data=str(tmp_path / "chat.parquet"), out=str(tmp_path / "o"),
                               stage=1, batch_size=4, max_steps=2, shuffle=False))
    assert result.steps == 2 and np.isfinite(result.final_loss)
    enc = RowEncoder.from_checkpoint(qwen3_ckpt)
    targets = sum(sum(x != IGNORE for x in enc.encode(r, i).labels) for i, r in enumerate(rows[:4]))
    assert json.loads(result.metrics_path.read_text())["history"][0]["tokens"] == targets
    # eval reads chat rows too: the prompt before the last answer generates, the loss is the training loss
    from mmfuse.training import EvalConfig, evaluate
    metrics = evaluate(str(result.out), str(tmp_path / "chat.parquet"), EvalConfig(backend="hf"))
    assert metrics["n"] == 8 and 0 <= metrics["exact_match"] <= 1 and np.isfinite(metrics["eval_loss"])
    assert metrics["eval_tokens"] == 2 * targets


# ---------------------------------------------------------------- the length rule

def long_rows() -> list[dict]:
    """Row 1 is 31 tokens of response after an item: over a limit of 20; row 2 has its item late."""
    return [{"prompt": "describe <|m1|>", "response": "red", "items": {"m1": [VEC]}},
            {"prompt": "describe <|m1|>", "response": " ".join(["red green blue"] * 8), "items": {"m1": [VEC]}},
            {"prompt": "the quick brown fox jumps over the lazy dog " * 2 + "<|m1|>", "response": "red",
             "items": {"m1": [VEC]}},
            {"prompt": "describe <|m1|>", "response": "blue", "items": {"m1": [VEC]}}]


def test_max_length_refuse_drop_truncate(qwen3_ckpt, tmp_path):
    write_parquet(long_rows(), tmp_path / "long.parquet")
    from mmfuse.training.data import open_dataset
    from mmfuse.training.encode import OverLength
    from mmfuse.training.plan import plan_dataset

    ds = open_dataset(tmp_path / "long.parquet")
    lengths = [len(RowEncoder.from_checkpoint(qwen3_ckpt).encode(ds[i], i).input_ids) for i in range(4)]
    assert lengths[0] <= 20 and lengths[3] <= 20 and lengths[1] > 20 and lengths[2] > 20

    refuse = RowEncoder.from_checkpoint(qwen3_ckpt, max_length=20)
    with pytest.raises(DataError, match=r"^row 1: prompt \+ response too long: \d+ tokens .*over max_length 20 "):
        refuse.encode(ds[1], 1)
    with pytest.raises(DataError, match=r"^row 1: prompt \+ response too long.* \(2 bad rows in all: row 2: "):
        plan_dataset(refuse, ds)
    assert check_dataset(qwen3_ckpt, tmp_path / "long.parquet", max_length=20)[0].startswith("row 1: prompt +")

    drop = RowEncoder.from_checkpoint(qwen3_ckpt, max_length=20, overlength="drop")
    with pytest.raises(OverLength, match="^row 2: "):
        drop.encode(ds[2], 2)
    plan = plan_dataset(drop, ds)
    assert plan.rows == [0, 3] and plan.dropped == [1, 2] and plan.total == 4

    cut = RowEncoder.from_checkpoint(qwen3_ckpt, max_length=20, overlength="truncate")
    full = RowEncoder.from_checkpoint(qwen3_ckpt).encode(ds[1], 1)
    ex = cut.encode(ds[1], 1)  # the item ends early: the response's end is cut
    assert ex.input_ids == full.input_ids[:20] and ex.labels == full.labels[:20]
    # row 2's item reaches past token 20 (its soft tokens would be cut): refused, never cut inside an item
    with pytest.raises(DataError, match=r"^row 2: .*truncating would cut inside an item's soft tokens"):
        cut.encode(ds[2], 2)


def test_training_drops_over_long_rows_and_counts_them(qwen3_ckpt, tmp_path, capsys):
    rows = long_rows() * 3  # 12 rows, 6 over 20 tokens
    write_parquet(rows, tmp_path / "long.parquet")
    base = dict(ckpt=str(qwen3_ckpt), data=str(tmp_path / "long.parquet"), stage=1, batch_size=3, shuffle=False,
                max_length=20)
    with pytest.raises(DataError, match=r"^row 1: "):
        train(TrainConfig(out=str(tmp_path / "refused"), max_steps=1, **base))
    result = train(TrainConfig(out=str(tmp_path / "dropped"), epochs=1, overlength="drop", **base))
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["data"] == {"rows": 12, "kept": 6, "dropped": [1, 2, 5, 6, 9, 10]}
    assert result.steps == 2 and [r["rows"] for r in metrics["history"]] == [3, 3]
    assert "training on 6 of 12 rows (6 over the length limit dropped" in capsys.readouterr().err
    # a stream drops the same rows: the same two steps
    streamed = train(TrainConfig(out=str(tmp_path / "streamed"), max_steps=2, overlength="drop", streaming=True,
                                 **base))
    assert abs(streamed.final_loss - result.final_loss) < 1e-6
    assert json.loads(streamed.metrics_path.read_text())["data"]["dropped"] == [1, 2, 5, 6, 9, 10]


# ---------------------------------------------------------------- packing

def per_sample_losses(model, batch, spans) -> list[float]:
    """Summed next-token loss of each sample; ``spans``: (row, start, end) of each sample in the batch."""
    with torch.no_grad():
        logits = model(batch.input_ids, batch.items, **batch.lm_kwargs("cpu")).logits
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], ignore_index=IGNORE,
                            reduction="none")  # [B, S-1]: position t's loss predicting token t+1
    return [float(token[r, a:b - 1].sum()) for r, a, b in spans]


def test_packed_batch_gives_the_same_per_sample_loss(qwen3_model, tmp_path):
    from mmfuse.training.data import open_dataset

    write_parquet(make_rows(10, seed=3), tmp_path / "d.parquet")  # m1 and m2 items, 1-4 word responses
    ds = open_dataset(tmp_path / "d.parquet")
    enc = RowEncoder(qwen3_model.checkpoint, max_length=64)
    examples = [enc.encode(ds[i], i) for i in range(len(ds))]
    lengths = [len(e.input_ids) for e in examples]
    groups = pack(lengths, 64)
    assert len(groups) < len(examples) and max(len(g) for g in groups) >= 3  # really packed
    assert all(sum(lengths[i] for i in g) <= 64 for g in groups)
    padded = enc.collate(examples)
    packed = enc.collate(examples, packing=True)
    assert packed.input_ids.shape[0] == len(groups) and packed.num_targets == padded.num_targets
    assert packed.input_ids.numel() < padded.input_ids.numel()
    spans = {}
    for r, g in enumerate(groups):
        start = 0
        for i in g:
            spans[i] = (r, start, start + lengths[i])
            assert packed.position_ids[r, start:start + lengths[i]].tolist() == list(range(lengths[i]))
            start += lengths[i]
    unpacked = per_sample_losses(qwen3_model, padded, [(i, 0, n) for i, n in enumerate(lengths)])
    got = per_sample_losses(qwen3_model, packed, [spans[i] for i in range(len(examples))])
    np.testing.assert_allclose(got, unpacked, rtol=0, atol=1e-5)
    # without the isolation (one plain causal mask over the packed row) later samples see earlier ones
    leaky = dict(packed.__dict__)
    leaky["position_ids"] = None
    from mmfuse.training.encode import Batch
    leaked = per_sample_losses(qwen3_model, Batch(**leaky), [spans[i] for i in range(len(examples))])
    assert max(abs(a - b) for a, b in zip(leaked, unpacked)) > 1e-3


def test_packing_trains_the_same_steps_alone_and_on_two_processes(qwen3_ckpt, tmp_path):
    from safetensors.torch import load_file

    write_parquet(make_rows(16, seed=4), tmp_path / "d.parquet")
    kw = dict(ckpt=str(qwen3_ckpt), data=str(tmp_path / "d.parquet"), stage=2, lora_r=4, batch_size=8,
              max_steps=2, shuffle=True, max_length=96)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **kw))
    packed = train(TrainConfig(out=str(tmp_path / "packed"), packing=True, **kw))
    assert abs(plain.final_loss - packed.final_loss) < 1e-5
    # and packed on 2 gloo processes x batch 4 (each packs its own rows)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mmfuse.training", "train",
                           kw["ckpt"], kw["data"], "--stage", "2", "--lora-r", "4", "--batch-size", "4", "--max-steps",
                           "2", "--max-length", "96", "--packing", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(two["final_loss"] - plain.final_loss) < 1e-5
    a, b, c = (load_file(str(tmp_path / d / "mm_projectors.safetensors")) for d in ("plain", "packed", "two"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-5


# ---------------------------------------------------------------- bad rows under 2 processes

def test_a_bad_row_stops_every_process_with_its_index(qwen3_ckpt, tmp_path):
    """gloo, 2 processes x batch 2: the bad row (index 5, in rank 0's slice of step 2) is named by both
    ranks before step 1, and the job ends instead of hanging."""
    rows = [{"messages": chat(w)} for w in ("blue", "green", "red", "one", "two", "three", "four", "five")]
    rows[5]["messages"][1]["content"][1]["modality"] = "audio"  # a modality this checkpoint lacks
    write_parquet(rows, tmp_path / "bad.parquet")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs"),
                           "--redirects", "3", "-m", "mmfuse.training", "train", str(qwen3_ckpt),
                           str(tmp_path / "bad.parquet"), "--stage", "1", "--out", str(tmp_path / "o"),
                           "--batch-size", "2", "--max-steps", "2", "--no-shuffle"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    logs = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(logs) == 2, proc.stderr[-2000:]
    for log in logs:
        assert ("mmfuse train: error: row 5: messages[1].content[1].modality: unknown modality 'audio'"
                in log.read_text()), log.read_text()[-2000:]
        assert "stage 1:" not in log.read_text()  # no progress bar: stopped by the checks before step 1
    assert not (tmp_path / "o" / "config.json").exists()


def test_native_struct_messages_column(encoder, tmp_path):
    """A conversation stored as parquet structs (as `datasets` writes it): parts carry every field, null
    where unused; the encoding equals the JSON form's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmfuse.training.data import open_dataset

    part = {"type": None, "text": None, "modality": None, "embedding": None}
    messages = [{"role": "user", "content": [part | {"type": "text", "text": "what is "},
                                             part | {"type": "input_embedding", "modality": "m1",
                                                     "embedding": VEC.tolist()}]},
                {"role": "assistant", "content": [part | {"type": "text", "text": "red one"}]}]
    pq.write_table(pa.table({"messages": [messages]}), tmp_path / "s.parquet")
    row = open_dataset(tmp_path / "s.parquet")[0]
    assert isinstance(row["messages"], list)
    got = encoder.encode(row, 0)
    want = encoder.encode({"messages": json.dumps([
        {"role": "user", "content": [{"type": "text", "text": "what is "},
                                     {"type": "input_embedding", "modality": "m1", "embedding": VEC.tolist()}]},
        {"role": "assistant", "content": "red one"}])}, 0)
    assert got.input_ids == want.input_ids and got.labels == want.labels
    torch.testing.assert_close(got.prompt.items["m1"][0], torch.from_numpy(VEC))


def test_image_parts_become_items_as_the_server_routes_them(encoder_ckpt, tmp_path):
    """An image_url part (data URL) -> the named modality's raw item, preprocessed by its encoder's own
    processor; the ids equal the pipeline's rendering with that image as the item."""
    import base64
    import io

    from PIL import Image

    from mmfuse.chat import render_messages
    from mmfuse.checkpoint import open_checkpoint
    from mmfuse.inputs import RawItem, prepare

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "colour of "},
                                             {"type": "image_url", "image_url": {"url": url}, "modality": "image"}]},
                {"role": "assistant", "content": "red"}]
    write_parquet([{"messages": messages}], tmp_path / "img.parquet")
    assert check_dataset(encoder_ckpt, tmp_path / "img.parquet") == []
    enc = RowEncoder.from_checkpoint(encoder_ckpt)
    ex = enc.encode({"messages": json.dumps(messages)}, 0)
    assert [type(it) for it in ex.prompt.items["image"]] == [RawItem]
    ckpt = open_checkpoint(encoder_ckpt)
    as_item = [messages[0] | {"content": [messages[0]["content"][0], {"type": "input_embedding",
                                                                      "modality": "image", "embedding": image}]}]
    text, items = render_messages(as_item, ckpt.tokenizer, ckpt.specs)
    want = ckpt.encode(prepare(text, items, ckpt.specs))
    assert ex.prompt.expanded_ids == want.expanded_ids
    torch.testing.assert_close(ex.prompt.items["image"][0].features, want.items["image"][0].features)
    bad = json.loads(json.dumps(messages))
    bad[0]["content"][1]["image_url"]["url"] = "https://example.com/x.png"
    with pytest.raises(DataError, match=r"^row 0: messages\[0\].content\[1\].image_url.url: "):
        enc.encode({"messages": json.dumps(bad)}, 0)


def test_cli_flags_reach_the_config_and_data_check(qwen3_ckpt, tmp_path, capsys):
    import argparse

    from mmfuse.training.cli import (add_data_check_args, add_train_args, run_data_check,
                                     train_config_from_args)

    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["ckpt", "data", "--out", "o", "--stage", "1", "--max-length", "512", "--overlength",
                         "truncate", "--packing", "--loss-on", "all"])
    config = train_config_from_args(args)
    assert (config.max_length, config.overlength, config.packing, config.loss_on) == (512, "truncate", True, "all")
    assert train_config_from_args(p.parse_args(["c", "d", "--out", "o", "--stage", "1"])).overlength == "refuse"
    with pytest.raises(Exception, match="max_length: expected an integer >= 2"):
        TrainConfig(ckpt="c", data="d", out="o", max_length=0)

    write_parquet(long_rows(), tmp_path / "long.parquet")
    p = argparse.ArgumentParser()
    add_data_check_args(p)
    assert run_data_check(p.parse_args([str(qwen3_ckpt), str(tmp_path / "long.parquet")])) == 0
    assert run_data_check(p.parse_args([str(qwen3_ckpt), str(tmp_path / "long.parquet"), "--max-length", "20"])) == 1
    err = capsys.readouterr().err
    assert "row 1: prompt + response too long" in err and "row 2: prompt too long: 21 tokens" in err
    assert "mmfuse data check: 2 bad row(s)" in err
    # a limit over the model's own length is an option error
    with pytest.raises(Exception, match="max_length: 4096 is over the model's length 1024"):
        RowEncoder.from_checkpoint(qwen3_ckpt, max_length=4096)
