"""Decode speed of one mmfuse checkpoint on vLLM: fp32, bf16, each quantized format vLLM runs here, and TP.

A random base big enough that decode reads weights, not overheads (hidden 1024, 8 layers, ~90M
parameters: 0.36 GB in fp32), quantized with compressed-tensors (``tiny.make_quantized_base``),
each through ``mmfuse init``. For each variant: batch-1 greedy decode tokens/s (128 tokens, EOS
ignored, minus the 1-token run that pays the prefill) and the bytes one decode step reads (every
weight once: linear weights at their stored width, the rest in the run dtype), as a fraction of
the read-bandwidth bound ``read GB/s / bytes per token`` measured in the same process
(``mmfuse.bench.machine``). Then tensor parallel 2 vs 1 (fp32): batch-1 and batch-16 decode.

    python scripts/bench_quantized.py --out docs/bench_quantized.json

Runs one engine at a time; ~5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--work", default=None, help="directory for the models (default: a temporary one)")
    parser.add_argument("--parts", default="decode,tp", help="which parts to run: decode, tp or both")
    args = parser.parse_args()

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
          f"{limits.cores} cores")
    result = dict(machine=limits.to_dict(), params=bytes_per_token(ckpts["fp"], "float32") // 4, decode=[],
                  tensor_parallel=[])

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
        per_token = bytes_per_token(ckpts[scheme], dtype)
        bound = limits.read_gbps * 1e9 / per_token
        rows.append(dict(variant=label, dtype=dtype, bytes_per_token=per_token, decode_tok_s=round(tok_s, 1),
                         bound_tok_s=round(bound, 1), fraction_of_bound=round(tok_s / bound, 2)))
        print(rows[-1])
        save()
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


if __name__ == "__main__":
    main()
