"""The training loop: stage setup, data-parallel steps, eval, saving, export.

Runs unchanged alone or on every process of ``accelerate launch`` / ``torchrun``
(gloo on CPU, nccl on GPU). With several processes the model is replicated
(``strategy="ddp"``: torch DDP through accelerate) or sharded (``"fsdp"``: torch
FSDP2); ``mmfuse.training.sharding`` wraps it and explains how the library's
gradient synchronisation keeps the exact token-weighted loss: the mean over the
response tokens of the *global* batch (all processes and accumulation steps), so
P processes x batch b give the update of one process with batch P*b.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import resolve
from ..backends.hf import load
from ..outdir import claim_output_dir, clear_entries
from .batches import map_steps, steps_per_epoch, stream_steps
from .config import TrainConfig, TrainConfigError
from .data import column_names, open_dataset
from .plan import plan_dataset
from .encode import DataError, Example, RowEncoder
from .evaluation import exact_match_hits, loss_totals
from .sharding import Parallel
from .report import write_report
from .stages import STATE_DIR, export_checkpoint, setup_trainable
from .state import Progress, load_state, save_state, state_dirs

@dataclass
class TrainResult:
    out: Path  # the exported checkpoint
    steps: int
    final_loss: float | None  # mean loss of the last step
    eval: dict | None  # the last eval record
    metrics_path: Path
    main_process: bool  # False on the other processes of a distributed run (they wrote nothing)


def _sum(acc, value: float | int) -> float:
    return float(acc.reduce(torch.tensor(float(value), dtype=torch.float64, device=acc.device), "sum"))


def _max(acc, value: float | int) -> float:
    return float(acc.reduce(torch.tensor(float(value), dtype=torch.float64, device=acc.device), "max"))


def _raise_if_any(error: DataError | None) -> None:
    """A bad row on one process stops every process, all with the row's message."""
    from accelerate.utils import gather_object

    first = next((m for m in gather_object([str(error) if error else None]) if m), None)
    if first:
        raise DataError(first)


def _encode(encoder: RowEncoder, rows) -> list[Example]:
    return [encoder.encode(row, index) for index, row in rows]


class _Run:
    """State shared by the steps of one run (kept off the public API)."""

    def __init__(self, config: TrainConfig, accelerator):
        self.config, self.acc = config, accelerator
        self.ckpt, self.out = resolve(config.ckpt), Path(config.out)
        if self.out.resolve() == self.ckpt.resolve():
            raise TrainConfigError(f"out: {self.out} is the input checkpoint; write to a new directory")
        # a non-empty out is refused before anything loads, unless resumed or overwritten (mmfuse.outdir)
        self.stale: list[Path] = []
        if not config.resume:
            hint = (f": it already holds training state ({STATE_DIR}/); pass --resume (resume=True) to continue "
                    f"that run" if state_dirs(self.out) else "")
            self.stale = claim_output_dir(self.out, config.overwrite, error=TrainConfigError, label="out: ",
                                          hint=hint)
        device = accelerator.device
        if config.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainConfigError(f"dtype: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp32")
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every process
        self.strategy = config.resolved_strategy()
        sharded = self.strategy == "fsdp" and accelerator.num_processes > 1
        # FSDP moves each process's shards to its device itself: the whole model never sits on one device
        self.model = load(self.ckpt, device="cpu" if sharded else accelerator.device)
        _, self.peft_model = setup_trainable(self.model, config)
        if config.gradient_checkpointing:
            # recompute each decoder layer in backward instead of keeping its activations; non-reentrant
            # checkpointing needs no input that requires grad (stage 1 / LoRA freeze the embeddings)
            self.model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.parallel = Parallel(self.model, self.strategy, accelerator, self.autocast)
        self.params = self.parallel.params
        self.encoder = RowEncoder.from_model(self.model)
        self.ds = open_dataset(config.data, streaming=config.streaming)
        self.encoder.check_columns(column_names(self.ds))
        if not config.streaming and len(self.ds) == 0:
            raise DataError(f"{config.data}: the dataset has no rows")
        # what a process without rows runs so that every process makes the same collectives (sharding.py)
        self.filler = self._filler() if self.parallel.distributed else None
        self.eval_examples = self._eval_examples() if config.eval_data else None
        processes = accelerator.num_processes
        # the training rows' layout (max_length, overlength, loss_on, packing); eval rows, encoded above, are
        # measured whole, under the model's own length
        self.encoder = RowEncoder.from_model(self.model, config)
        # every row checked (and over-long ones dropped) before step 1, identically on every process (plan.py)
        error = None
        try:
            self.plan = plan_dataset(self.encoder, self.ds, config.data)
        except DataError as e:
            error = e
        _raise_if_any(error)
        if self.plan.dropped and accelerator.is_main_process:
            print(f"mmfuse train: training on {self.plan.describe()}", file=sys.stderr)
        self.total = config.max_steps or config.epochs * steps_per_epoch(len(self.plan.rows), config, processes)
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=config.lr,
                                           weight_decay=config.weight_decay)
        from transformers import get_scheduler
        name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=config.warmup_steps(self.total),
                                       num_training_steps=self.total)
        # overwrite: the earlier run's files go only now that model and data opened; every process has
        # looked at out (above) before the main process changes it
        accelerator.wait_for_everyone()
        if self.stale and accelerator.is_main_process:
            clear_entries(self.stale)
        accelerator.wait_for_everyone()

    def autocast(self):
        """bf16 autocast for forward passes when asked; weights and optimiser state stay fp32."""
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16")

    def _filler(self):
        row = self.ds[0] if not self.config.streaming else next(iter(self.ds))
        error, batch = None, None
        try:
            batch = self.encoder.collate([self.encoder.encode(row, 0)])
        except DataError as e:
            error = e
        _raise_if_any(error)
        return batch

    def _eval_examples(self) -> list[Example]:
        """This process's share of the held-out rows (every P-th row), encoded once."""
        ds = open_dataset(self.config.eval_data)
        self.encoder.check_columns(column_names(ds))
        rank, procs = self.acc.process_index, self.acc.num_processes
        error, examples = None, []
        try:
            examples = [self.encoder.encode(ds[i], i) for i in range(rank, len(ds), procs)]
        except DataError as e:
            error = DataError(f"eval data: {e}")
        _raise_if_any(error)
        return examples

    def steps(self, progress: Progress):
        """Micro-batches of rows for every remaining step, across epochs."""
        acc, config = self.acc, self.config
        epoch, start = progress.epoch, progress.epoch_step
        make = stream_steps if config.streaming else map_steps
        rows = frozenset(self.plan.dropped) if config.streaming else self.plan.rows  # stream: skip; map: keep
        while True:
            produced = False
            for micro in make(self.ds, config, epoch, start, acc.num_processes, acc.process_index, rows):
                produced = True
                yield epoch, micro
            if not produced and start == 0:
                raise DataError(f"{config.data}: the dataset has no rows")
            epoch, start = epoch + 1, 0

    def step(self, micro) -> tuple[float, int, int]:
        """One optimiser step over this process's micro-batches: (global mean loss, global tokens, global rows)."""
        error, examples = None, []
        try:
            examples = [_encode(self.encoder, rows) for rows in micro]
        except DataError as e:
            error = e
        _raise_if_any(error)
        batches = [self.encoder.collate(ex) if ex else None for ex in examples]
        par, acc = self.parallel, self.acc
        tokens = _sum(acc, sum(b.num_targets for b in batches if b is not None))
        if not par.distributed:  # alone, an empty micro-step has nothing to synchronise
            batches = [b for b in batches if b is not None]
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            with par.sync(last=i == len(batches) - 1):
                if batch is None:  # the same collectives as the other processes, no gradient
                    acc.backward(par.module(self.filler) * 0.0)
                    continue
                loss = par.module(batch)
                acc.backward(loss * par.loss_scale / tokens)  # the global-token mean after DDP/FSDP averaging
                loss_sum += float(loss.detach())
        if self.config.max_grad_norm > 0:
            par.clip_grad_norm(self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _sum(acc, loss_sum) / tokens, int(tokens), int(_sum(acc, sum(len(e) for e in examples)))

    def evaluate(self, step: int) -> dict:
        config, acc = self.config, self.acc
        self.model.eval()
        if self.parallel.sharded:
            total, tokens = self._sharded_loss_totals()
        else:
            total, tokens = loss_totals(self.model, self.encoder, self.eval_examples, config.eval_batch_size,
                                        self.autocast)
        record = {"step": step, "eval_loss": _sum(acc, total) / _sum(acc, tokens),
                  "n": int(_sum(acc, len(self.eval_examples)))}
        if config.eval_exact_match:  # not with fsdp (TrainConfig): each process generates alone
            longest = max((len(e.input_ids) - e.prompt_len for e in self.eval_examples), default=0)  # response + EOS
            max_tokens = config.eval_max_tokens or int(_max(acc, longest)) + 1
            hits = exact_match_hits(self.model, self.eval_examples, max_tokens, config.eval_batch_size)
            record["exact_match"] = _sum(acc, hits) / record["n"]
        self.model.train()
        return record

    @torch.no_grad()
    def _sharded_loss_totals(self) -> tuple[float, int]:
        """Eval loss through the FSDP module: every process runs as many batches as the busiest one."""
        size, examples = self.config.eval_batch_size, self.eval_examples
        batches = [self.encoder.collate(examples[i:i + size]) for i in range(0, len(examples), size)]
        total, tokens = 0.0, 0
        for i in range(int(_max(self.acc, len(batches)))):
            if i < len(batches):
                total += float(self.parallel.module(batches[i]))
                tokens += batches[i].num_targets
            else:
                self.parallel.module(self.filler)
        return total, tokens

    def export(self) -> None:
        """Write OUT as a plain checkpoint (main process); with FSDP every process first gathers the shards."""
        config = self.config
        if self.parallel.sharded:
            # a fresh model of the same structure (LoRA layers included) on the main process takes the weights
            model, peft_model = None, None
            if self.acc.is_main_process:
                model = load(self.ckpt)
                _, peft_model = setup_trainable(model, config)
            self.parallel.copy_into(model)
            if model is None:
                return
        else:
            if not self.acc.is_main_process:
                return
            model, peft_model = self.model, self.peft_model
            if config.gradient_checkpointing:
                model.lm.gradient_checkpointing_disable()
        export_checkpoint(model, peft_model, config, self.ckpt, self.out)


def train(config: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a checkpoint as ``config`` says and export the result to ``config.out``.

    Call it on every process of a distributed launch. ``on_step(step, record)``
    runs on every process after each optimiser step (``record``: step, epoch,
    loss, lr, tokens, rows); an exception from it stops the run (states already
    saved stay usable for ``resume``).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    # without cpu=True accelerate ignores a torchrun/launch environment on machines with no GPU (gloo).
    # Mixed precision is our own autocast (_Run.autocast): accelerate's setting is process-global and
    # could not change between two train() calls in one process.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    run = _Run(config, acc)
    progress = Progress()
    if config.resume:
        progress = load_state(run.out, config, run.parallel, run.optimizer, run.scheduler, acc)
    run.model.train()
    started = time.time()
    bar = tqdm(total=run.total, initial=progress.step, disable=not acc.is_main_process, desc=f"stage {config.stage}")
    steps = run.steps(progress)
    while progress.step < run.total:
        epoch, micro = next(steps)
        lr = run.scheduler.get_last_lr()[0]
        loss, tokens, rows = run.step(micro)
        progress.step += 1
        progress.epoch_step = progress.epoch_step + 1 if epoch == progress.epoch else 1
        progress.epoch = epoch
        record = {"step": progress.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": tokens, "rows": rows}
        if progress.step % config.log_every == 0 or progress.step == run.total:
            progress.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if run.eval_examples is not None and config.eval_every and progress.step % config.eval_every == 0:
            progress.evals.append(run.evaluate(progress.step))
        if config.save_every and progress.step % config.save_every == 0:
            save_state(run.out, progress, config, run.parallel, run.optimizer, run.scheduler, acc)
        if on_step is not None:
            on_step(progress.step, record)
    bar.close()
    if run.eval_examples is not None and (not progress.evals or progress.evals[-1]["step"] != progress.step):
        progress.evals.append(run.evaluate(progress.step))
    run.export()
    if acc.is_main_process:
        write_report(run.out, config, progress, acc.num_processes, time.time() - started, run.strategy,
                     run.plan.summary())
    acc.wait_for_everyone()
    return TrainResult(out=run.out, steps=progress.step,
                       final_loss=progress.history[-1]["loss"] if progress.history else None,
                       eval=progress.evals[-1] if progress.evals else None, metrics_path=run.out / "metrics.json",
                       main_process=acc.is_main_process)
