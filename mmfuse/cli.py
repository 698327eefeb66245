"""The ``mmfuse`` command: a thin layer over the library."""
from __future__ import annotations

import argparse
import re
import sys

from .config import ConfigError
from .inputs import InputError


def _init(args: argparse.Namespace) -> None:
    from .checkpoint import init_checkpoint
    from .config import parse_modality_arg

    out = init_checkpoint(args.base, args.out, [parse_modality_arg(m) for m in args.modality], seed=args.seed,
                          link=args.link)
    print(f"wrote {out}")


def _info(args: argparse.Namespace) -> None:
    from safetensors import safe_open

    from .checkpoint import PROJECTOR_PREFIX, read_config, resolve, weight_files
    from .config import MMFuseConfig

    path = resolve(args.ckpt)
    config = read_config(path)
    mm = MMFuseConfig.from_hf_config(config)
    params: dict[str, int] = {}
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.startswith(PROJECTOR_PREFIX):
                    name = key[len(PROJECTOR_PREFIX):].split(".")[0]
                    shape = st.get_slice(key).get_shape()
                    params[name] = params.get(name, 0) + _prod(shape)
    text = config.get("text_config", config)
    print(f"checkpoint   {path}")
    print(f"architecture {config['architectures'][0]} (model_type {config.get('model_type')}), "
          f"hidden {text['hidden_size']}, layers {text['num_hidden_layers']}, vocab {text['vocab_size']}")
    print(f"{'modality':<12}{'input_dim':>10}{'projector':>12}{'hidden_dim':>11}{'tok/item':>9}{'max_items':>10}"
          f"{'params':>11}  placeholder")
    for name, s in mm.modalities.items():
        print(f"{name:<12}{s.input_dim:>10}{s.projector:>12}{str(s.hidden_dim or '-'):>11}{s.tokens_per_item:>9}"
              f"{s.max_items:>10}{params.get(name, 0):>11,}  {s.placeholder}")


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_embedding_files(specs: list[str]) -> dict[str, list]:
    """Items from ``NAME=file.npy`` (one item per file) and ``file.safetensors`` (keys ``NAME`` or ``NAME.i``).

    numpy files are read with ``allow_pickle=False``; safetensors holds no code by design.
    """
    import numpy as np
    from safetensors.numpy import load_file

    items: dict[str, list] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = "", spec
        if file.endswith(".safetensors"):
            tensors = load_file(file)
            keyed = []
            for key, arr in tensors.items():
                m = re.fullmatch(r"([a-z][a-z0-9_]*)(?:\.(\d+))?", key)
                if not m:
                    raise InputError(f"--embeddings {file}: key {key!r} must be NAME or NAME.INDEX")
                keyed.append((m.group(1), int(m.group(2) or 0), arr))
            for mod, _, arr in sorted(keyed, key=lambda t: (t[0], t[1])):
                items.setdefault(mod, []).append(arr)
        elif file.endswith(".npy"):
            if not name:
                raise InputError(f"--embeddings {file}: .npy files need a modality, write NAME={file}")
            try:
                arr = np.load(file, allow_pickle=False)  # never unpickle user files
            except ValueError as e:
                raise InputError(f"--embeddings {file}: object arrays are refused ({e})") from None
            items.setdefault(name, []).append(arr)
        else:
            raise InputError(f"--embeddings {file}: expected a .safetensors or NAME=file.npy")
    return items


def _generate(args: argparse.Namespace) -> None:
    from .pipeline import MultimodalPipeline

    pipe = MultimodalPipeline(args.ckpt, backend=args.backend)
    request = {"text": args.prompt,
               "multimodal_data": {"multimodal_embeddings": read_embedding_files(args.embeddings)}}
    if args.chat:
        request = {"messages": [{"role": "user", "content": args.prompt}],
                   "multimodal_data": request["multimodal_data"]}
    out = pipe.generate(request, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    print(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfuse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="make an mmfuse checkpoint from a base causal LM")
    s.add_argument("base", help="base model directory or hub id")
    s.add_argument("out", help="output checkpoint directory")
    s.add_argument("--modality", action="append", required=True, metavar="NAME:DIM[:PROJECTOR]")
    s.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    s.add_argument("--link", action="store_true", help="symlink base weights instead of copying")
    s.set_defaults(func=_init)

    s = sub.add_parser("info", help="show a checkpoint's modalities and projector sizes")
    s.add_argument("ckpt")
    s.set_defaults(func=_info)

    s = sub.add_parser("generate", help="generate text from a prompt plus embedding files")
    s.add_argument("ckpt")
    s.add_argument("--prompt", required=True)
    s.add_argument("--embeddings", action="append", default=[], metavar="FILE.safetensors|NAME=FILE.npy")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    s.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"])
    s.set_defaults(func=_generate)

    from .training.cli import (add_data_check_args, add_eval_args, add_train_args, run_data_check, run_eval,
                               run_train)
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    for group, name, text, add, run in (
            (sub, "train", "stage 1 (projectors) or stage 2 (LoRA / full) training", add_train_args, run_train),
            (sub, "eval", "greedy exact match (and eval loss) on a dataset, one JSON line", add_eval_args, run_eval),
            (data, "check", "validate a dataset against a checkpoint", add_data_check_args, run_data_check)):
        s = group.add_parser(name, help=text)
        add(s)
        s.set_defaults(func=run)

    from .server.cli import add_serve_args, run_serve
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with embedding content parts")
    add_serve_args(s)
    s.set_defaults(func=run_serve)

    s = sub.add_parser("bench", help="benchmarks: `mmfuse bench throughput --help`")
    s.add_argument("name", choices=sorted(BENCHMARKS))
    s.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    s.set_defaults(func=_bench)
    return p


BENCHMARKS = {"throughput": "mmfuse.bench.throughput", "serve": "mmfuse.bench.serve_load",
              "engine-core": "mmfuse.bench.engine_core"}


def _bench(args: argparse.Namespace) -> int:
    import importlib
    importlib.import_module(BENCHMARKS[args.name]).main(args.rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (InputError, ConfigError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
