"""Training: stage 1 / stage 2, data parallel, resume, export, eval (data format: test_data.py).

Every run is tiny (the conftest qwen3 checkpoint: hidden 128, 2 layers) and
fp32 on CPU, so weights can be compared to 1e-5 or bitwise.
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
from safetensors.torch import load_file

from mmfuse import SamplingConfig
from mmfuse.training import DataError, EvalConfig, TrainConfig, evaluate, train, write_parquet
from mmfuse.training.config import TrainConfigError

from test_data import WORDS, make_rows  # tests/ is on sys.path under pytest


def color_rows(n: int, seed: int) -> list[dict]:
    """A learnable task: the m1 vector is a noisy prototype of one of four colours, the response names it."""
    protos = np.random.default_rng(1234).normal(size=(4, 32))
    rng = np.random.default_rng(seed)
    return [{"prompt": "the colour of <|m1|> is", "response": WORDS[c],
             "items": {"m1": [protos[c] + 0.1 * rng.normal(size=32)]}}
            for c in rng.integers(0, 4, size=n)]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mixed.parquet"
    write_parquet(make_rows(24), path)
    return path


@pytest.fixture(scope="module")
def color_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("colors")
    write_parquet(color_rows(64, 0), d / "train.parquet")
    write_parquet(color_rows(16, 1), d / "eval.parquet")
    return d / "train.parquet", d / "eval.parquet"


def cfg(ckpt, data, out, **kw) -> TrainConfig:
    base = dict(ckpt=str(ckpt), data=str(data), out=str(out), stage=1, batch_size=4, max_steps=2,
                schedule="constant", shuffle=False)
    return TrainConfig(**(base | kw))


def projectors(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "mm_projectors.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def first_moments(out) -> list[torch.Tensor]:
    """Adam's exp_avg after step 1 = (1 - beta1) * gradient: compares gradients, which Adam's update hides."""
    state = sorted((Path(out) / "train_state").glob("step_*"))[-1]
    opt = torch.load(state / "optimizer.pt", weights_only=True)
    return [opt["state"][i]["exp_avg"] for i in sorted(opt["state"])]


# ---------------------------------------------------------------- training runs

def test_train_stops_at_a_bad_row_and_names_it(qwen3_ckpt, tmp_path, capsys):
    rows = make_rows(8)
    rows[5] = {"prompt": "x <|m1|>", "response": "y", "items": {"m1": [np.zeros((2, 33))]}}
    write_parquet(rows, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"^row 5: modality 'm1' item 0: wrong last dimension, expected 32, "
                                        r"got shape \(2, 33\)"):
        train(cfg(qwen3_ckpt, tmp_path / "bad.parquet", tmp_path / "out"))

    import argparse

    from mmfuse.training.cli import add_train_args, run_train
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args([str(qwen3_ckpt), str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "cli"),
                         "--stage", "1", "--max-steps", "2", "--no-shuffle"])
    assert run_train(args) == 1
    assert "mmfuse train: error: row 5: modality 'm1' item 0: wrong last dimension" in capsys.readouterr().err


def test_stage1_trains_projectors_only_and_exports_a_checkpoint(qwen3_ckpt, color_data, tmp_path):
    from mmfuse import load
    from mmfuse.checkpoint import INDEX_FILE

    out = tmp_path / "s1"
    result = train(cfg(qwen3_ckpt, color_data[0], out, max_steps=3, save_every=2))
    assert result.out == out and result.steps == 3
    assert max_diff(projectors(out), projectors(qwen3_ckpt)) > 1e-4  # projectors moved
    lm_before = load_file(str(qwen3_ckpt / "model.safetensors"))
    assert max_diff(load_file(str(out / "model.safetensors")), lm_before) == 0.0  # LM untouched
    # the index lists exactly the root weight files; training state stays out of the root
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in out.glob("*.safetensors")} == \
        {"model.safetensors", "mm_projectors.safetensors"}
    trained = load_file(str(out / "train_state" / "step_00000002" / "trainable.safetensors"))
    assert trained and all(k.startswith("mm_projectors.") for k in trained)  # the optimiser never saw the LM
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [1, 2, 3] and (out / "loss_curve.png").stat().st_size > 0
    model = load(out)  # the HF backend opens it with the trained projectors
    assert max_diff({k: v for k, v in model.mm_projectors.state_dict().items()},
                    {k.removeprefix("mm_projectors."): v for k, v in projectors(out).items()}) == 0.0


def test_loss_decreases_on_a_learnable_task(qwen3_ckpt, color_data, tmp_path):
    result = train(cfg(qwen3_ckpt, color_data[0], tmp_path / "o", stage=2, lora_r=8, max_steps=24, batch_size=8,
                       shuffle=True, lr=3e-3, eval_data=str(color_data[1]), eval_every=12))
    losses = [r["loss"] for r in json.loads(result.metrics_path.read_text())["history"]]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:2]), losses
    evals = json.loads(result.metrics_path.read_text())["evals"]
    assert [e["step"] for e in evals] == [12, 24] and evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_gradient_accumulation_equals_a_larger_batch(qwen3_ckpt, mixed_data, tmp_path):
    big = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "big", batch_size=8, max_steps=1, save_every=1))
    acc = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=1,
                    save_every=1))
    assert abs(big.final_loss - acc.final_loss) < 1e-5
    for a, b in zip(first_moments(big.out), first_moments(acc.out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert max_diff(projectors(big.out), projectors(acc.out)) < 1e-5


@pytest.mark.parametrize("kw", [dict(stage=2, lora_r=4), dict(stage=2, full=True)], ids=["lora", "full"])
def test_gradient_checkpointing_changes_no_number(qwen3_ckpt, mixed_data, tmp_path, kw):
    """Recomputing the decoder layers in backward gives the same loss and gradients (Adam's first moment)."""
    runs = [train(cfg(qwen3_ckpt, mixed_data, tmp_path / f"gc{int(on)}", batch_size=6, max_steps=2, save_every=1,
                      gradient_checkpointing=on, **kw)) for on in (False, True)]
    plain, checkpointed = (json.loads(r.metrics_path.read_text())["history"] for r in runs)
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(plain, checkpointed, strict=True))
    for a, b in zip(first_moments(runs[0].out), first_moments(runs[1].out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    weights = [load_file(str(r.out / "model.safetensors")) | projectors(r.out) for r in runs]
    assert max_diff(*weights) < 1e-5
    assert json.loads((runs[1].out / "config.json").read_text()).get("use_cache") is not False  # export unchanged


def test_two_processes_equal_one_process_with_double_batch(qwen3_ckpt, mixed_data, tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 4 == 1 process x batch 8: loss, gradients, weights."""
    args = [str(qwen3_ckpt), str(mixed_data), "--stage", "1", "--max-steps", "1", "--save-every", "1",
            "--schedule", "constant", "--no-shuffle"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mmfuse.training",
                           "train", *args, "--out", str(tmp_path / "two"), "--batch-size", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "one", batch_size=8, max_steps=1, save_every=1))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["history"][0]["rows"] == 8
    assert abs(two["final_loss"] - single.final_loss) < 1e-5
    for a, b in zip(first_moments(tmp_path / "two"), first_moments(single.out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert max_diff(projectors(tmp_path / "two"), projectors(single.out)) < 1e-5


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(qwen3_ckpt, mixed_data, tmp_path):
    """Stage 2 LoRA over 2+ epochs with shuffling: stop after step 5 (state at 4), resume, compare bitwise."""
    kw = dict(stage=2, lora_r=4, max_steps=8, batch_size=5, save_every=2, shuffle=True, schedule="cosine",
              warmup=2, lr=1e-3)
    full = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "full", **kw))

    def stop(step, record):
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg(qwen3_ckpt, mixed_data, tmp_path / "cut", **kw), on_step=stop)
    with pytest.raises(TrainConfigError, match="already holds training state"):
        train(cfg(qwen3_ckpt, mixed_data, tmp_path / "cut", **kw))
    with pytest.raises(TrainConfigError, match="batch_size: saved 5, now 4"):
        train(cfg(qwen3_ckpt, mixed_data, tmp_path / "cut", **(kw | {"batch_size": 4, "resume": True})))
    for saved in (tmp_path / "cut").rglob("progress.json"):  # as an mmfuse without the data layout options saved it
        state = json.loads(saved.read_text())
        for key in ("max_length", "overlength", "loss_on", "packing"):
            state["config"].pop(key)
        saved.write_text(json.dumps(state))
    resumed = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "cut", **kw, resume=True))
    a, b = (json.loads(r.metrics_path.read_text())["history"] for r in (full, resumed))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["epoch"] for r in b][-1] == 1
    assert max_diff(projectors(full.out), projectors(resumed.out)) == 0.0
    assert max_diff(load_file(str(full.out / "model.safetensors")),
                    load_file(str(resumed.out / "model.safetensors"))) == 0.0


def test_lora_export_merges_into_a_plain_checkpoint(qwen3_ckpt, mixed_data, tmp_path):
    """The exported (merged) LM gives the in-training (adapter) model's logits."""
    from mmfuse import load
    from mmfuse.training.encode import RowEncoder
    from mmfuse.training.data import open_dataset
    from mmfuse.training.stages import export_checkpoint, setup_trainable

    config = cfg(qwen3_ckpt, mixed_data, tmp_path / "lora", stage=2, lora_r=4)
    torch.manual_seed(0)
    model = load(qwen3_ckpt)
    params, peft_model = setup_trainable(model, config)
    assert any("lora_B" in n for n, _ in params) and not any("embed_tokens" in n for n, _ in params)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters something to merge
        for n, p in params:
            if "lora_B" in n:
                p.normal_(0, 0.05)
    enc = RowEncoder.from_model(model)
    ds = open_dataset(mixed_data)
    batch = enc.collate([enc.encode(ds[i], i) for i in range(6)])
    with torch.no_grad():
        base = load(qwen3_ckpt)(batch.input_ids, batch.items, attention_mask=batch.attention_mask).logits
        adapted = model(batch.input_ids, batch.items, attention_mask=batch.attention_mask).logits
        out = export_checkpoint(model, peft_model, config, qwen3_ckpt, tmp_path / "lora")
        merged = load(out)(batch.input_ids, batch.items, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    assert (adapted - base)[mask].abs().max() > 1e-2  # the adapters matter...
    torch.testing.assert_close(merged[mask], adapted[mask], rtol=1e-4, atol=1e-4)  # ...and survive the merge
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))


def test_stage2_full_updates_the_lm(qwen3_ckpt, mixed_data, tmp_path):
    result = train(cfg(qwen3_ckpt, mixed_data, tmp_path / "full", stage=2, full=True, max_steps=1, lr=1e-3))
    after, before = load_file(str(result.out / "model.safetensors")), load_file(str(qwen3_ckpt / "model.safetensors"))
    assert max_diff(after, before) > 1e-4


def test_eval_prints_one_json_line_with_metrics(qwen3_ckpt, color_data, tmp_path, capsys):
    import argparse

    from mmfuse.training.cli import add_eval_args, run_eval

    p = argparse.ArgumentParser()
    add_eval_args(p)
    assert run_eval(p.parse_args([str(qwen3_ckpt), str(color_data[1]), "--backend", "hf", "--limit", "6"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["n"] == 6 and metrics["backend"] == "hf" and 0 <= metrics["exact_match"] <= 1
    assert metrics["eval_loss"] > 0
    # the same numbers through the library call
    again = evaluate(qwen3_ckpt, color_data[1], EvalConfig(backend="hf", limit=6))
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_streaming_directory_matches_memory_mapped(qwen3_ckpt, tmp_path):
    write_parquet(make_rows(20), tmp_path / "parts", rows_per_file=7)  # 3 files, read in name order
    mapped = train(cfg(qwen3_ckpt, tmp_path / "parts", tmp_path / "map", max_steps=6))  # crosses an epoch
    streamed = train(cfg(qwen3_ckpt, tmp_path / "parts", tmp_path / "stream", max_steps=6, streaming=True))
    a, b = (json.loads(r.metrics_path.read_text())["history"] for r in (mapped, streamed))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["rows"] for r in b] == [4, 4, 4, 4, 4, 4]
    assert max_diff(projectors(mapped.out), projectors(streamed.out)) == 0.0
    rows = make_rows(10)
    rows[9]["items"] = {"m1": [np.zeros(8)]}
    write_parquet(rows, tmp_path / "bad", rows_per_file=4)
    with pytest.raises(DataError, match=r"^row 9: "):
        train(cfg(qwen3_ckpt, tmp_path / "bad", tmp_path / "bad_out", max_steps=3, streaming=True))


# ---------------------------------------------------------------- stage 2 vs stage 1

COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "one"]


def routed_rows(n: int, seed: int) -> list[dict]:
    """Each vector encodes a colour and a shape; the *text* asks for one of them.

    The projector sees only the vector, so picking the asked attribute is the LM's
    job: a frozen LM (stage 1) is weak here, LoRA (stage 2) is not.
    """
    protos = np.random.default_rng(99).normal(size=(2, 4, 16))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        c, s, ask_shape = rng.integers(0, 4), rng.integers(0, 4), rng.integers(0, 2)
        v = np.concatenate([protos[0, c], protos[1, s]]) + 0.1 * rng.normal(size=32)
        rows.append({"prompt": f"the {'shape' if ask_shape else 'colour'} of <|m1|> is",
                     "response": SHAPES[s] if ask_shape else COLOURS[c], "items": {"m1": [v]}})
    return rows


@pytest.fixture(scope="module")
def stoppable_ckpt(tmp_path_factory):
    """A tiny checkpoint whose EOS embedding row is not zero.

    make_base's models use EOS as pad token, and transformers zeroes the pad row of
    the (tied) embedding, so their EOS logit is always 0: no LoRA or projector can
    teach them to stop. Exact match needs stopping.
    """
    from transformers import AutoModelForCausalLM

    from mmfuse import ModalitySpec, init_checkpoint
    from mmfuse.tiny import make_base

    base = make_base(tmp_path_factory.mktemp("stoppable_base"), family="qwen3", seed=0)
    lm = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    with torch.no_grad():
        lm.get_input_embeddings().weight[lm.config.eos_token_id].normal_(0, 0.1)
    lm.save_pretrained(base)
    return init_checkpoint(base, tmp_path_factory.mktemp("stoppable"), [ModalitySpec(name="m1", input_dim=32)])


def test_stage2_lora_beats_stage1_when_the_lm_must_change(stoppable_ckpt, tmp_path):
    write_parquet(routed_rows(512, 0), tmp_path / "train.parquet")
    write_parquet(routed_rows(64, 1), tmp_path / "eval.parquet")
    scores = {}
    for name, kw in {"stage1": dict(stage=1), "lora": dict(stage=2, lora_r=8)}.items():
        result = train(cfg(stoppable_ckpt, tmp_path / "train.parquet", tmp_path / name, max_steps=60, batch_size=16,
                           lr=3e-3, warmup=0.1, schedule="cosine", shuffle=True, **kw))
        scores[name] = evaluate(result.out, tmp_path / "eval.parquet", EvalConfig(backend="hf"))
    assert scores["lora"]["exact_match"] >= 0.9, scores
    assert scores["stage1"]["exact_match"] <= 0.5, scores
    assert scores["lora"]["eval_loss"] < 0.2 * scores["stage1"]["eval_loss"], scores


# ---------------------------------------------------------------- output directory: refuse, resume, overwrite

def _digest(root: Path) -> dict[str, str]:
    import hashlib
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _train_cli(args: list[str]) -> int:
    import argparse

    from mmfuse.training.cli import add_train_args, run_train
    p = argparse.ArgumentParser()
    add_train_args(p)
    return run_train(p.parse_args(args))


def test_train_refuses_a_non_empty_out_unless_overwrite(qwen3_ckpt, mixed_data, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(qwen3_ckpt, out)  # an earlier run's checkpoint, metrics and training state
    (out / "metrics.json").write_text('{"history": [{"step": 9}]}')
    (out / "train_state" / "step_00000009").mkdir(parents=True)
    (out / "train_state" / "step_00000009" / "progress.json").write_text("{}")
    before = _digest(out)
    common = [str(qwen3_ckpt), str(mixed_data), "--out", str(out), "--stage", "1", "--max-steps", "1",
              "--batch-size", "4", "--no-shuffle"]
    assert _train_cli(common) == 2
    err = capsys.readouterr().err
    assert f"mmfuse train: error: out: output directory {out} is not empty" in err
    assert "--overwrite" in err and "already holds training state" in err and "--resume" in err
    assert _digest(out) == before
    with pytest.raises(TrainConfigError, match="is not empty"):
        train(cfg(qwen3_ckpt, mixed_data, out))
    assert _digest(out) == before
    assert _train_cli(common + ["--overwrite", "--resume"]) == 2
    assert "cannot be combined with resume" in capsys.readouterr().err
    (out / "data.parquet").write_bytes(b"user data")  # never deleted, even with --overwrite
    before = _digest(out)
    assert _train_cli(common + ["--overwrite"]) == 2
    assert "holds entries mmfuse does not write (data.parquet)" in capsys.readouterr().err
    assert _digest(out) == before

    (out / "data.parquet").unlink()
    assert _train_cli(common + ["--overwrite", "--save-every", "1"]) == 0
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1]
    assert [p.name for p in (out / "train_state").iterdir()] == ["step_00000001"]  # the old state is gone
    # --resume into the run dir is not refused: with the same settings it finds the run complete and re-exports
    assert _train_cli(common + ["--save-every", "1", "--resume"]) == 0
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1]


def test_stage2_save_adapter_over_the_input_equals_the_merged_export(qwen3_ckpt, color_data, tmp_path):
    """--save-adapter --freeze-projectors: OUT/adapter (peft, unmerged) served over the input checkpoint gives
    the merged export's greedy tokens; the projectors are the input's, byte for byte."""
    from mmfuse.backends.hf import HFBackend
    from mmfuse.inputs import prepare

    out = tmp_path / "ft"
    assert _train_cli([str(qwen3_ckpt), str(color_data[0]), "--out", str(out), "--stage", "2", "--lora-r", "8",
                       "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4", "--schedule", "constant",
                       "--no-shuffle", "--freeze-projectors", "--save-adapter"]) == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert max_diff(projectors(out), projectors(qwen3_ckpt)) == 0
    merged, served, bare = HFBackend(out), HFBackend(qwen3_ckpt, lora={"ft": out / "adapter"}), HFBackend(qwen3_ckpt)
    greedy = SamplingConfig(max_tokens=6)
    rows = color_rows(8, 2)
    prompts = [prepare(r["prompt"], r["items"], merged.specs) for r in rows]
    ref = [c[0].token_ids for c in merged.generate([merged.encode(p) for p in prompts], greedy)]
    got = [c[0].token_ids for c in served.generate([served.encode(p, "ft") for p in prompts], greedy)]
    before = [c[0].token_ids for c in bare.generate([bare.encode(p) for p in prompts], greedy)]
    assert got == ref and ref != before


@pytest.mark.parametrize("kw, message", [
    (dict(stage=2, save_adapter=True), "add --freeze-projectors"),
    (dict(stage=2, full=True, freeze_projectors=True, save_adapter=True), "only stage 2 LoRA training"),
    (dict(stage=1, freeze_projectors=True), "freeze_projectors: stage 2 only"),
])
def test_save_adapter_options_are_checked(qwen3_ckpt, mixed_data, tmp_path, kw, message):
    with pytest.raises(TrainConfigError, match=message):
        cfg(qwen3_ckpt, mixed_data, tmp_path / "o", **kw)


@pytest.mark.vllm
def test_cli_train_leaves_the_process_group_of_a_vllm_engine_alone(qwen3_vllm_pipeline, qwen3_ckpt, color_data,
                                                                   tmp_path):
    """`mmfuse train` run in a process whose vLLM engine made torch.distributed's group closes only a group it
    made itself: the engine still generates, and can shut down, afterwards."""
    import argparse

    import torch.distributed as dist

    from mmfuse.training.cli import add_train_args, run_train
    assert dist.is_initialized()  # the session's in-process vLLM engine core made it
    before = qwen3_vllm_pipeline.generate({"text": "the quick brown fox"}, max_tokens=4)
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args([str(qwen3_ckpt), str(color_data[0]), "--out", str(tmp_path / "out"), "--stage", "1",
                         "--max-steps", "1"])
    assert run_train(args) == 0
    assert dist.is_initialized()
    assert qwen3_vllm_pipeline.generate({"text": "the quick brown fox"}, max_tokens=4) == before
