"""argparse glue for ``mmfuse train``, ``mmfuse data check``, ``mmfuse data encode`` and ``mmfuse eval``.

Each ``add_*_args(parser)`` fills a subcommand's parser; each ``run_*(args)``
builds the typed config, runs the library function and returns an exit code
(0 ok, 1 bad data / failed check, 2 bad option or checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from .config import EvalConfig, TrainConfig, TrainConfigError


class _Status:
    code = 0


@contextlib.contextmanager
def _handled(command: str):
    """User mistakes become one line on stderr and an exit code; anything else is a bug and propagates."""
    status = _Status()
    try:
        yield status
    except Exception as e:
        from ..config import ConfigError
        from ..inputs import InputError
        from .encode import DataError
        if isinstance(e, DataError):
            status.code = 1
        elif isinstance(e, (TrainConfigError, ConfigError, InputError)):
            status.code = 2
        else:
            raise
        print(f"mmfuse {command}: error: {e}", file=sys.stderr)


def _formatted(p: argparse.ArgumentParser, epilog_key: str) -> None:
    """The ``mmfuse`` help layout (defaults shown, example epilog), also under ``python -m mmfuse.training``."""
    from ..cli import EPILOGS, HelpFormatter
    p.formatter_class = HelpFormatter
    if p.epilog is None:
        p.epilog = EPILOGS.get(epilog_key)


def add_train_args(p: argparse.ArgumentParser) -> None:
    _formatted(p, "train")
    p.add_argument("ckpt", help="mmfuse checkpoint directory or hub id (from `mmfuse init` or an earlier run)")
    p.add_argument("data", help="parquet file or directory of *.parquet (columns prompt, response, mm_NAME)")
    p.add_argument("--out", required=True,
                   help="output checkpoint directory: missing or empty, unless --resume or --overwrite")
    p.add_argument("--stage", type=int, choices=[1, 2], required=True,
                   help="1: projectors only; 2: projectors + LoRA (or the full LM with --full)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --out: its earlier checkpoint, metrics and train_state/ are "
                        "removed first (default: refuse)")
    p.add_argument("--train-modalities", type=lambda v: [n.strip() for n in v.split(",") if n.strip()],
                   default=None, metavar="NAME[,NAME...]",
                   help="train only these modalities' projectors, the others frozen (e.g. after `mmfuse "
                        "add-modality`; default: every projector)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora-r", type=int, default=16, help="LoRA rank for stage 2")
    kind.add_argument("--full", action="store_true", help="stage 2: train every LM weight (default: LoRA)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--freeze-projectors", action="store_true",
                   help="stage 2: train the LM (LoRA or --full) alone, every projector as it is in CKPT")
    p.add_argument("--save-adapter", action="store_true",
                   help="stage 2 LoRA: also write the LoRA unmerged to OUT/adapter (peft format), to serve over "
                        "CKPT with `mmfuse serve CKPT --lora NAME=OUT/adapter`; needs --freeze-projectors")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout probability")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (ignored with --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps in total (default: from --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: 1e-3 stage 1, 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this; 0 disables")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up: a fraction of the steps if < 1, else steps")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="lr schedule after warm-up")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast, fp32 master weights (CPUs without avx512_bf16 run it slowly)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                   help="with several processes: ddp (each holds the model) or fsdp (each holds 1/P of the LM, "
                        "weights, gradients and optimiser state; for full or LoRA stage 2 of a large LM) "
                        "(default: fsdp under `accelerate launch` with an FSDP config file, else ddp)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward: less memory, more compute")
    p.add_argument("--save-every", type=int, default=0,
                   help="save training state (for --resume) every N steps; 0: never")
    p.add_argument("--keep-states", type=int, default=1, help="training states kept on disk (the newest)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest state in OUT/train_state (default: a new run)")
    p.add_argument("--eval-data", default=None, help="held-out parquet data for eval loss (default: no eval)")
    p.add_argument("--eval-every", type=int, default=0, help="eval every N steps; 0: only at the end")
    p.add_argument("--eval-exact-match", action="store_true",
                   help="also greedy exact match on the eval data (default: eval loss only)")
    p.add_argument("--eval-max-tokens", type=int, default=None,
                   help="exact-match generation limit (default: longest eval response + 1)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="eval batch size (default: --batch-size)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the parquet data instead of memory-mapping it (needs --max-steps)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the data order (default: reshuffle every epoch)")
    _add_layout_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and LoRA initialisation")
    p.add_argument("--log-every", type=int, default=1, help="record metrics every N steps")


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    """How rows become token sequences (mmfuse.training.encode): length limit, over-long rows, packing."""
    p.add_argument("--max-length", type=int, default=None,
                   help="most tokens in one row, items counted as their soft tokens (default: the LM's length)")
    p.add_argument("--overlength", choices=["refuse", "drop", "truncate"], default="refuse",
                   help="a row over --max-length: refuse (stop, naming the row), drop (skip it, counted), or "
                        "truncate (cut its end; refused if the cut would fall inside an item or leave no target)")
    p.add_argument("--packing", action="store_true",
                   help="pack each micro-batch's rows into rows of up to --max-length tokens, attention kept "
                        "within each sample (same loss, less padding)")
    p.add_argument("--loss-on", choices=["assistant", "all"], default="assistant",
                   help="messages (chat) rows: loss on the assistant turns only, or on every token")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    # a process group that was there before (a vLLM engine in this process made one) is not ours to close
    had_group = dist.is_available() and dist.is_initialized()
    try:
        with _handled("train") as status:
            from .trainer import train
            result = train(train_config_from_args(args))
            if result.main_process:
                print(f"wrote {result.out} ({result.steps} steps, final loss {result.final_loss:.4f})"
                      if result.final_loss is not None else f"wrote {result.out}")
    finally:
        # a launched process ends with this command: close its process group (no-op when there is none);
        # left open, gloo's threads aborted one process at interpreter exit under `accelerate launch`
        if not had_group:
            from accelerate import PartialState
            PartialState().destroy_process_group()
    return status.code


def add_data_check_args(p: argparse.ArgumentParser) -> None:
    _formatted(p, "data check")
    p.add_argument("ckpt", help="mmfuse checkpoint the data is for (tokenizer + config are read)")
    p.add_argument("data", help="parquet file or directory of *.parquet")
    p.add_argument("--max-errors", type=int, default=10, help="stop after this many bad rows")
    p.add_argument("--max-length", type=int, default=None,
                   help="also refuse rows over this many tokens (default: the LM's length)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the parquet data instead of memory-mapping it (default: memory-map)")


def run_data_check(args: argparse.Namespace) -> int:
    with _handled("data check") as status:
        from .data import check_dataset
        errors = check_dataset(args.ckpt, args.data, max_errors=args.max_errors, streaming=args.streaming,
                               max_length=args.max_length)
        for e in errors:
            print(e, file=sys.stderr)
        if errors:
            more = " (stopped at --max-errors)" if len(errors) >= args.max_errors else ""
            print(f"mmfuse data check: {len(errors)} bad row(s){more}", file=sys.stderr)
            return 1
        print(f"ok: every row of {args.data} is valid for {args.ckpt}")
    return status.code


def add_data_encode_args(p: argparse.ArgumentParser) -> None:
    _formatted(p, "data encode")
    p.add_argument("ckpt", help="mmfuse checkpoint whose encoders make the vectors")
    p.add_argument("data", help="parquet file or directory of *.parquet with raw media in mm_NAME")
    p.add_argument("out", help="output directory of parquet shards: missing or empty, or this same job's "
                               "(then its complete shards are kept and the rest encoded)")
    p.add_argument("--batch-size", type=int, default=32, help="rows whose raw items go through an encoder at once")
    p.add_argument("--rows-per-shard", type=int, default=1000,
                   help="rows per output file (the unit of resuming)")
    p.add_argument("--device", default=None, help="where the encoders run (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty OUT: the shards and manifest there are removed first "
                        "(default: refuse, unless OUT holds this same job)")


def run_data_encode(args: argparse.Namespace) -> int:
    with _handled("data encode") as status:
        from .precompute import encode_dataset
        result = encode_dataset(args.ckpt, args.data, args.out, batch_size=args.batch_size,
                                rows_per_shard=args.rows_per_shard, overwrite=args.overwrite, device=args.device)
        kept = f", {result.skipped} kept from an earlier run" if result.skipped else ""
        print(f"wrote {result.out} ({result.rows} rows in {result.shards} shard(s): {result.written} encoded{kept})")
    return status.code


def add_eval_args(p: argparse.ArgumentParser) -> None:
    _formatted(p, "eval")
    p.add_argument("ckpt", help="mmfuse checkpoint directory or hub id")
    p.add_argument("data", help="parquet file or directory of *.parquet")
    p.add_argument("--backend", choices=["hf", "vllm", "auto"], default="hf",
                   help="hf: transformers (exact match and eval loss); vllm / auto: exact match on vLLM")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--max-tokens", type=int, default=None, help="generation limit (default: longest response + 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (default: all)")
    p.add_argument("--no-loss", dest="loss", action="store_false",
                   help="skip the eval loss (default: compute it with --backend hf)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="vLLM backend KV cache size in GiB (default: from free memory on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM backend context length (default: the model's)")
    p.add_argument("--ablate", type=lambda v: [m.strip() for m in v.split(",") if m.strip()], default=None,
                   metavar="MODE[,MODE...]",
                   help="also score with each modality's vectors, then all of them, replaced: zero, shuffle (across "
                        "rows) or noise (matched mean/std); reports each score and its drop (default: no ablation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and noise ablations")


def run_eval(args: argparse.Namespace) -> int:
    # stdout carries exactly one JSON line: vLLM logs to stderr (mmfuse.logs.quiet_engine)
    with _handled("eval") as status:
        from .evaluation import evaluate, metrics_line
        config = EvalConfig(backend=args.backend, batch_size=args.batch_size, max_tokens=args.max_tokens,
                            limit=args.limit, loss=args.loss, kv_cache_gb=args.kv_cache_gb,
                            max_model_len=args.max_model_len, ablate=args.ablate, seed=args.seed)
        print(metrics_line(evaluate(args.ckpt, args.data, config)))
    return status.code


__all__ = ["add_train_args", "run_train", "add_data_check_args", "run_data_check", "add_data_encode_args",
           "run_data_encode", "add_eval_args", "run_eval", "train_config_from_args", "TrainConfigError"]
