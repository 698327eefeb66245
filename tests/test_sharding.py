"""Sharded and replicated training (mmfuse.training.sharding): FSDP == DDP == one process with the global batch.

2 CPU processes (torchrun, gloo) x batch 3 against 1 process x batch 6, 3 shuffled steps over 15 rows: the
third step holds 3 rows, all on process 0, so process 1 runs the zero-weight filler; the mixed rows leave
m2 out of some processes' batches (its projector joins the backward with a zero gradient). Both 2-process
runs save their state at step 2: the files agree (one format for both strategies), and the DDP state
resumed under FSDP finishes the run as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.training import TrainConfig, train, write_parquet
from mmfuse.training.config import TrainConfigError

from test_data import make_rows  # tests/ is on sys.path under pytest

ROWS, PER_PROCESS, STEPS = 15, 3, 3  # 15 rows, global batch 6: steps of 6, 6 and 3 rows
EVAL_BATCH = 7  # eval rows 8 + 7 per process: 2 batches on process 0, 1 (and a filler under FSDP) on process 1


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uneven") / "rows.parquet"
    write_parquet(make_rows(ROWS), path)
    return path


def _two_processes(ckpt, data, out: Path, strategy: str, extra: list[str]) -> dict:
    extra = ["--save-every", "2", "--eval-data", str(data), "--eval-batch-size", str(EVAL_BATCH), *extra]
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(ckpt), str(data), "--out", str(out), "--stage", "2", "--max-steps", str(STEPS), "--batch-size",
            str(PER_PROCESS), "--schedule", "constant", "--lr", "1e-3", "--seed", "3", "--strategy", strategy, *extra]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mmfuse.training", "train",
                           *args], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def _state(out: Path) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The step-2 state: trained parameters and Adam's first moments, in parameter order."""
    state = out / "train_state" / "step_00000002"
    opt = torch.load(state / "optimizer.pt", weights_only=True)
    return load_file(str(state / "trainable.safetensors")), [opt["state"][i]["exp_avg"] for i in sorted(opt["state"])]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors")) | load_file(str(out / "mm_projectors.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _greedy(out: Path, rows: list[dict]) -> list[list[int]]:
    from mmfuse import MultimodalPipeline, SamplingConfig

    pipe = MultimodalPipeline(out, backend="hf")
    requests = [{"text": r["prompt"], "multimodal_data": {"multimodal_embeddings": r["items"]}} for r in rows]
    return [c[0].token_ids for c in pipe.generate_completions(requests, SamplingConfig(max_tokens=8))]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_equals_ddp_equals_one_process(qwen3_ckpt, uneven_data, tmp_path, kind):
    extra = ["--full"] if kind == "full" else ["--lora-r", "4"]
    # the full run also recomputes activations under FSDP: checkpointing changes no number either
    fsdp = _two_processes(qwen3_ckpt, uneven_data, tmp_path / "fsdp", "fsdp",
                          [*extra, "--gradient-checkpointing"] if kind == "full" else extra)
    ddp = _two_processes(qwen3_ckpt, uneven_data, tmp_path / "ddp", "ddp", extra)
    one = train(TrainConfig(ckpt=str(qwen3_ckpt), data=str(uneven_data), out=str(tmp_path / "one"), stage=2,
                            max_steps=STEPS, batch_size=2 * PER_PROCESS, schedule="constant", lr=1e-3, seed=3,
                            full=kind == "full", lora_r=4, eval_data=str(uneven_data), eval_batch_size=EVAL_BATCH))
    single = json.loads(one.metrics_path.read_text())
    assert fsdp["processes"] == ddp["processes"] == 2 and single["processes"] == 1
    assert (fsdp["strategy"], ddp["strategy"]) == ("fsdp", "ddp")
    assert [r["rows"] for r in fsdp["history"]] == [r["rows"] for r in single["history"]] == [6, 6, 3]
    for run in (fsdp, ddp):
        for a, b in zip(run["history"], single["history"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5 and a["tokens"] == b["tokens"]
    for run in (fsdp, ddp):  # the eval loss after training, over all 15 rows split across processes
        assert run["final_eval"]["n"] == ROWS
        assert abs(run["final_eval"]["eval_loss"] - single["final_eval"]["eval_loss"]) < 1e-5
    reference = _weights(tmp_path / "one")
    assert _max_diff(_weights(tmp_path / "ddp"), reference) < 1e-5
    assert _max_diff(_weights(tmp_path / "fsdp"), reference) < 1e-5
    assert _max_diff(_weights(tmp_path / "one"), _weights(qwen3_ckpt)) > 1e-4  # the runs did train something
    # the FSDP export is an ordinary checkpoint: it loads alone and generates the DDP export's tokens
    rows = make_rows(4, seed=7)
    assert _greedy(tmp_path / "fsdp", rows) == _greedy(tmp_path / "ddp", rows)
    # training state: FSDP gathers its shards into DDP's format, and a DDP state resumes under FSDP
    (fsdp_params, fsdp_moments), (ddp_params, ddp_moments) = _state(tmp_path / "fsdp"), _state(tmp_path / "ddp")
    assert _max_diff(fsdp_params, ddp_params) < 1e-5 and len(fsdp_moments) == len(ddp_moments) > 0
    for a, b in zip(fsdp_moments, ddp_moments):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    shutil.copytree(tmp_path / "ddp", tmp_path / "resumed")  # holds the state of step 2, and a finished export
    resumed = _two_processes(qwen3_ckpt, uneven_data, tmp_path / "resumed", "fsdp", [*extra, "--resume"])
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in ddp["history"]][:2] + \
        [resumed["history"][2]["loss"]] and abs(resumed["history"][2]["loss"] - single["history"][2]["loss"]) < 1e-5
    assert _max_diff(_weights(tmp_path / "resumed"), reference) < 1e-5


def test_accumulation_with_idle_micro_steps(qwen3_ckpt, uneven_data, tmp_path):
    """--grad-accum 2 x batch 3 x 2 processes == batch 12: step 2 has 3 rows, all in process 0's first
    micro-step, so process 1 runs two fillers and process 0 one, under DDP's no_sync and FSDP alike."""
    runs = {s: _two_processes(qwen3_ckpt, uneven_data, tmp_path / s, s, ["--lora-r", "4", "--grad-accum", "2"])
            for s in ("fsdp", "ddp")}
    one = train(TrainConfig(ckpt=str(qwen3_ckpt), data=str(uneven_data), out=str(tmp_path / "one"), stage=2,
                            max_steps=STEPS, batch_size=4 * PER_PROCESS, schedule="constant", lr=1e-3, seed=3,
                            lora_r=4))
    single = json.loads(one.metrics_path.read_text())["history"]
    assert [r["rows"] for r in single] == [12, 3, 12]
    for strategy, run in runs.items():
        assert [r["rows"] for r in run["history"]] == [12, 3, 12]
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(run["history"], single, strict=True)) < 1e-5
        assert _max_diff(_weights(tmp_path / strategy), _weights(one.out)) < 1e-5, strategy


def test_fsdp_refuses_what_it_cannot_do(qwen3_ckpt, uneven_data, tmp_path):
    base = dict(ckpt=str(qwen3_ckpt), data=str(uneven_data), out=str(tmp_path / "o"), stage=2, strategy="fsdp")
    with pytest.raises(TrainConfigError, match="eval_exact_match: not with strategy fsdp"):
        TrainConfig(**base, eval_data=str(uneven_data), eval_exact_match=True)
    with pytest.raises(TrainConfigError, match="strategy: expected one of"):
        TrainConfig(**(base | {"strategy": "deepspeed"}))


ACCELERATE_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
"""


def test_accelerate_launch_with_an_fsdp_config_file(qwen3_ckpt, uneven_data, tmp_path):
    """`accelerate launch --config_file fsdp.yaml` picks fsdp without --strategy. Such a launch also makes
    transformers load the LM on process 0 only (zeros elsewhere): the weights must come from process 0."""
    (tmp_path / "fsdp.yaml").write_text(ACCELERATE_FSDP_CONFIG)
    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(qwen3_ckpt), str(uneven_data), "--out", str(tmp_path / "acc"), "--stage", "2", "--lora-r", "4",
            "--max-steps", str(STEPS), "--batch-size", str(PER_PROCESS), "--schedule", "constant", "--lr", "1e-3",
            "--seed", "3"]
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(tmp_path / "fsdp.yaml"), "-m",
                           "mmfuse.training", "train", *args], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = train(TrainConfig(ckpt=str(qwen3_ckpt), data=str(uneven_data), out=str(tmp_path / "one"), stage=2,
                            max_steps=STEPS, batch_size=2 * PER_PROCESS, schedule="constant", lr=1e-3, seed=3,
                            lora_r=4))
    launched, single = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "acc", one.out))
    assert launched["processes"] == 2 and launched["config"]["strategy"] is None and launched["strategy"] == "fsdp"
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(launched["history"], single["history"], strict=True)) < 1e-5
    assert _max_diff(_weights(tmp_path / "acc"), _weights(one.out)) < 1e-5


def test_an_accelerate_fsdp_config_selects_fsdp(qwen3_ckpt, uneven_data, tmp_path, monkeypatch):
    """`accelerate launch --config_file fsdp.yaml` sets ACCELERATE_USE_FSDP; an explicit strategy wins."""
    base = dict(ckpt=str(qwen3_ckpt), data=str(uneven_data), out=str(tmp_path / "o"), stage=2)
    assert TrainConfig(**base).resolved_strategy() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert TrainConfig(**base).resolved_strategy() == "fsdp"
    assert TrainConfig(**base, strategy="ddp").resolved_strategy() == "ddp"
