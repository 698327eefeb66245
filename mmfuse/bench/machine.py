"""The machine's own limits, measured with torch in the benchmark's process, and the bounds they imply.

- fp32 GEMM GFLOP/s: a prefill-shaped matmul ([2048, 1024] x [1024, 3072]), best of several.
- copy bandwidth GB/s: ``dst.copy_(src)`` over 512 MiB, counting bytes read plus bytes written.
- read bandwidth GB/s: ``src.sum()`` over the same 512 MiB (a decode step only reads weights,
  so this is the bound used for batch-1 decode).

A prefill token costs about ``2 * params`` FLOPs (matmuls dominate at short context); a
batch-1 decode token reads every weight once, so it is bound by bytes / bandwidth.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class MachineLimits:
    gemm_gflops: float  # fp32, torch.mm
    copy_gbps: float  # (read + write) bytes per second / 1e9
    read_gbps: float  # bytes read per second / 1e9
    threads: int
    cpu: str
    cores: int

    def to_dict(self) -> dict:
        return asdict(self)


def _best(fn, repeats: int) -> float:
    fn()  # warm up (allocations, thread pool)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(quick: bool = False) -> MachineLimits:
    """Measure GEMM throughput and copy bandwidth with the current torch thread settings."""
    m, k, n = (512 if quick else 2048), 1024, 3072
    a, b = torch.randn(m, k), torch.randn(k, n)
    gemm_s = _best(lambda: torch.mm(a, b), 3 if quick else 8)
    size = (64 if quick else 512) * 2**20 // 4  # float32 elements
    src, dst = torch.randn(size), torch.empty(size)
    copy_s = _best(lambda: dst.copy_(src), 3 if quick else 8)
    read_s = _best(lambda: src.sum(), 3 if quick else 8)
    return MachineLimits(gemm_gflops=2 * m * k * n / gemm_s / 1e9, copy_gbps=2 * size * 4 / copy_s / 1e9,
                         read_gbps=size * 4 / read_s / 1e9,
                         threads=torch.get_num_threads(), cpu=_cpu_name(), cores=os.cpu_count() or 0)


@dataclass
class ModelCost:
    """Work per token of a decoder-only LM, from its shape."""

    matmul_params: int  # weights multiplied per prompt token (all layers, no embedding/lm_head)
    lm_head_params: int  # vocab * hidden: multiplied once per sequence at prefill, once per token at decode
    weight_bytes: int  # what a decode step reads at batch 1: layer weights + lm_head (one embedding row only)

    @classmethod
    def of(cls, config) -> "ModelCost":
        h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        head_dim = config.head_dim
        attn = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        per_layer = attn + 3 * h * inter
        lm_head = config.vocab_size * h
        return cls(matmul_params=layers * per_layer, lm_head_params=lm_head,
                   weight_bytes=4 * (layers * per_layer + lm_head))

    def prefill_flops(self, prompt_lens: list[int]) -> float:
        return sum(2.0 * self.matmul_params * n + 2.0 * self.lm_head_params for n in prompt_lens)

    def decode_bound_tok_s(self, limits: MachineLimits) -> float:
        return limits.read_gbps * 1e9 / self.weight_bytes
