"""Rebuild the shipped demo: data split, tiny base LM, stage 1, stage 2 -> demo/ckpt + demo/heldout.parquet.

    .venv/bin/python scripts/build_demo.py            # writes demo/ (about 3 minutes on 2 CPU cores)
    .venv/bin/python scripts/build_demo.py --out /tmp/demo2

Steps (all seeded; deterministic algorithms, 1 thread: two builds give byte-identical files):
1. split the grammar's attribute combinations (``mmfuse.demo``): 240 held out, the
   ``DEMO_COMBOS`` reserved for ``make demo``, the rest for training;
2. encode every sentence with MiniLM (``sent`` 1 x 384, ``tok`` n x 384) and write
   ``train.parquet`` (work dir) and ``heldout.parquet`` (shipped);
3. train a BPE tokenizer and a tiny Qwen3 LM from scratch on the *training*
   sentences only, as a plain LM (``scripts/demo_pretrain.py``);
4. ``mmfuse.init_checkpoint`` with the two modalities, each declaring MiniLM as its
   ``sentence_transformers`` encoder (``mmfuse.demo.ENCODER``: raw sentences go in too);
5. stage 1 (projectors only, LM frozen) and stage 2 (projectors + LoRA) with
   ``mmfuse.training.train``, each evaluated on the held-out split;
6. copy the stage-2 checkpoint's files (no training state) to ``OUT/ckpt`` and
   write ``OUT/build_report.json`` with the settings, metrics and timings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, should a GPU be present

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_pretrain import PretrainConfig, pretrain  # noqa: E402

from mmfuse import ModalitySpec, init_checkpoint  # noqa: E402
from mmfuse import demo as task  # noqa: E402
from mmfuse.checkpoint import read_config, write_config  # noqa: E402
from mmfuse.training import TrainConfig, train, write_parquet  # noqa: E402

# files of a trained checkpoint that ship; training state, metrics and plots stay in the work dir
CKPT_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt")
CKPT_SKIP = ("metrics.json",)


@dataclass
class BuildConfig:
    """Every knob of the build, recorded in build_report.json."""

    seed: int = 0
    heldout: int = 240  # 20% of the grammar's 1200 combinations
    tokenizer_vocab: int = 384  # byte alphabet (256) + specials + merges for the task's ~35 words
    threads: int = 1  # fixed for reproducible float sums; 1 also avoids oversubscribing a shared 2-core box
    hidden: int = 128  # head_dim = hidden / heads = 64: vLLM's CPU attention needs >= 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 256
    pretrain_steps: int = 200
    max_len: int = 128  # longest prompt + response is ~30 tokens
    projector: str = "mlp2x_gelu"
    tok_projector: str | None = None  # the `tok` modality's kind when it differs (e.g. resampler)
    tok_tokens: int = 1  # tokens_per_item of `tok`: for a resampler, soft tokens per item whatever its n
    stage1_epochs: int = 10
    stage1_lr: float = 2e-3
    stage2_epochs: int = 30  # held-out exact match is 1.0 by epoch 10; the rest widens the greedy margins
    stage2_lr: float = 5e-3  # LoRA on a 0.3M-parameter LM from scratch tolerates (and needs) a high rate
    lora_r: int = 16
    batch_size: int = 32


def write_split(sentences: list[str], path: Path, encoder) -> None:
    items = task.encode(sentences, encoder)
    write_parquet([{"prompt": task.PROMPT, "response": s, "items": x} for s, x in zip(sentences, items)], path)


def make_base_lm(train_sentences: list[str], out: Path, config: BuildConfig) -> Path:
    """Tokenizer trained on the training text, then a tiny Qwen3 pretrained on it as a plain LM."""
    from mmfuse.tiny import make_base, make_tokenizer

    # the prompt's words occur once per example, as in the data
    corpus = "\n".join(train_sentences + [task.PROMPT.split(" ")[0]] * len(train_sentences))
    make_tokenizer(out / "tokenizer", vocab_size=config.tokenizer_vocab, corpus=corpus)
    make_base(out / "base", family="qwen3", hidden=config.hidden, layers=config.layers, heads=config.heads,
              kv_heads=config.kv_heads, intermediate=config.intermediate, max_len=config.max_len,
              seed=config.seed, init_std=0.02, tokenizer_dir=out / "tokenizer")
    return pretrain(out / "base", train_sentences, PretrainConfig(steps=config.pretrain_steps, seed=config.seed))


def stage(n: int, ckpt: Path, out: Path, data: Path, heldout: Path, config: BuildConfig) -> dict:
    epochs, lr = (config.stage1_epochs, config.stage1_lr) if n == 1 else (config.stage2_epochs, config.stage2_lr)
    started = time.time()
    result = train(TrainConfig(ckpt=str(ckpt), data=str(data), out=str(out), stage=n, lora_r=config.lora_r,
                               epochs=epochs, batch_size=config.batch_size, lr=lr, warmup=0.05,
                               eval_data=str(heldout), eval_exact_match=True, eval_max_tokens=24,
                               eval_batch_size=64, seed=config.seed, log_every=10,
                               overwrite=True))  # a reused --work dir holds the previous build
    record = {"stage": n, "seconds": round(time.time() - started, 1), "steps": result.steps,
              "final_loss": result.final_loss, **{f"heldout_{k}": v for k, v in result.eval.items()}}
    print(f"stage {n}: {json.dumps(record)}", flush=True)
    return record


def ship(trained: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in sorted(trained.iterdir()):
        if f.is_file() and f.suffix in CKPT_SUFFIXES and f.name not in CKPT_SKIP:
            shutil.copy2(f, dest / f.name)
    # transformers records the (temporary) directory the LM came from; it is no part of the model
    config = read_config(dest)
    config.pop("_name_or_path", None)
    write_config(dest, config)


def build(out: Path, work: Path, config: BuildConfig) -> dict:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    timings: dict[str, float] = {}
    t = started = time.time()
    train_sentences, heldout_sentences = task.split(config.seed, config.heldout)
    encoder = task.load_encoder()
    out.mkdir(parents=True, exist_ok=True)
    write_split(train_sentences, work / "train.parquet", encoder)
    write_split(heldout_sentences, out / "heldout.parquet", encoder)
    del encoder
    timings["encode"] = round(time.time() - t, 1)

    t = time.time()
    base = make_base_lm(train_sentences, work, config)
    timings["pretrain"] = round(time.time() - t, 1)
    specs = [ModalitySpec(name="sent", input_dim=task.EMBED_DIM, projector=config.projector,
                          encoder=task.ENCODER["sent"]),
             ModalitySpec(name="tok", input_dim=task.EMBED_DIM, projector=config.tok_projector or config.projector,
                          tokens_per_item=config.tok_tokens, max_items=4, encoder=task.ENCODER["tok"])]
    init = init_checkpoint(base, work / "init", specs, seed=config.seed, overwrite=True)
    s1 = stage(1, init, work / "stage1", work / "train.parquet", out / "heldout.parquet", config)
    s2 = stage(2, work / "stage1", work / "stage2", work / "train.parquet", out / "heldout.parquet", config)
    ship(work / "stage2", out / "ckpt")
    timings["total"] = round(time.time() - started, 1)
    report = {"config": asdict(config), "train_rows": len(train_sentences), "heldout_rows": len(heldout_sentences),
              "timings_s": timings, "stage1": s1, "stage2": s2, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    with open(out / "build_report.json", "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(task.DEMO_DIR), help="where ckpt/, heldout.parquet and "
                        "build_report.json go (default: the repo's demo/)")
    parser.add_argument("--work", default=None, help="keep intermediate files here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tok-projector", default=None, help="projector kind of the `tok` modality "
                        "(default: the same as `sent`, mlp2x_gelu), e.g. resampler (docs/projectors.md)")
    parser.add_argument("--tok-tokens", type=int, default=1, help="tokens_per_item of `tok` (a resampler's K)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a BuildConfig field, e.g. --set stage1_epochs=30 (recorded in the report)")
    args = parser.parse_args()
    config = BuildConfig(seed=args.seed, tok_projector=args.tok_projector, tok_tokens=args.tok_tokens)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in BuildConfig.__dataclass_fields__ or not value:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(BuildConfig.__dataclass_fields__)}")
        setattr(config, name, type(getattr(config, name))(value))
    started = time.time()
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        report = build(Path(args.out), Path(args.work), config)
    else:
        with tempfile.TemporaryDirectory(prefix="mmfuse-demo-") as work:
            report = build(Path(args.out), Path(work), config)
    total = time.time() - started
    print(f"built {args.out} in {total:.0f} s: held-out exact match stage 1 "
          f"{report['stage1']['heldout_exact_match']:.3f}, stage 2 {report['stage2']['heldout_exact_match']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
