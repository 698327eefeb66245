"""Decode speed of one mmfuse checkpoint on vLLM: fp32, bf16, each quantized format vLLM runs here, and TP.

A random base big enough that decode reads weights, not overheads (hidden 1024, 8 layers, ~90M
parameters: 0.36 GB in fp32), quantized with compressed-tensors (``tiny.make_quantized_base``),
each through ``mmfuse init``. For each variant: batch-1 greedy decode tokens/s (128 tokens, EOS
ignored, minus the 1-token run that pays the prefill) and the bytes one decode step reads (every
weight once: linear weights at their stored width, the rest in the run dtype), as a fraction of
the read-bandwidth bound ``read GB/s / bytes per token`` measured in the same process
(``mmfuse.bench.machine``) before and after the runs (the higher of the two: a busier moment only
lowers a measurement). Then tensor parallel 2 vs 1 (fp32): batch-1 and batch-16 decode.

    mmfuse bench quantized --out docs/bench_quantized.json --plot docs/bench_quantized.png

Runs one engine at a time; ~5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I32": 4, "I64": 8, "U8": 1}
RUN_BYTES = {"float32": 4, "bfloat16": 2}


def bytes_per_token(ckpt: Path, run_dtype: str) -> int:
    """Bytes of every LM tensor as the engine holds it: integer (quantized) tensors at their stored width,
    float tensors in the run dtype; projectors excluded (a decode step does not run them)."""
    total = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name == "mm_projectors.safetensors":
            continue
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, v in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in v["shape"]:
                numel *= d
            width = DTYPE_BYTES[v["dtype"]]
            total += numel * (RUN_BYTES[run_dtype] if v["dtype"] in ("F32", "F16", "BF16") else width)
    return total


def decode_tok_s(backend, batch: int, tokens: int = 128) -> float:
    """Greedy decode tokens/s per sequence, ``batch`` sequences at once, prefill excluded."""
    from vllm import SamplingParams

    from mmfuse.inputs import prepare

    prompts = [backend.encode(prepare(f"request {i} the quick brown fox <|m1|>", {"m1": [[0.1 * i] * 32]},
                                      backend.specs)) for i in range(batch)]
    from mmfuse.backends.vllm import to_request

    requests = [to_request(p) for p in prompts]

    def run(n):
        backend.llm.reset_prefix_cache()
        start = time.perf_counter()
        backend.llm.generate(requests, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    run(8)  # warm up
    one = min(run(1) for _ in range(3))
    full = min(run(tokens) for _ in range(2))
    return (tokens - 1) / (full - one)


def hf_decode(ckpt: Path, quantization_config: str | None, tokens: int = 64) -> tuple[float, int]:
    """Batch-1 greedy decode tokens/s on the transformers backend, prefill excluded as for vLLM (the 1-token
    run's time is subtracted), and the bytes of the weights it holds (what a decode step reads: the tied
    embedding is the head, read whole)."""
    from mmfuse import SamplingConfig
    from mmfuse.backends.hf import HFBackend
    from mmfuse.inputs import prepare

    backend = HFBackend(ckpt, quantization_config=quantization_config)
    prompt = backend.encode(prepare("request the quick brown fox <|m1|>", {"m1": [[0.1] * 32]}, backend.specs))

    def run(n):
        start = time.perf_counter()
        backend.generate([prompt], SamplingConfig(max_tokens=n, min_tokens=n))
        return time.perf_counter() - start

    run(4)  # warm up
    one = min(run(1) for _ in range(3))
    full = min(run(tokens) for _ in range(2))
    return (tokens - 1) / (full - one), backend.weight_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmfuse bench quantized", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG plot of the decode fractions here")
    parser.add_argument("--work", default=None, help="directory for the models (default: a temporary one)")
    parser.add_argument("--parts", default="decode,hf,tp",
                        help="which parts to run: decode (vLLM formats), hf (transformers fp32 vs torchao int8), tp")
    args = parser.parse_args(argv)

    from mmfuse import ModalitySpec, init_checkpoint
    from mmfuse.backends.vllm import VLLMBackend
    from mmfuse.bench.machine import measure
    from mmfuse.tiny import make_base, make_quantized_base

    work = Path(args.work or tempfile.mkdtemp())
    base = work / "base"
    if not base.exists():
        make_base(base, hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816, init_std=0.02)
    specs = [ModalitySpec("m1", input_dim=32)]
    ckpts = {}
    for scheme in ("fp", "W8A8", "W4A16"):
        ckpt = work / f"ckpt_{scheme}"
        if not ckpt.exists():
            src = base if scheme == "fp" else make_quantized_base(base, work / f"base_{scheme}", scheme)
            init_checkpoint(src, ckpt, specs)
        ckpts[scheme] = ckpt

    limits = measure(quick=False)
    print(f"read bandwidth {limits.read_gbps:.1f} GB/s, fp32 GEMM {limits.gemm_gflops:.0f} GFLOP/s, "
          f"{limits.cores} cores, load average {os.getloadavg()}")
    result = dict(machine=limits.to_dict(), load_average=os.getloadavg(),
                  params=bytes_per_token(ckpts["fp"], "float32") // 4, decode=[], tensor_parallel=[])

    def save():  # after every measurement: a run cut short keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    parts = args.parts.split(",")
    variants = [("fp32", "fp", "float32"), ("bf16", "fp", "bfloat16"), ("W8A8 int8 (fp32 act.)", "W8A8", "float32"),
                ("W4A16 int4 (bf16 act.)", "W4A16", "bfloat16")]
    rows = result["decode"]
    for label, scheme, dtype in variants if "decode" in parts else []:
        backend = VLLMBackend(ckpts[scheme], dtype=dtype, max_model_len=512)
        try:
            tok_s = decode_tok_s(backend, 1)
        finally:
            backend.close()
        rows.append(dict(variant=label, dtype=dtype, bytes_per_token=bytes_per_token(ckpts[scheme], dtype),
                         decode_tok_s=round(tok_s, 1)))
        print(rows[-1])
        save()
    for label, quantize in [("transformers fp32", None), ("transformers torchao int8", "torchao-int8")] \
            if "hf" in parts else []:
        tok_s, held = hf_decode(ckpts["fp"], quantize)
        rows.append(dict(variant=label, dtype="float32", bytes_per_token=held, decode_tok_s=round(tok_s, 1)))
        print(rows[-1])
        save()
    after = measure(quick=False)
    result.update(machine_after=after.to_dict(), load_average_after=os.getloadavg())
    read_gbps = max(limits.read_gbps, after.read_gbps)
    for row in rows:  # bounds from the higher bandwidth measured: a busy moment only lowers a measurement
        row["bound_tok_s"] = round(read_gbps * 1e9 / row["bytes_per_token"], 1)
        row["fraction_of_bound"] = round(row["decode_tok_s"] / row["bound_tok_s"], 2)
    result["read_gbps_bound"] = read_gbps
    save()
    if rows and args.plot:
        _plot(rows, args.plot)
    tp = result["tensor_parallel"]
    for ranks in (1, 2) if "tp" in parts else ():
        backend = VLLMBackend(ckpts["fp"], dtype="float32", max_model_len=512, tensor_parallel_size=ranks)
        try:
            tp.append(dict(tensor_parallel_size=ranks, batch1_tok_s=round(decode_tok_s(backend, 1), 1),
                           batch16_tok_s_per_seq=round(decode_tok_s(backend, 16, 64), 1)))
        finally:
            backend.close()
        print(tp[-1])
        save()


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
    labels = [r["variant"] for r in rows][::-1]  # first row on top
    ax.barh(labels, [r["bound_tok_s"] for r in rows][::-1], color="lightgray", label="read-bandwidth bound")
    ax.barh(labels, [r["decode_tok_s"] for r in rows][::-1], color="tab:blue", label="measured")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["decode_tok_s"], i, f" {r['decode_tok_s']:.0f} tok/s ({r['fraction_of_bound']:.2f})", va="center")
    ax.set_xlabel("batch-1 decode tok/s (fraction of the bound)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
