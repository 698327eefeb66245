"""Training for mmfuse checkpoints: datasets, stage 1 / stage 2, export, evaluation.

Public API (stable; the CLI and the demo build on exactly these names)::

    from mmfuse.training import (TrainConfig, train, TrainResult, EvalConfig, evaluate,
                                 check_dataset, write_parquet, DataError, encode_dataset)

    # data: parquet with columns prompt (str), response (str), mm_NAME (list<list<list<float>>>, or raw
    # media for a modality with an encoder: image bytes, waveforms, strings)
    # or chat data: one column messages (OpenAI-style conversations, loss on the assistant turns)
    write_parquet([{"prompt": "Describe <|m1|>.", "response": "red",
                    "items": {"m1": [np.zeros((1, 32))]}}], "train.parquet")
    errors = check_dataset("ckpt", "train.parquet", max_errors=10)   # [] when every row is fine
    result = train(TrainConfig(ckpt="ckpt", data="train.parquet", out="out", stage=1, max_steps=100))
    result.out                                    # a checkpoint dir both backends load directly
    evaluate("out", "heldout.parquet", EvalConfig(backend="hf"))   # {"n", "exact_match", "token_f1", "bleu",
                                                                   #  "rouge1/2/L", "eval_loss", ...}
    evaluate("out", "heldout.parquet", EvalConfig(ablate=["zero"]))  # + "ablation": score drops per modality
    encode_dataset("ckpt", "raw.parquet", "encoded")   # raw media -> encoder vectors once (resumable shards)

- ``train(config, on_step=None) -> TrainResult``: runs on every process of an
  ``accelerate launch`` / ``torchrun`` job (gloo on CPU, nccl on GPU), or alone; with several
  processes the model is replicated (``strategy="ddp"``) or sharded (``"fsdp"``), see ``sharding``.
  ``on_step(step, record)`` is called on every process after each optimiser step.
- Stage 1 trains the projectors with the LM frozen; stage 2 trains projectors +
  LoRA adapters (``lora_r``), or the whole LM (``full=True``). OUT is a complete
  checkpoint (LoRA merged); optimiser/scheduler/RNG/data position are in
  ``OUT/train_state/`` for ``resume=True``; ``OUT/metrics.json`` and
  ``OUT/loss_curve.png`` report the run.
- ``DataError`` (a ``ValueError``) names the row: ``row 17: modality 'm1' item 0: ...``.

CLI glue for the ``mmfuse`` command lives in ``mmfuse.training.cli``:
``add_train_args/run_train``, ``add_data_check_args/run_data_check``,
``add_data_encode_args/run_data_encode``, ``add_eval_args/run_eval`` (each ``run_*`` returns an exit code).

Importing this package imports neither torch nor transformers; the names load lazily.
"""
from __future__ import annotations

from .config import EvalConfig, TrainConfig, TrainConfigError

__all__ = ["TrainConfig", "TrainConfigError", "EvalConfig", "train", "TrainResult", "evaluate", "check_dataset",
           "write_parquet", "DataError", "encode_dataset", "EncodeResult"]

_LAZY = {"train": "trainer", "TrainResult": "trainer", "evaluate": "evaluation", "check_dataset": "data",
         "write_parquet": "data", "DataError": "data", "encode_dataset": "precompute", "EncodeResult": "precompute"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
