"""``python -m mmfuse.training train|check|encode|eval ...``: the training commands on their own.

Handy under launchers: ``torchrun --standalone --nproc_per_node 2 -m mmfuse.training train CKPT DATA ...``
or ``accelerate launch -m mmfuse.training train ...``.
"""
from __future__ import annotations

import argparse
import sys

from .cli import (add_data_check_args, add_data_encode_args, add_eval_args, add_train_args, run_data_check,
                  run_data_encode, run_eval, run_train)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfuse.training")
    sub = p.add_subparsers(dest="command", required=True)
    for name, add, run, text in (("train", add_train_args, run_train, "train a checkpoint (stage 1 or 2)"),
                                 ("check", add_data_check_args, run_data_check, "validate a dataset"),
                                 ("encode", add_data_encode_args, run_data_encode,
                                  "precompute encoder vectors for raw media"),
                                 ("eval", add_eval_args, run_eval, "exact match / eval loss as one JSON line")):
        s = sub.add_parser(name, help=text)
        add(s)
        s.set_defaults(run=run)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
