"""Typed settings for training and evaluation, validated once.

Every option of ``mmfuse train`` / ``mmfuse eval`` is a field here; the CLI only
parses flags into these dataclasses, and the training code reads nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
ABLATIONS = ("zero", "shuffle", "noise")  # what `mmfuse eval --ablate` puts in place of a modality's vectors  # how several processes hold the model (mmfuse.training.sharding)
# defaults that work for the stage: projectors learn fast from scratch, a full LM needs care
DEFAULT_LR = {"projectors": 1e-3, "lora": 2e-4, "full": 2e-5}
OVERLENGTH = ("refuse", "drop", "truncate")  # what happens to a row longer than max_length (encode.RowEncoder)
LOSS_ON = ("assistant", "all")  # chat rows: which turns carry loss (chat_rows)


class TrainConfigError(ValueError):
    """A training or evaluation option is invalid; the message names the option."""


@dataclass
class TrainConfig:
    """One training run: ``mmfuse train CKPT DATA --stage N --out OUT [options]``."""

    ckpt: str  # mmfuse checkpoint directory or hub id (made by `mmfuse init` or a previous run)
    data: str  # parquet file or directory of *.parquet (see mmfuse.training.data)
    out: str  # output checkpoint directory (missing or empty unless resume/overwrite); state in OUT/train_state/
    stage: int = 1  # 1: projectors only (LM frozen); 2: projectors + LoRA adapters, or the whole LM with full=True
    lora_r: int = 16  # LoRA rank (stage 2 without full)
    lora_alpha: float | None = None  # LoRA scale numerator; None = 2 * lora_r (a common, stable choice)
    lora_dropout: float = 0.0  # 0 keeps runs reproducible without RNG bookkeeping inside peft
    full: bool = False  # stage 2: train every LM weight instead of LoRA adapters
    train_modalities: list[str] | None = None  # projectors to train (the others frozen); None = all of them
    freeze_projectors: bool = False  # stage 2: train the LM (LoRA or full) alone, every projector frozen
    # stage 2 LoRA: also write the adapter unmerged to OUT/adapter (peft format), to serve over the input checkpoint
    save_adapter: bool = False
    epochs: int = 1  # passes over DATA; ignored when max_steps is set
    max_steps: int | None = None  # optimiser steps in total; required with streaming (length unknown)
    batch_size: int = 8  # rows per process per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step; global batch = batch_size * processes * grad_accum
    lr: float | None = None  # peak learning rate; None = DEFAULT_LR for the stage
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping
    warmup: float = 0.0  # warm-up: a fraction of all steps when < 1, else a number of steps
    schedule: str = "cosine"  # lr after warm-up: cosine | linear (decay to 0) | constant
    dtype: str = "fp32"  # fp32, or bf16 autocast (weights and optimiser state stay fp32)
    # several processes: ddp (each holds the model) or fsdp (each holds 1/P of it: full or LoRA stage 2 of an LM
    # too big for one device); None = what an `accelerate launch --config_file` environment asks, else ddp
    strategy: str | None = None
    gradient_checkpointing: bool = False  # recompute decoder layers in backward: less memory, ~1/3 more compute
    save_every: int = 0  # write OUT/train_state every N optimiser steps; 0 = never (no --resume possible)
    keep_states: int = 1  # training states kept on disk (the newest ones)
    resume: bool = False  # continue from the newest state in OUT/train_state
    overwrite: bool = False  # start over in a non-empty OUT (mmfuse.outdir: its own files are removed first)
    eval_data: str | None = None  # held-out parquet data for eval loss (and exact match)
    eval_every: int = 0  # evaluate every N steps; 0 = only at the end (when eval_data is set)
    eval_exact_match: bool = False  # also generate greedily and compare with the response
    eval_max_tokens: int | None = None  # generation limit for exact match; None = longest eval response + 1
    eval_batch_size: int | None = None  # None = batch_size
    streaming: bool = False  # read parquet as a stream (datasets streaming) instead of memory-mapping it
    shuffle: bool = True  # reshuffle rows every epoch (deterministic from seed and epoch)
    seed: int = 0
    log_every: int = 1  # progress/metrics record every N steps
    # -- data layout (mmfuse.training.encode / chat_rows / plan); all rows are checked before step 1
    max_length: int | None = None  # most tokens in one row (items count as their soft tokens); None = the LM's
    overlength: str = "refuse"  # a row over max_length: refuse (name it), drop (and count it), or truncate
    packing: bool = False  # pack each micro-batch's rows into as few max_length rows as fit (same loss)
    loss_on: str = "assistant"  # messages rows: loss on assistant turns only, or on every token (all)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise TrainConfigError(f"stage: expected 1 or 2, got {self.stage!r}")
        if self.overwrite and self.resume:
            raise TrainConfigError("overwrite: cannot be combined with resume (--resume continues the run in out, "
                                   "--overwrite replaces it)")
        if self.train_modalities is not None and (not self.train_modalities or not all(
                isinstance(n, str) and n for n in self.train_modalities)):
            raise TrainConfigError(f"train_modalities: expected modality names, got {self.train_modalities!r}")
        if self.full and self.stage != 2:
            raise TrainConfigError("full: training the whole LM is stage 2 (--stage 2 --full)")
        if self.freeze_projectors and (self.stage != 2 or self.train_modalities is not None):
            raise TrainConfigError("freeze_projectors: stage 2 only, and not with train_modalities (stage 1 trains "
                                   "projectors alone)")
        if self.save_adapter and (self.stage != 2 or self.full):
            raise TrainConfigError("save_adapter: only stage 2 LoRA training has an adapter to save (--stage 2 "
                                   "without --full)")
        if self.save_adapter and not self.freeze_projectors:
            # an adapter changes the LM only and is served over the input checkpoint's projectors: if this run
            # also trained projectors, adapter + input checkpoint would not be the model this run made
            raise TrainConfigError("save_adapter: an adapter is served over the input checkpoint's projectors, so "
                                   "the run must leave them as they are: add --freeze-projectors (train the "
                                   "projectors in stage 1 first)")
        positive = ["lora_r", "epochs", "batch_size", "grad_accum", "keep_states", "log_every"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainConfigError(f"{key}: expected a positive integer, got {value!r}")
        for key in ("save_every", "eval_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{key}: expected an integer >= 0, got {value!r}")
        tokens = self.eval_max_tokens
        if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
            raise TrainConfigError(f"eval_max_tokens: expected a positive integer, got {self.eval_max_tokens!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise TrainConfigError(f"max_steps: expected a positive integer, got {self.max_steps!r}")
        if self.streaming and self.max_steps is None:
            raise TrainConfigError("max_steps: required with streaming (a stream's length is unknown)")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise TrainConfigError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r} (deepspeed is not "
                                   f"supported in this version: docs/training.md says why)")
        if self.eval_exact_match and self.resolved_strategy() == "fsdp":
            # each process would generate alone, but FSDP gathers every layer from all processes per forward
            raise TrainConfigError("eval_exact_match: not with strategy fsdp; run `mmfuse eval OUT EVAL_DATA` on "
                                   "the exported checkpoint (eval loss is computed during the run)")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.warmup < 0:
            raise TrainConfigError(f"warmup: expected >= 0, got {self.warmup!r}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainConfigError(f"lora_dropout: expected 0 <= p < 1, got {self.lora_dropout!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.trainable]
        if self.lr <= 0:
            raise TrainConfigError(f"lr: expected > 0, got {self.lr!r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_r
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        self._check_data_layout()

    def _check_data_layout(self) -> None:
        length = self.max_length
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 2):
            raise TrainConfigError(f"max_length: expected an integer >= 2, got {length!r}")
        if self.overlength not in OVERLENGTH:
            raise TrainConfigError(f"overlength: expected one of {OVERLENGTH}, got {self.overlength!r}")
        if self.loss_on not in LOSS_ON:
            raise TrainConfigError(f"loss_on: expected one of {LOSS_ON}, got {self.loss_on!r}")

    @property
    def trainable(self) -> str:
        """What the optimiser updates: ``projectors``, ``lora`` (+ projectors) or ``full`` (+ projectors)."""
        if self.stage == 1:
            return "projectors"
        return "full" if self.full else "lora"

    def resolved_strategy(self) -> str:
        """``strategy``, or the launcher's choice (``accelerate launch`` with an FSDP config file: fsdp), else ddp."""
        if self.strategy is not None:
            return self.strategy
        import os

        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# options that must not change between a run and its resumption: they decide the data order,
# what is trained and the lr curve, so changing them would silently train something else
RESUME_INVARIANTS = ("data", "stage", "lora_r", "lora_alpha", "full", "epochs", "max_steps", "batch_size",
                     "grad_accum", "lr", "weight_decay", "warmup", "schedule", "shuffle", "seed", "streaming",
                     "train_modalities", "freeze_projectors")
# the data layout options that decide which rows and tokens train (packing changes only how rows are laid out)
RESUME_INVARIANTS += ("max_length", "overlength", "loss_on")


@dataclass
class EvalConfig:
    """``mmfuse eval CKPT DATA``: scores of greedy generations (any backend), eval loss (hf), input ablations."""

    backend: str = "hf"  # hf | vllm | auto (as MultimodalPipeline)
    batch_size: int = 16  # prompts per generate call
    max_tokens: int | None = None  # generation limit; None = longest reference response + 1 token
    limit: int | None = None  # evaluate only the first N rows
    loss: bool = True  # eval loss (teacher-forced, response tokens only); hf backend only
    kv_cache_gb: float | None = None  # vLLM backend: KV cache size; None = mmfuse's default for the machine
    max_model_len: int | None = None  # vLLM backend: context length; None = the model's own
    ablate: list[str] | None = None  # also score with each modality's vectors zeroed / shuffled / noised (ABLATIONS)
    seed: int = 0  # seeds the shuffle and noise ablations

    def __post_init__(self) -> None:
        if self.ablate is not None:
            if isinstance(self.ablate, str):
                self.ablate = [self.ablate]
            bad = [m for m in self.ablate if m not in ABLATIONS]
            if bad or not self.ablate:
                raise TrainConfigError(f"ablate: expected some of {ABLATIONS}, got {self.ablate!r}")
        if self.backend not in ("hf", "vllm", "auto"):
            raise TrainConfigError(f"backend: expected hf, vllm or auto, got {self.backend!r}")
        for key in ("batch_size", "max_tokens", "limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TrainConfigError(f"{key}: expected a positive integer, got {value!r}")
