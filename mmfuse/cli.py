"""The ``mmfuse`` command: a thin layer over the library.

Every subcommand has help text and its default on every option, and an example
epilog (``mmfuse COMMAND --help``). ``-v`` / ``--log-level`` (before or after the
command) choose how much vLLM, transformers and torch print (``mmfuse.logs``).
"""
from __future__ import annotations

import argparse
import re
import sys

from .config import (ENCODER_SYNTAX, MODALITY_SYNTAX, PROJECTOR_KINDS, ConfigError, parse_encoder_arg,
                     parse_modality_arg)
from .inputs import InputError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written; every option's help ends with its default unless the text already says it.

    No default is shown for flags (``store_true``), options whose default is None or empty
    (their help says what happens then), or positional arguments.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or (isinstance(default, (list, tuple, str)) and not default)):
            return text
        return f"{text} (default: %(default)s)"


def _modality_type(text: str):
    """argparse ``type=`` for ``--modality``: our message, not argparse's generic 'invalid value'.
    The text is kept: a DIM left out is filled from ``--encoder`` later (``modality_specs``)."""
    try:
        head = text.split(",")[0].split(":")
        parse_modality_arg(text, {head[0]: 1} if len(head) == 1 or not head[1] else None)
        return text
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_encoder_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", action="append", type=_encoder_type, metavar=ENCODER_SYNTAX,
                        help="attach a frozen encoder (hub id or local directory; its kind is read off its config) "
                             "to modality NAME: raw images, audio or text go in, and DIM may be left out; repeat "
                             "for several")


def _encoder_type(text: str):
    try:
        parse_encoder_arg(text)
        return text
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


MODALITY_HELP = f"""\
modality syntax: {MODALITY_SYNTAX}
  NAME           [a-z][a-z0-9_]*: the key of this modality's items, and the placeholder <|NAME|>
  DIM            size of one input vector (what your encoder produces)
  PROJECTOR      one of {', '.join(PROJECTOR_KINDS)} (default mlp2x_gelu: Linear-GELU-Linear;
                 mlp{{N}}x_{{act}}: N layers, act gelu|silu|relu|tanh|quick_gelu; identity: DIM = LM hidden;
                 resampler: K learned queries attend over an item's rows, any (n, DIM) item -> K tokens)
  tokens=K       soft tokens each input vector becomes (default 1); for a resampler, per item
  layers=L       resampler blocks (default 2); heads=A: its attention heads (default 8)
  hidden=H       MLP intermediate size (default: the LM's hidden size)
  placeholder=P  the prompt token that marks one item (default <|NAME|>)
  max_items=N    most items of this modality in one prompt (default 16)
"""

DESCRIPTION = """\
Any Hugging Face causal LM plus named embedding modalities: make checkpoints, generate,
train, evaluate and serve them. `mmfuse COMMAND --help` shows each command's options
(with defaults) and examples. -v / --log-level work before or after COMMAND."""

EPILOGS = {
    "init": f"""\
examples:
  mmfuse tiny-base base                                  # a tiny offline base to try things (no hub)
  mmfuse init base ckpt --modality vision:768
  mmfuse init Qwen/Qwen3-0.6B ckpt --modality vision:768 --modality audio:128:linear,tokens=4,max_items=8
  mmfuse init base ckpt --modality 'protein:1280,hidden=2048,placeholder=<prot>' --link --overwrite

{MODALITY_HELP}
OUT must be missing or empty; --overwrite replaces an earlier checkpoint or training run
there (mmfuse removes only files it writes, and refuses if OUT holds anything else).
""",
    "info": """\
examples:
  mmfuse info demo/ckpt
  mmfuse info ckpt          # architecture, hidden size, and per modality: dims, projector, params, placeholder
""",
    "generate": """\
examples:
  mmfuse generate demo/ckpt --prompt "Describe <|sent|><|tok|>:" --embeddings items.safetensors
  mmfuse generate ckpt --prompt "Describe <|vision|>." --embeddings vision=vec.npy --max-tokens 32
  mmfuse generate ckpt --prompt "Compare <|vision|> with <|vision|>." \\
      --embeddings vision=a.npy --embeddings vision=b.npy --backend hf
  mmfuse generate ckpt --chat --prompt "What is in <|vision|>?" --embeddings vision=vec.npy \\
      --temperature 0.7 --seed 0 --kv-cache-gb 2

--embeddings: FILE.safetensors holds keys NAME (one item) or NAME.INDEX (items in INDEX order);
NAME=FILE.npy is one item of modality NAME, shape (DIM,) or (n, DIM), read with allow_pickle=False.
The i-th placeholder of a modality takes its i-th item; with no placeholder, items go first.
""",
    "tiny-base": """\
examples:
  mmfuse tiny-base base                      # Qwen3-style, 2 layers, hidden 128, a 512-token BPE tokenizer
  mmfuse tiny-base base-llama --family llama --seed 1
  mmfuse init base ckpt --modality vision:768 && mmfuse info ckpt

Random weights (a few MB, made in seconds, no hub access): for trying the commands,
the Python API and training offline. Its output is gibberish until trained.
""",
    "train": """\
examples:
  mmfuse train ckpt train.parquet --stage 1 --out run1 --epochs 3 --eval-data heldout.parquet
  mmfuse train run1 train.parquet --stage 2 --lora-r 16 --out run2 --epochs 3
  mmfuse train run1 train.parquet --stage 2 --out run2 --epochs 3 --save-every 100 --resume   # continue run2
  torchrun --standalone --nproc_per_node 2 -m mmfuse.training train ckpt train.parquet --stage 1 --out run1
  torchrun --standalone --nproc_per_node 8 -m mmfuse.training train run1 train.parquet --stage 2 --full \\
      --strategy fsdp --gradient-checkpointing --dtype bf16 --out run2          # the LM sharded over 8 GPUs

Data: Parquet with columns prompt, response and mm_NAME (the row's items of modality NAME).
--out must be missing or empty unless --resume (continue the run there) or --overwrite (start over).
""",
    "export": """\
examples:
  mmfuse export --thin ckpt ckpt-thin --base Qwen/Qwen3-0.6B --revision c1899de   # pin the base's commit
  mmfuse export --thin ckpt ckpt-thin --base ./base                               # a local base (absolute path)

The thin checkpoint holds config, tokenizer, projectors and encoders, plus mmfuse_base.json; opening it
(mmfuse.load, MultimodalPipeline, vLLM) links the base's weights in under $MMFUSE_CACHE/thin. Refused when
the checkpoint's LM tensors are not the base's, bit for bit (a trained or resized LM travels whole).
""",
    "push": """\
examples:
  mmfuse push ckpt you/my-mmfuse-model                                  # the whole checkpoint
  mmfuse push ckpt you/my-mmfuse-model --thin --base Qwen/Qwen3-0.6B    # its thin export
""",
    "eval": """\
examples:
  mmfuse eval run2 heldout.parquet                       # transformers: exact match, F1, BLEU, ROUGE, eval loss
  mmfuse eval run2 heldout.parquet --backend vllm --limit 100
  mmfuse eval run2 heldout.parquet --ablate zero,shuffle,noise   # score drop per modality without its vectors
""",
    "data check": """\
examples:
  mmfuse data check ckpt train.parquet                  # names the first bad rows, exit 1 if any
  mmfuse data check ckpt data_dir/ --max-errors 50 --streaming
""",
    "data encode": """\
examples:
  mmfuse data encode ckpt raw.parquet encoded/          # raw images/audio/text -> vectors, parquet shards
  mmfuse data encode ckpt raw.parquet encoded/          # again: keeps the complete shards, encodes the rest
  mmfuse train ckpt encoded/ --stage 1 --out run1       # same loss as on raw.parquet, no encoder per step

Rows keep every column; mm_NAME of each modality with an encoder becomes float32 vectors.
OUT must be missing or empty, or hold this same job; --overwrite starts over.
""",
    "serve": """\
examples:
  mmfuse serve demo/ckpt --port 8000
  mmfuse serve ckpt --api-key KEY --backend vllm --kv-cache-gb 2 --max-model-len 2048
  curl -s localhost:8000/v1/models
""",
    "add-modality": """\
examples:
  mmfuse add-modality run2 --modality audio:128:linear,tokens=4
  mmfuse train run2 train_audio.parquet --stage 1 --train-modalities audio --out run3
""",
    "bench": """\
examples:
  mmfuse bench throughput --help
  mmfuse bench serve --help
  mmfuse bench engine-core --help
  mmfuse bench quantized --out q.json --plot q.png
  mmfuse bench peer --quick          # the mmfuse plugin vs vLLM's own prompt_embeds
  mmfuse bench prefix --quick        # shared prefix with items: cold vs warm TTFT
  mmfuse bench server --quick        # wire decoding, server vs offline, scaling over clients
  mmfuse bench training-memory --help
""",
}

# help for serve options that mmfuse.server.cli leaves without any (its own text wins when it has one)
_FALLBACK_HELP = {
    "port": "TCP port to listen on",
    "backend": "auto: vLLM when importable, else transformers",
    "default_max_tokens": "max_tokens of a request that gives none",
    "dtype": "model dtype (float32, bfloat16, float16)",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = _FALLBACK_HELP.get(action.dest, action.dest.replace("_", " "))


def modality_specs(modality_args: list[str], encoder_args: list[str]) -> list:
    """``--modality`` and ``--encoder`` values -> ModalitySpecs (a modality with an encoder may omit DIM)."""
    from .encoders import encoder_output_dim, encoder_spec

    encoders = {}
    for arg in encoder_args or []:
        name, source, output = parse_encoder_arg(arg)
        encoders[name] = encoder_spec(source, output)
    specs = [parse_modality_arg(a, {n: encoder_output_dim(e) for n, e in encoders.items()}) for a in modality_args]
    unknown = sorted(set(encoders) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"--encoder {unknown[0]}=...: no --modality {unknown[0]} to attach it to")
    for spec in specs:
        spec.encoder = encoders.get(spec.name)
    return specs


def _init(args: argparse.Namespace) -> None:
    from .checkpoint import init_checkpoint

    out = init_checkpoint(args.base, args.out, modality_specs(args.modality, args.encoder), seed=args.seed,
                          link=args.link, overwrite=args.overwrite)
    print(f"wrote {out}")


def _tiny_base(args: argparse.Namespace) -> None:
    from .outdir import claim_output_dir, clear_entries
    from .tiny import make_base

    clear_entries(claim_output_dir(args.out, args.overwrite))
    out = make_base(args.out, family=args.family, seed=args.seed)
    print(f"wrote {out} (tiny {args.family} base with random weights: output is gibberish until trained)")
    print(f"next: mmfuse init {out} ckpt --modality vision:768")


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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
VLLM_OPTIONS = ("max_model_len", "kv_cache_gb", "gpu_memory_utilization", "tensor_parallel_size",
                "pipeline_parallel_size", "distributed_executor_backend")


def _generate(args: argparse.Namespace) -> None:
    from .backends import select_backend
    from .pipeline import MultimodalPipeline

    embeddings = read_embedding_files(args.embeddings)  # bad files fail before a model loads
    options = {}
    if select_backend(args.backend) == "vllm":
        options = {k: getattr(args, k) for k in VLLM_OPTIONS if getattr(args, k) is not None}
    request = {"text": args.prompt, "multimodal_data": {"multimodal_embeddings": embeddings}}
    if args.chat:
        request = {"messages": [{"role": "user", "content": args.prompt}],
                   "multimodal_data": request["multimodal_data"]}
    pipe = MultimodalPipeline(args.ckpt, backend=args.backend, **options)
    try:
        out = pipe.generate(request, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    finally:
        close = getattr(pipe, "close", None)
        if close is not None:
            close()  # a clean engine shutdown, not "engine core exited unexpectedly"
    print(out)


def _common_options(top: bool) -> argparse.ArgumentParser:
    """``-v`` / ``--log-level``: accepted before the command (``top``) and after it, where only what is
    given overrides (SUPPRESS defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                   help="show library logs, warnings and progress bars: -v INFO, -vv DEBUG "
                        "(default: library errors only, plus one status line per stage)")
    g.add_argument("--log-level", type=str.upper, default=None if top else argparse.SUPPRESS,
                   choices=LOG_LEVELS, metavar="LEVEL",
                   help=f"{', '.join(LOG_LEVELS)}: the level for mmfuse, vLLM and transformers logs, instead of "
                        f"-v (default: ERROR for vLLM and transformers; ERROR also hides the status lines)")
    return p


def build_parser() -> argparse.ArgumentParser:
    top, after = _common_options(True), _common_options(False)
    p = argparse.ArgumentParser(prog="mmfuse", description=DESCRIPTION, formatter_class=HelpFormatter, parents=[top],
                                epilog="examples:\n  mmfuse tiny-base base && mmfuse init base ckpt --modality "
                                       "vision:768\n  mmfuse generate demo/ckpt --prompt \"Describe <|sent|>\" "
                                       "--embeddings items.safetensors\n  mmfuse COMMAND --help")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name: str, text: str, epilog_key: str | None = None) -> argparse.ArgumentParser:
        return group.add_parser(name, help=text, description=text, epilog=EPILOGS.get(epilog_key or name),
                                formatter_class=HelpFormatter, parents=[after])

    s = command(sub, "init", "make an mmfuse checkpoint from a base causal LM, with fresh projectors")
    s.add_argument("base", help="base model: a local Hugging Face model directory or a hub id")
    s.add_argument("out", help="output checkpoint directory (missing or empty, unless --overwrite)")
    s.add_argument("--modality", action="append", required=True, type=_modality_type, metavar="SPEC",
                   help="a modality: NAME:DIM[:PROJECTOR][,key=value...]; repeat for several (syntax below)")
    add_encoder_option(s)
    s.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    s.add_argument("--link", action="store_true",
                   help="symlink the base weight files instead of copying them (default: copy)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier checkpoint or training run in OUT (default: refuse a non-empty OUT)")
    s.set_defaults(func=_init)

    s = command(sub, "info", "show a checkpoint's modalities, projector sizes and placeholders")
    s.add_argument("ckpt", help="mmfuse checkpoint directory or hub id")
    s.set_defaults(func=_info)

    s = command(sub, "generate", "generate text from a prompt plus embedding files")
    s.add_argument("ckpt", help="mmfuse checkpoint directory or hub id")
    s.add_argument("--prompt", required=True, help="the prompt, with a placeholder (<|NAME|>) per item")
    s.add_argument("--embeddings", action="append", default=[], metavar="FILE.safetensors|NAME=FILE.npy",
                   help="items to fill the placeholders; repeat for several files (default: none)")
    s.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    s.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template "
                        "(default: the raw prompt)")
    s.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="auto: vLLM when importable, else transformers")
    eng = s.add_argument_group("vLLM engine (ignored by --backend hf)")
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's own)")
    eng.add_argument("--kv-cache-gb", type=float, default=None,
                     help="KV cache size in GiB (default: from free memory on CPU, vLLM's own on GPU)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=None,
                     help="fraction of device memory (of RAM on CPU) for vLLM, instead of --kv-cache-gb "
                          "(default: unset)")
    eng.add_argument("--tensor-parallel-size", type=int, default=None, help="tensor-parallel ranks (default: 1)")
    eng.add_argument("--pipeline-parallel-size", type=int, default=None, help="pipeline-parallel ranks (default: 1)")
    eng.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                     help="how ranks start: ray for a Ray cluster across nodes (default: vLLM's, processes here)")
    s.set_defaults(func=_generate)

    from . import tiny
    families = getattr(tiny, "FAMILIES", ("qwen3", "llama"))
    s = command(sub, "tiny-base", "write a tiny random base LM (offline, seconds) to try mmfuse with")
    s.add_argument("out", help="output directory (missing or empty, unless --overwrite)")
    s.add_argument("--family", default="qwen3", choices=families, help="architecture of the base")
    s.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier base or checkpoint in OUT (default: refuse a non-empty OUT)")
    s.set_defaults(func=_tiny_base)

    from .training.cli import (add_data_check_args, add_data_encode_args, add_eval_args, add_train_args,
                               run_data_check, run_data_encode, run_eval, run_train)
    data = command(sub, "data", "dataset tools: `mmfuse data check --help`, `mmfuse data encode --help`",
                   "data check")
    data = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    for group, name, key, text, add, run in (
            (sub, "train", "train", "stage 1 (projectors) or stage 2 (LoRA / full) training", add_train_args,
             run_train),
            (sub, "eval", "eval", "greedy generations scored (exact match, F1, BLEU, ROUGE), eval loss, input "
             "ablations: one JSON line", add_eval_args, run_eval),
            (data, "check", "data check", "validate a dataset against a checkpoint", add_data_check_args,
             run_data_check),
            (data, "encode", "data encode", "precompute encoder vectors for a dataset's raw media (resumable)",
             add_data_encode_args, run_data_encode)):
        s = command(group, name, text, key)
        add(s)
        s.set_defaults(func=run)

    from .server.cli import add_serve_args, run_serve
    s = command(sub, "serve", "OpenAI-compatible HTTP server with embedding content parts")
    add_serve_args(s)
    _fill_help(s)
    s.set_defaults(func=run_serve)

    s = command(sub, "bench", "benchmarks: `mmfuse bench throughput --help`, `mmfuse bench serve --help`")
    s.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    s.set_defaults(func=_bench)

    s = command(sub, "add-modality", "add modalities to a checkpoint in place (placeholder token + fresh "
                                     "projector); existing weights stay bit-identical")
    s.add_argument("ckpt", help="local mmfuse checkpoint directory (changed in place)")
    s.add_argument("--modality", action="append", required=True, type=_modality_type, metavar="SPEC",
                   help="a new modality: NAME:DIM[:PROJECTOR][,key=value...], as for `mmfuse init`; repeat for "
                        "several. Then train it alone: mmfuse train CKPT DATA --stage 1 --train-modalities NAME")
    add_encoder_option(s)
    s.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    s.set_defaults(func=_add_modality)

    s = command(sub, "export", "write a thin checkpoint: config, tokenizer, projectors and a reference to the base "
                               "LM, whose weights are linked in when it is opened")
    s.add_argument("ckpt", help="mmfuse checkpoint directory or hub id")
    s.add_argument("out", help="output directory (missing or empty, unless --overwrite)")
    s.add_argument("--thin", action="store_true", required=True, help="leave the base LM's weights out")
    s.add_argument("--base", required=True, help="the base LM the checkpoint was made from: a hub id (shareable) "
                                                 "or a local directory (stored as an absolute path)")
    s.add_argument("--revision", default=None, help="the base's hub revision (commit) to pin (default: none)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    s.set_defaults(func=_export)

    s = command(sub, "push", "upload a checkpoint (or its thin export) to the Hugging Face hub")
    s.add_argument("ckpt", help="mmfuse checkpoint directory")
    s.add_argument("repo", help="hub repo id, e.g. you/my-mmfuse-model (created if missing)")
    s.add_argument("--thin", action="store_true", help="upload the thin export (needs --base)")
    s.add_argument("--base", default=None, help="with --thin: the base LM's hub id")
    s.add_argument("--revision", default=None, help="with --thin: the base's revision to pin")
    s.add_argument("--private", action="store_true", help="create the repo private")
    s.set_defaults(func=_push)
    return p


def _export(args: argparse.Namespace) -> None:
    from .thin import export_thin

    out = export_thin(args.ckpt, args.out, args.base, args.revision, overwrite=args.overwrite)
    print(f"thin checkpoint {out} (base {args.base}{'@' + args.revision if args.revision else ''})")


def _push(args: argparse.Namespace) -> None:
    from .thin import push

    if args.thin and not args.base:
        raise ConfigError("--thin needs --base: the hub id (or path) of the base LM the checkpoint was made from")
    print(push(args.ckpt, args.repo, args.base if args.thin else None, args.revision, private=args.private))


def _add_modality(args: argparse.Namespace) -> None:
    from .checkpoint import add_modality

    specs = modality_specs(args.modality, args.encoder)
    out = add_modality(args.ckpt, specs, seed=args.seed)
    print(f"added {', '.join(s.name for s in specs)} to {out}")


BENCHMARKS = {"throughput": "mmfuse.bench.throughput", "serve": "mmfuse.bench.serve_load",
              "engine-core": "mmfuse.bench.engine_core", "projectors": "mmfuse.bench.projectors",
              "encoders": "mmfuse.bench.encoders", "peer": "mmfuse.bench.peer", "prefix": "mmfuse.bench.prefix",
              "server": "mmfuse.bench.server", "quantized": "mmfuse.bench.quantized",
              "training-memory": "mmfuse.bench.training_memory"}


def _bench(args: argparse.Namespace) -> int:
    import importlib
    importlib.import_module(BENCHMARKS[args.name]).main(args.rest)
    return 0


def log_level(args: argparse.Namespace) -> str | None:
    """The level ``-v`` / ``--log-level`` ask for (None: the quiet default)."""
    if getattr(args, "log_level", None):
        return args.log_level
    verbose = getattr(args, "verbose", 0) or 0
    return "DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import logs
    logs.configure(log_level(args))
    try:
        return args.func(args) or 0
    except (InputError, ConfigError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
